//! mount(2) and umount2(2): filesystem mounts, bind mounts, read-only remounts, unmounts.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::{SysError, retry_eintr};

/// The mount options sealvol accepts from a StorageClass's `mountOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MountFlags {
    pub(crate) noatime: bool,
    pub(crate) lazytime: bool,
    /// ext4's `discard`: freed blocks (a punched hole among them) are discarded on the device.
    pub(crate) discard: bool,
}

impl MountFlags {
    fn ms_flags(self) -> MsFlags {
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if self.noatime {
            flags |= MsFlags::MS_NOATIME;
        }
        if self.lazytime {
            flags |= MsFlags::MS_LAZYTIME;
        }
        flags
    }
}

/// Mounts the filesystem on `device` at `target`.
pub(crate) fn mount_fs(
    device: &Path,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
) -> Result<(), SysError> {
    let data = if flags.discard { "discard" } else { "" };
    retry_eintr(|| {
        nix::mount::mount(
            Some(device),
            target,
            Some(fstype),
            flags.ms_flags(),
            Some(data),
        )
    })
    .map_err(|e| SysError::errno("mount", target, e))
}

/// Bind-mounts `source` at `target`.
pub(crate) fn bind_mount(source: &Path, target: &Path) -> Result<(), SysError> {
    retry_eintr(|| {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .map_err(|e| SysError::errno("bind mount", target, e))
}

/// Makes the bind mount at `target` read-only (a bind mount ignores MS_RDONLY at creation).
pub(crate) fn remount_bind_readonly(target: &Path) -> Result<(), SysError> {
    retry_eintr(|| {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
    })
    .map_err(|e| SysError::errno("remount read-only", target, e))
}

/// Unmounts `target`. Returns false when nothing was mounted there (`EINVAL`). With `lazy`,
/// detaches the mount now and lets the kernel finish when the last user goes away.
pub(crate) fn unmount(target: &Path, lazy: bool) -> Result<bool, SysError> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match retry_eintr(|| nix::mount::umount2(target, flags)) {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(SysError::errno("unmount", target, e)),
    }
}
