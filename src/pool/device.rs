//! Disk pools: raw local disks that sealvol formats with ext4 and mounts under its state dir.
//!
//! A disk is formatted only when blkid positively reports no signature on it, or when the
//! operator passed `--take-over-disks`. A disk sealvol formatted before (label `sealvol`) is
//! mounted again as it is, so volumes survive a restart or a reboot of the node. The pool a
//! disk belongs to is recorded in a marker file at its root.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::{Disk, PoolError};
use crate::sys::{self, BlkidProbe, MountFlags, SysError, Tools};

const LABEL: &str = "sealvol";
const MARKER: &str = ".sealvol-pool";

pub(super) fn open_disk(
    pool: &str,
    device: &Path,
    state_dir: &Path,
    tools: &Tools,
    take_over: bool,
) -> Result<Disk, PoolError> {
    let err = |reason: String| PoolError::Disk {
        pool: pool.to_string(),
        device: device.to_path_buf(),
        reason,
    };
    // Operators name disks by stable links (/dev/disk/by-id/...); mountinfo names the node.
    let canonical = device.canonicalize().map_err(|e| err(e.to_string()))?;
    let device = canonical.as_path();
    let meta = std::fs::metadata(device).map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_block_device() {
        return Err(err("not a block device".into()));
    }
    let pool_root = state_dir.join("pools").join(pool);
    let device_str = device.to_string_lossy().into_owned();
    let table = sys::MountTable::read()?;
    if let Some(existing) = table
        .of_source(&device_str)
        .find(|m| m.root == Path::new("/"))
    {
        // Mounted before this start (the driver restarted): keep it if it is ours.
        if existing.mount_point.parent() == Some(pool_root.as_path()) {
            let dir = existing.mount_point.clone();
            check_marker(pool, &dir).map_err(err)?;
            return Ok(Disk {
                dir,
                device: Some(device.to_path_buf()),
            });
        }
        return Err(err(format!(
            "is mounted at {}; sealvol uses only disks that nothing else has mounted",
            existing.mount_point.display()
        )));
    }

    match tools.probe(device)? {
        BlkidProbe::Empty => tools.mkfs_pool_disk(device, LABEL)?,
        BlkidProbe::Found(sig) if is_ours(&sig) => {}
        BlkidProbe::Found(sig) => {
            let found = describe(&sig);
            if !take_over {
                return Err(err(format!(
                    "carries {found}; refusing to format it (pass --take-over-disks to let sealvol erase it)"
                )));
            }
            tracing::warn!(pool, device = %device.display(), found, "taking over disk: erasing its signatures");
            tools.wipefs(device)?;
            tools.mkfs_pool_disk(device, LABEL)?;
        }
    }
    let uuid = match tools.probe(device)? {
        BlkidProbe::Found(sig) if is_ours(&sig) => sig.get("UUID").cloned(),
        _ => None,
    }
    .ok_or_else(|| err("no sealvol ext4 filesystem after formatting".into()))?;
    let dir = pool_root.join(&uuid);
    std::fs::create_dir_all(&dir).map_err(|e| SysError::io("mkdir", &dir, e))?;
    sys::mount_fs(
        device,
        &dir,
        "ext4",
        MountFlags {
            discard: true,
            ..MountFlags::default()
        },
    )?;
    check_marker(pool, &dir).map_err(err)?;
    tracing::info!(pool, device = %device.display(), dir = %dir.display(), "disk mounted");
    Ok(Disk {
        dir,
        device: Some(device.to_path_buf()),
    })
}

fn is_ours(sig: &std::collections::BTreeMap<String, String>) -> bool {
    sig.get("TYPE").map(String::as_str) == Some("ext4")
        && sig.get("LABEL").map(String::as_str) == Some(LABEL)
}

fn describe(sig: &std::collections::BTreeMap<String, String>) -> String {
    let mut parts = Vec::new();
    for key in ["TYPE", "PTTYPE", "LABEL"] {
        if let Some(v) = sig.get(key) {
            parts.push(format!("{key}={v}"));
        }
    }
    if parts.is_empty() {
        "an unknown signature".into()
    } else {
        parts.join(" ")
    }
}

/// Reads the marker naming the pool this disk belongs to, writing it on a fresh disk.
fn check_marker(pool: &str, dir: &Path) -> Result<(), String> {
    let marker: PathBuf = dir.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(owner) if owner.trim() == pool => Ok(()),
        Ok(owner) => Err(format!(
            "belongs to pool {:?}, not {pool:?}; move it back or erase it",
            owner.trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&marker, format!("{pool}\n")).map_err(|e| e.to_string())?;
            sys::fsync_dir(dir).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}
