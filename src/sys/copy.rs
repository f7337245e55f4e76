//! What a snapshot needs of the kernel: freezing a mounted filesystem so that what its block
//! device holds is consistent (FIFREEZE, FITHAW), and copying a file cheaply: a reflink
//! (FICLONE) where the filesystem shares extents (XFS, btrfs), else only the extents that hold
//! written data (FIEMAP, then copy_file_range, which the kernel does without a trip through
//! this process). SEEK_DATA would not do: it counts a thick volume's reserved (unwritten)
//! extents as data once their pages are cached, and the copy would then store the whole
//! reservation as zeros.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Instant;

use nix::errno::Errno;

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

/// Copies `from` (all of it) into `to`, which holds nothing of it yet: a reflink when
/// `reflink` allows it and the filesystem has them, else the extents holding written data,
/// checking `deadline` between chunks. `to` ends at least as long as `from`; what `from` has
/// as a hole or a reservation reads as zeros in `to`.
pub(crate) fn copy_file(
    from: &File,
    to: &File,
    what: &Path,
    deadline: Instant,
    reflink: bool,
) -> Result<Copied, SysError> {
    if reflink {
        // SAFETY: FICLONE takes the source's fd as its argument; both fds are open files.
        match unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as libc::c_ulong) } {
            Ok(_) => return Ok(Copied::Reflinked),
            // Not a filesystem with shared extents, or not the same one: copy.
            Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => {}
            Err(e) => return Err(SysError::errno("FICLONE", what, e)),
        }
    }
    const CHUNK: u64 = 8 << 20;
    let size = from
        .metadata()
        .map_err(|e| SysError::io("stat", what, e))?
        .len();
    let to_len = to
        .metadata()
        .map_err(|e| SysError::io("stat", what, e))?
        .len();
    if to_len < size {
        to.set_len(size)
            .map_err(|e| SysError::io("size", what, e))?;
    }
    let mut copied = 0u64;
    for (start, len) in written_extents(from, what)? {
        let end = (start + len).min(size);
        let mut at = start;
        while at < end {
            if Instant::now() > deadline {
                return Ok(Copied::TimedOut);
            }
            let n = (end - at).min(CHUNK) as usize;
            let (mut off_in, mut off_out) = (at as i64, at as i64);
            let n = retry_eintr(|| {
                nix::fcntl::copy_file_range(
                    from.as_fd(),
                    Some(&mut off_in),
                    to.as_fd(),
                    Some(&mut off_out),
                    n,
                )
            })
            .map_err(|e| SysError::errno("copy_file_range", what, e))?;
            if n == 0 {
                // Its size was read above and nothing else writes it while it is copied.
                return Err(SysError::errno("copy_file_range", what, Errno::ENODATA));
            }
            at += n as u64;
            copied += n as u64;
        }
    }
    Ok(Copied::Sparse(copied))
}

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const EXTENTS_PER_CALL: usize = 128;

/// `struct fiemap` with room for `EXTENTS_PER_CALL` extents after it.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

// The request number encodes the size of the bare `struct fiemap` (32 bytes), without the
// extents that follow it, so it is spelled out rather than taken from `Fiemap`'s size.
nix::ioctl_readwrite_bad!(
    fs_ioc_fiemap,
    nix::request_code_readwrite!(b'f', 11, 32),
    Fiemap
);

/// The (offset, length) of every extent of `file` that holds written data, in order, after its
/// dirty pages are flushed (FIEMAP_FLAG_SYNC): holes and unwritten (reserved) extents, which
/// read as zeros, are left out.
pub(crate) fn written_extents(file: &File, what: &Path) -> Result<Vec<(u64, u64)>, SysError> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut start = 0u64;
    loop {
        let mut map = Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        };
        // SAFETY: `map` is a valid struct fiemap followed by room for `extent_count` extents,
        // as the kernel expects; it outlives the call.
        match retry_eintr(|| unsafe { fs_ioc_fiemap(file.as_raw_fd(), &mut map) }) {
            Ok(_) => {}
            // No FIEMAP (tmpfs, ZFS): they have no unwritten extents, so SEEK_DATA is exact.
            Err(Errno::EOPNOTSUPP | Errno::ENOTTY) if start == 0 => {
                return super::fs::data_ranges(file, what, 0);
            }
            Err(e) => return Err(SysError::errno("FS_IOC_FIEMAP", what, e)),
        }
        let mapped = (map.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            return Ok(out);
        }
        for e in &map.extents[..mapped] {
            if e.flags & FIEMAP_EXTENT_UNWRITTEN == 0 {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == e.logical => *l += e.length,
                    _ => out.push((e.logical, e.length)),
                }
            }
        }
        let last = &map.extents[mapped - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(out);
        }
        start = last.logical + last.length;
    }
}
