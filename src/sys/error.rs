//! The error type of `sys/`: what was attempted, on which path, and the errno or exit status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} exited with {status}: {stderr}")]
    Command {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("required program {name} not found (searched {searched}): install it or fix PATH")]
    MissingProgram {
        name: &'static str,
        searched: String,
    },
    #[error("required program {path} does not work (`{check}` {reason})")]
    BrokenProgram {
        path: PathBuf,
        check: String,
        reason: String,
    },
    #[error(
        "no free loop device after {attempts} attempts (LOOP_CONFIGURE kept racing with other users)"
    )]
    NoFreeLoop { attempts: u32 },
    #[error("/proc/self/mountinfo line {line} is malformed")]
    Mountinfo { line: usize },
    #[error("key memory: {0}")]
    KeyMemory(String),
}

impl SysError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SysError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn errno(op: &'static str, path: impl Into<PathBuf>, errno: nix::Error) -> Self {
        Self::io(op, path, std::io::Error::from(errno))
    }
}
