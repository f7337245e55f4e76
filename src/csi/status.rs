//! The one place where domain errors become gRPC status codes (CSI spec, "Error Scheme").
//! Every variant is matched explicitly: a new variant does not compile until its code is
//! decided here.

use tonic::{Code, Status};

use crate::pool::PoolError;
use crate::volume::VolumeError;

pub(crate) fn to_status(e: VolumeError) -> Status {
    let code = match &e {
        VolumeError::InvalidArgument { .. } => Code::InvalidArgument,
        VolumeError::NotFound(_) => Code::NotFound,
        VolumeError::AlreadyExists(_) => Code::AlreadyExists,
        VolumeError::FailedPrecondition(_) => Code::FailedPrecondition,
        VolumeError::Busy(_) => Code::Aborted,
        VolumeError::ResourceExhausted(_) => Code::ResourceExhausted,
        VolumeError::OutOfRange(_) => Code::OutOfRange,
        // The CSI spec asks for ABORTED on a starting_token the plugin cannot use.
        VolumeError::BadStartingToken(_) | VolumeError::Aborted(_) => Code::Aborted,
        VolumeError::Header { .. } | VolumeError::Corrupt(_) => Code::DataLoss,
        VolumeError::Unauthenticated(_) => Code::Unauthenticated,
        VolumeError::PermissionDenied(_) => Code::PermissionDenied,
        VolumeError::Unavailable(_) => Code::Unavailable,
        VolumeError::Internal(_) => Code::Internal,
        VolumeError::Pool(p) => match p {
            PoolError::Unknown { .. } => Code::InvalidArgument,
            PoolError::Disk { .. } | PoolError::Dir { .. } => Code::Unavailable,
            PoolError::Spec { .. } | PoolError::Sys(_) => Code::Internal,
        },
        VolumeError::Sys(_) => Code::Internal,
    };
    let message = match &e {
        VolumeError::Pool(PoolError::Unknown { .. }) => format!("parameters.pool: {e}"),
        _ => e.to_string(),
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s = to_status(VolumeError::Busy("sv-x".into()));
        assert_eq!(s.code(), Code::Aborted);
        let s = to_status(VolumeError::InvalidArgument {
            field: "target_path",
            message: "is required".into(),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "target_path: is required");
        let s = to_status(VolumeError::Pool(PoolError::Unknown {
            name: "x".into(),
            known: "a".into(),
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("parameters.pool"));
    }
}
