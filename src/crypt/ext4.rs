//! ext4 on a volume's loop device: create it, prepare the data directory, grow it online.

use std::path::{Path, PathBuf};

use crate::sys::{self, SysError, Tools};

/// The directory inside a volume's filesystem that is bind-mounted into pods. Keeping it a
/// subdirectory leaves the root (and lost+found) out of the pod's view, and gives fscrypt an
/// empty directory to set its policy on.
pub(crate) const DATA_DIR: &str = "data";

/// Creates the filesystem. Only for a volume whose header says it was never formatted.
pub(crate) fn format(tools: &Tools, device: &Path) -> Result<(), SysError> {
    tools.mkfs_volume(device)
}

/// Creates `data/` under the mounted filesystem at `root` if it is missing.
pub(crate) fn ensure_data_dir(root: &Path) -> Result<PathBuf, SysError> {
    let data = root.join(DATA_DIR);
    match std::fs::create_dir(&data) {
        Ok(()) => sys::fsync_dir(root)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SysError::io("mkdir", data, e)),
    }
    Ok(data)
}

/// Grows the mounted filesystem on `device` to the device's (already grown) size.
pub(crate) fn grow(tools: &Tools, device: &Path) -> Result<(), SysError> {
    tools.resize2fs(device)
}

/// Grows the unmounted ext4 filesystem on `device`: resize2fs insists on a full check first.
pub(crate) fn grow_offline(tools: &Tools, device: &Path) -> Result<(), SysError> {
    tools.fsck(device)?;
    tools.resize2fs(device)
}
