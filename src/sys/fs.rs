//! File and filesystem calls: statvfs, punching holes, fsync of directories, and walking the
//! allocated ranges of a sparse file.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use super::{SysError, retry_eintr};

/// Space and inodes of a mounted filesystem, in bytes and counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FsUsage {
    pub(crate) total_bytes: u64,
    /// What an unprivileged writer can still allocate.
    pub(crate) available_bytes: u64,
    pub(crate) used_bytes: u64,
    pub(crate) total_inodes: u64,
    pub(crate) free_inodes: u64,
    pub(crate) used_inodes: u64,
}

pub(crate) fn statvfs(path: &Path) -> Result<FsUsage, SysError> {
    let st = retry_eintr(|| nix::sys::statvfs::statvfs(path))
        .map_err(|e| SysError::errno("statvfs", path, e))?;
    let frsize = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frsize;
    let free = st.blocks_free() as u64 * frsize;
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: st.blocks_available() as u64 * frsize,
        used_bytes: total.saturating_sub(free),
        total_inodes: st.files() as u64,
        free_inodes: st.files_free() as u64,
        used_inodes: (st.files() as u64).saturating_sub(st.files_free() as u64),
    })
}

/// Bytes actually allocated to `path` on disk (a sparse file allocates less than its size).
pub(crate) fn allocated_bytes(meta: &std::fs::Metadata) -> u64 {
    meta.blocks() * 512
}

/// Allocates the blocks of `len` bytes at `offset` in `file` (`fallocate(2)` mode 0: unwritten
/// extents on ext4 and XFS, so milliseconds even for large files; they read as zeros).
pub(crate) fn reserve(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), SysError> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(SysError::errno("fallocate", path, nix::errno::Errno::EFBIG));
    };
    super::retry_eintr(|| {
        nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), offset, len)
    })
    .map(|_| ())
    .map_err(|e| SysError::errno("fallocate", path, e))
}

/// Releases `len` bytes at `offset` of `file` back to the filesystem, which passes the
/// discard on to the device; the file keeps its size and reads zeros there.
pub(crate) fn punch_hole(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), SysError> {
    if len == 0 {
        return Ok(());
    }
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    retry_eintr(|| nix::fcntl::fallocate(file.as_fd(), flags, offset as i64, len as i64))
        .map_err(|e| SysError::errno("punch hole", path, e))
}

/// Makes a directory's entries (a create, rename or unlink in it) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SysError> {
    let f = File::open(dir).map_err(|e| SysError::io("open dir", dir, e))?;
    f.sync_all().map_err(|e| SysError::io("fsync dir", dir, e))
}

/// Overwrites with zeros every allocated range of `file` at or after `from`, and syncs it.
/// Holes are skipped: they hold nothing to wipe, and writing them would allocate the whole
/// volume.
pub(crate) fn zero_allocated_ranges(
    file: &mut File,
    path: &Path,
    from: u64,
) -> Result<(), SysError> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    for (data, len) in data_ranges(file, path, from)? {
        file.seek(SeekFrom::Start(data))
            .map_err(|e| SysError::io("seek", path, e))?;
        let mut at = data;
        while at < data + len {
            let n = ((data + len - at) as usize).min(CHUNK);
            file.write_all(&zeros[..n])
                .map_err(|e| SysError::io("overwrite", path, e))?;
            at += n as u64;
        }
    }
    file.sync_data().map_err(|e| SysError::io("fsync", path, e))
}

/// The (offset, length) of every range from `from` on that SEEK_DATA and SEEK_HOLE call data.
pub(crate) fn data_ranges(
    file: &File,
    path: &Path,
    from: u64,
) -> Result<Vec<(u64, u64)>, SysError> {
    let size = file
        .metadata()
        .map_err(|e| SysError::io("stat", path, e))?
        .len();
    let mut out = Vec::new();
    let mut pos = from;
    while pos < size {
        let data = match nix::unistd::lseek(file.as_fd(), pos as i64, nix::unistd::Whence::SeekData)
        {
            Ok(p) => p as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(SysError::errno("seek data", path, e)),
        };
        let hole = nix::unistd::lseek(file.as_fd(), data as i64, nix::unistd::Whence::SeekHole)
            .map_err(|e| SysError::errno("seek hole", path, e))? as u64;
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// The trusted xattr the write probe sets (only CAP_SYS_ADMIN sees the trusted namespace, so
/// a pod's listing of its directory does not show it).
const PROBE_XATTR: &std::ffi::CStr = c"trusted.sealvol.probe";

/// Makes one small journaled metadata write on the directory at `path` (sets a one-byte
/// trusted xattr). ext4 notices a journal that a failed write aborted only when a write starts:
/// until then the filesystem answers reads and statfs as if healthy. EROFS or EIO means the
/// filesystem refuses writes.
pub(crate) fn probe_metadata_write(path: &Path) -> Result<(), Errno> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let value = [1u8];
    // SAFETY: both strings are NUL-terminated and outlive the call; `value` is a valid buffer
    // of the length passed; the kernel only reads them.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            PROBE_XATTR.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}
