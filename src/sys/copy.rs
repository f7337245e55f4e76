//! What a snapshot needs of the kernel: freezing a mounted filesystem so that what its block
//! device holds is consistent (FIFREEZE, FITHAW), and copying a file cheaply: a reflink
//! (FICLONE) where the filesystem shares extents (XFS, btrfs), else only the ranges that hold
//! data (SEEK_DATA and SEEK_HOLE, then copy_file_range, which the kernel does without a trip
//! through this process).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Instant;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::{SysError, retry_eintr};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
nix::ioctl_write_int!(ficlone, 0x94, 9);

fn open_dir(path: &Path) -> Result<File, SysError> {
    File::open(path).map_err(|e| SysError::io("open", path, e))
}

/// Freezes the filesystem mounted at `mount_point`: its dirty data and metadata are written
/// to its device, and writers block until `thaw`.
pub(crate) fn freeze(mount_point: &Path) -> Result<(), SysError> {
    let dir = open_dir(mount_point)?;
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument; `unused` is a valid int the kernel may not touch.
    retry_eintr(|| unsafe { fifreeze(dir.as_raw_fd(), &mut unused) })
        .map(|_| ())
        .map_err(|e| SysError::errno("FIFREEZE", mount_point, e))
}

/// Thaws the filesystem mounted at `mount_point`. One that is not frozen (EINVAL) counts as
/// thawed, so recovery can repeat it.
pub(crate) fn thaw(mount_point: &Path) -> Result<(), SysError> {
    let dir = open_dir(mount_point)?;
    let mut unused: libc::c_int = 0;
    // SAFETY: FITHAW ignores its argument; `unused` is a valid int the kernel may not touch.
    match retry_eintr(|| unsafe { fithaw(dir.as_raw_fd(), &mut unused) }) {
        Ok(_) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(SysError::errno("FITHAW", mount_point, e)),
    }
}

/// How a copy went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied {
    /// Shared extents: no data moved.
    Reflinked,
    /// The allocated ranges, this many bytes.
    Sparse(u64),
    /// The deadline came first; `to` holds part of `from`.
    TimedOut,
}

/// Copies `from` (all of it) into the empty file `to`: a reflink when the filesystem has
/// them, else the ranges holding data, checking `deadline` between chunks. `to` ends with
/// `from`'s length; what was a hole stays one.
pub(crate) fn copy_file(
    from: &File,
    to: &File,
    what: &Path,
    deadline: Instant,
) -> Result<Copied, SysError> {
    // SAFETY: FICLONE takes the source's fd as its argument; both fds are open files.
    match unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as libc::c_ulong) } {
        Ok(_) => return Ok(Copied::Reflinked),
        // Not a filesystem with shared extents, or not the same one: copy.
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => {}
        Err(e) => return Err(SysError::errno("FICLONE", what, e)),
    }
    const CHUNK: u64 = 8 << 20;
    let size = from
        .metadata()
        .map_err(|e| SysError::io("stat", what, e))?
        .len();
    to.set_len(size)
        .map_err(|e| SysError::io("size", what, e))?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(from.as_fd(), pos as i64, Whence::SeekData) {
            Ok(p) => p as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(SysError::errno("seek data", what, e)),
        };
        let hole = lseek(from.as_fd(), data as i64, Whence::SeekHole)
            .map_err(|e| SysError::errno("seek hole", what, e))? as u64;
        let mut at = data;
        while at < hole {
            if Instant::now() > deadline {
                return Ok(Copied::TimedOut);
            }
            let len = (hole - at).min(CHUNK) as usize;
            let (mut off_in, mut off_out) = (at as i64, at as i64);
            let n = retry_eintr(|| {
                nix::fcntl::copy_file_range(
                    from.as_fd(),
                    Some(&mut off_in),
                    to.as_fd(),
                    Some(&mut off_out),
                    len,
                )
            })
            .map_err(|e| SysError::errno("copy_file_range", what, e))?;
            if n == 0 {
                // The source shrank under us: what is left reads as a hole.
                return Ok(Copied::Sparse(copied));
            }
            at += n as u64;
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(Copied::Sparse(copied))
}
