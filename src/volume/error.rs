//! The lifecycle's error type. Each variant is a decision about what went wrong; csi/status.rs
//! turns each into exactly one gRPC code.

use crate::pool::PoolError;
use crate::sys::SysError;

use super::header::HeaderError;
use crate::crypt::CryptError;
use crate::identity::IdentityError;
use crate::keys::KeyError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum VolumeError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("volume {0} is busy with another operation; retry")]
    Busy(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// The call gave up part-way, leaving nothing behind; retrying may succeed.
    #[error("{0}")]
    Aborted(String),
    #[error("starting_token {0:?} was not issued by this driver")]
    BadStartingToken(String),
    #[error("volume {volume_id}: header: {source}")]
    Header {
        volume_id: String,
        #[source]
        source: HeaderError,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

impl From<IdentityError> for VolumeError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::NoToken(_) | IdentityError::Malformed(_) | IdentityError::Refused(_) => {
                VolumeError::Unauthenticated(e.to_string())
            }
            IdentityError::Unavailable(_) | IdentityError::ApiUnavailable(_) => {
                VolumeError::Unavailable(e.to_string())
            }
            IdentityError::NoClientId | IdentityError::NoTenantId => {
                VolumeError::FailedPrecondition(e.to_string())
            }
        }
    }
}

impl From<KeyError> for VolumeError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Unauthenticated(_) => VolumeError::Unauthenticated(e.to_string()),
            KeyError::Denied(_) => VolumeError::PermissionDenied(e.to_string()),
            KeyError::Unavailable(_) => VolumeError::Unavailable(e.to_string()),
            KeyError::Corrupt(_) => VolumeError::Corrupt(e.to_string()),
            KeyError::Rejected(_) => VolumeError::FailedPrecondition(e.to_string()),
            KeyError::Internal(_) => VolumeError::Internal(e.to_string()),
        }
    }
}

impl From<CryptError> for VolumeError {
    fn from(e: CryptError) -> Self {
        match e {
            CryptError::Sys(s) => VolumeError::Sys(s),
            CryptError::Mismatch(m) => VolumeError::Corrupt(m),
            CryptError::Unencrypted(m) => VolumeError::FailedPrecondition(m),
        }
    }
}
