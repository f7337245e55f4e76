//! Thin, safe wrappers over the kernel and the few external programs sealvol needs.
//!
//! One function per kernel operation; errors keep the operation, the path and the errno.
//! Nothing here knows about volumes: `volume/` decides, `sys/` does. All `unsafe` in the
//! crate lives in this module, each block with a `// SAFETY:` note.

mod cmd;
mod copy;
mod error;
mod fs;
mod fscrypt;
mod keymem;
mod loopdev;
mod mount;
mod mountinfo;

pub(crate) use cmd::{BlkidProbe, Tools};
pub(crate) use copy::{Copied, copy_file, freeze, thaw, written_extents};
pub(crate) use error::SysError;
pub(crate) use fs::{
    FsUsage, allocated_bytes, fsync_dir, probe_metadata_write, punch_hole, reserve, statvfs,
    zero_allocated_ranges,
};
pub(crate) use fscrypt::{
    KEY_IDENTIFIER_SIZE, KeyStatus, Removal, add_key, forbid_core_dumps, key_status,
    policy_identifier, remove_key, set_policy,
};
pub(crate) use keymem::{KeyBytes, init_key_memory};
pub use keymem::{KeyMemory, ZeroOnFree};
pub(crate) use loopdev::{
    AttachedLoop, FileId, LoopDevice, attached_loops, attached_number, attached_with_dev,
};
pub(crate) use mount::{
    MountFlags, bind_mount, is_read_only, mount_fs, mount_root_at, remount_bind_readonly, unmount,
};
pub(crate) use mountinfo::{MountEntry, MountTable};

/// Whether this process holds CAP_SYS_RESOURCE, which ext4 requires to grow a mounted
/// filesystem (EXT4_IOC_RESIZE_FS). Sandboxes and unprivileged containers drop it.
pub(crate) fn can_resize_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Retries a syscall while it fails with EINTR.
pub(crate) fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}
