//! Errors of pool set-up and carving.

use std::path::PathBuf;

use crate::sys::SysError;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("--pool {spec:?}: {reason}; expected NAME=DIR or NAME=device:/dev/X[,/dev/Y]")]
    Spec { spec: String, reason: String },
    #[error("pool {pool}: disk {device}: {reason}")]
    Disk {
        pool: String,
        device: PathBuf,
        reason: String,
    },
    #[error("pool {pool}: directory {dir}: {reason}")]
    Dir {
        pool: String,
        dir: PathBuf,
        reason: String,
    },
    #[error("unknown pool {name:?}; this node has: {known}")]
    Unknown { name: String, known: String },
    #[error(transparent)]
    Sys(#[from] SysError),
}
