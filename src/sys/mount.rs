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

/// What `statx(2)` says of the mount at a path: a cost independent of how many other mounts
/// the node has (mountinfo grows with every pod's secrets, tokens and overlays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MountRoot {
    /// The mounted filesystem's device (`st_dev`).
    pub(crate) dev: u64,
    /// The inode mounted here: the filesystem's root for a whole-filesystem mount, a
    /// directory of it for a bind mount.
    pub(crate) ino: u64,
}

/// The mount whose root `path` is (the topmost, as path lookup sees it); None when `path` is
/// not a mount point or does not exist. A symlink at `path` is not followed.
pub(crate) fn mount_root_at(path: &Path) -> Result<Option<MountRoot>, SysError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SysError::errno("statx", path, Errno::EINVAL))?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let rc = retry_eintr(|| {
        // SAFETY: `c_path` is a NUL-terminated path that outlives the call, and `stx` is a
        // writable buffer of one `struct statx`, which is all the kernel writes.
        Errno::result(unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
                libc::STATX_INO,
                stx.as_mut_ptr(),
            )
        })
    });
    match rc {
        Ok(_) => {}
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(SysError::errno("statx", path, e)),
    }
    // SAFETY: zero-initialised, then filled by a successful statx; plain integers only.
    let stx = unsafe { stx.assume_init() };
    let root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & root == 0 {
        // Kernels before 5.8 do not say; the node plugin checks at start (node.rs).
        return Err(SysError::errno(
            "statx (STATX_ATTR_MOUNT_ROOT)",
            path,
            Errno::ENOTSUP,
        ));
    }
    if stx.stx_attributes & root == 0 {
        return Ok(None);
    }
    Ok(Some(MountRoot {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
    }))
}

/// Whether the mount at `path` is read-only.
pub(crate) fn is_read_only(path: &Path) -> Result<bool, SysError> {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .map_err(|e| SysError::errno("statvfs", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmounts on drop, also when the test fails.
    struct Unmount(std::path::PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn mount_roots_are_found_from_the_path_alone() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (mounts)"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fs, bind, plain) = (
            tmp.path().join("fs"),
            tmp.path().join("bind"),
            tmp.path().join("plain"),
        );
        for d in [&fs, &bind, &plain] {
            std::fs::create_dir(d).expect("mkdir");
        }
        assert_eq!(mount_root_at(&plain).expect("statx"), None);
        assert_eq!(
            mount_root_at(&tmp.path().join("absent")).expect("statx"),
            None
        );
        nix::mount::mount(
            Some("tmpfs"),
            &fs,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs");
        let _fs = Unmount(fs.clone());
        let root = mount_root_at(&fs).expect("statx").expect("a mount root");
        std::fs::create_dir(fs.join("data")).expect("mkdir data");
        assert_eq!(mount_root_at(&fs.join("data")).expect("statx"), None);
        bind_mount(&fs.join("data"), &bind).expect("bind");
        let _bind = Unmount(bind.clone());
        let bound = mount_root_at(&bind).expect("statx").expect("a mount root");
        assert_eq!(bound.dev, root.dev, "the same filesystem");
        assert_ne!(bound.ino, root.ino, "a directory of it, not its root");
        assert!(!is_read_only(&bind).expect("statvfs"));
        remount_bind_readonly(&bind).expect("remount ro");
        assert!(is_read_only(&bind).expect("statvfs"));
        // A symlink to a mount point is not one.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fs, &link).expect("symlink");
        assert_eq!(mount_root_at(&link).expect("statx"), None);
    }
}
