//! The lifecycle's error type. Each variant is a decision about what went wrong; csi/status.rs
//! turns each into exactly one gRPC code.

use crate::pool::PoolError;
use crate::sys::SysError;

use super::header::HeaderError;

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
    #[error("starting_token {0:?} was not issued by this driver")]
    BadStartingToken(String),
    #[error("volume {volume_id}: header: {source}")]
    Header {
        volume_id: String,
        #[source]
        source: HeaderError,
    },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Sys(#[from] SysError),
}
