//! NodeStageVolume and NodeUnstageVolume: the volume's file on a loop device (direct I/O,
//! past the header), ext4 made once, mounted at the staging path with its `data/` directory;
//! and NodeGetVolumeStats. State is read from the kernel on every call.

use std::path::Path;

use super::header::HEADER_BYTES;
use super::id::VolumeId;
use super::params::{Capability, KeyMode, Lifecycle, Provisioning};
use super::paths::check_under;
use super::release;
use super::{
    EXT4_ROOT_INO, Manager, Volume, VolumeError, crash, io_err, is_fs_mount_of, not_found,
    publications, staged_at,
};
use crate::crypt;
use crate::sys::{self, FsUsage, LoopDevice, MountFlags, MountTable};

/// NodeGetVolumeStats' answer: usage when mounted, and the reason when abnormal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeStats {
    pub(crate) usage: Option<FsUsage>,
    pub(crate) abnormal: Option<String>,
}

impl Manager {
    /// Attaches the volume's file to a loop device, creates ext4 the first time, and mounts it
    /// at the staging path.
    pub(crate) fn stage(
        &self,
        id: &VolumeId,
        staging: &str,
        capability: &Capability,
    ) -> Result<(), VolumeError> {
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(id)?;
        let mut vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        if vol.record.lifecycle == Lifecycle::Ephemeral {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {id} is a CSI inline volume; it is published without staging"
            )));
        }
        self.stage_at(&mut vol, &staging, capability.mount_flags)
    }

    pub(super) fn stage_at(
        &self,
        vol: &mut Volume,
        at: &Path,
        flags: MountFlags,
    ) -> Result<(), VolumeError> {
        if flags.discard && vol.record.provisioning == Provisioning::Thick {
            // ext4's discards would punch holes in the backing file through the loop device,
            // and a thick volume would quietly turn thin.
            return Err(VolumeError::InvalidArgument {
                field: "volume_capability.mount_flags",
                message: "discard is refused for a thick volume (it would release the blocks reserved for it); use provisioning: thin to mount with discard".into(),
            });
        }
        // The staging path by statx; mountinfo only when a loop device already exists (a
        // re-stage), to find where else it is mounted.
        if sys::mount_root_at(at)?.is_some() {
            if staged_at(&vol.file.path, at)?.is_some() {
                // A crash may have come between the mount and the data directory.
                crypt::ensure_data_dir(at)?;
                tracing::debug!(volume.id = %vol.id, "already staged");
                return Ok(());
            }
            let source = MountTable::read()?
                .at(at)
                .map(|m| m.source.clone())
                .unwrap_or_default();
            return Err(VolumeError::AlreadyExists(format!(
                "staging_target_path {} already holds another mount ({source})",
                at.display(),
            )));
        }
        let attached = self.loops.find(&vol.file.path)?;
        if let Some(l) = &attached
            && let table = MountTable::read()?
            && let Some(other) = table.entries().iter().find(|m| is_fs_mount_of(m, l))
        {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is already staged at {}",
                vol.id,
                other.mount_point.display()
            )));
        }
        let device = match attached {
            Some(l) => LoopDevice::open_existing(l.number, &vol.file.path)?,
            None => None,
        };
        let device = match device {
            Some(d) => d,
            None => {
                let device = LoopDevice::attach(&vol.file.path, HEADER_BYTES, &self.loop_label())?;
                if let Some(file) = sys::FileId::of(&vol.file.path)? {
                    self.loops.attached(file, device.number());
                }
                device
            }
        };
        crash::point("stage.attached");
        if !vol.record.formatted {
            crypt::format(&self.tools, &device.path())?;
            vol.record.formatted = true;
            self.save(vol)?;
            crash::point("stage.formatted");
        }
        if vol.record.grow_filesystem {
            // Restored from a smaller snapshot: the filesystem grows to the volume first.
            crypt::grow_offline(&self.tools, &device.path())?;
            vol.record.grow_filesystem = false;
            self.save(vol)?;
            tracing::info!(volume.id = %vol.id, "filesystem grown to the restored volume's size");
        }
        std::fs::create_dir_all(at).map_err(io_err("mkdir", at))?;
        sys::mount_fs(&device.path(), at, "ext4", flags)?;
        crash::point("stage.mounted");
        if let Err(e) = crypt::ensure_data_dir(at) {
            let _ = sys::unmount(at, false);
            return Err(e.into());
        }
        tracing::info!(volume.id = %vol.id, staging.path = %at.display(), device = %device.path().display(), "volume staged");
        Ok(())
    }

    /// Unmounts the staging path and frees the loop device. Refused while the volume is still
    /// published somewhere on this node.
    pub(crate) fn unstage(&self, id: &VolumeId, staging: &str) -> Result<(), VolumeError> {
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(id)?;
        let Some(vol) = self.load(id)? else {
            if self.release_orphaned_mount(id, &staging)? {
                return Ok(());
            }
            return Err(not_found(id));
        };
        self.unstage_at(&vol, &staging)
    }

    /// Whether loop device `l` is one this plugin attached for volume `id`, whose file the
    /// pools no longer hold (removed, or its pool unmounted or replaced): the caller found no
    /// volume `id`.
    fn is_orphan_of(&self, id: &VolumeId, l: &sys::AttachedLoop) -> bool {
        self.attached_by_us(l) && l.backing_name() == format!("{id}.img")
    }

    /// Unmounts `path` when it holds volume `id` after its backing file was removed from the
    /// pool or the pool became unreachable (by hand, or by something cleaning the disk), so
    /// that kubelet can still unpublish and unstage it instead of leaving the pod stuck in
    /// Terminating. Whether it did. Only called when no volume `id` is found.
    pub(super) fn release_orphaned_mount(
        &self,
        id: &VolumeId,
        path: &Path,
    ) -> Result<bool, VolumeError> {
        let Some(m) = sys::mount_root_at(path)? else {
            return Ok(false);
        };
        let Some(l) = sys::attached_with_dev(m.dev)? else {
            return Ok(false);
        };
        if !self.is_orphan_of(id, &l) {
            return Ok(false);
        }
        sys::unmount(path, false)?;
        tracing::warn!(volume.id = %id, path = %path.display(), device = %l.device_path().display(), "unmounted a volume whose backing file had been removed from the pool");
        Ok(true)
    }

    pub(super) fn unstage_at(&self, vol: &Volume, at: &Path) -> Result<(), VolumeError> {
        let table = MountTable::read()?;
        let Some(m) = table.at(at) else {
            tracing::debug!(volume.id = %vol.id, "already unstaged");
            return self.release_loop(vol);
        };
        let attached = self.loops.find(&vol.file.path)?;
        let Some(l) = attached.filter(|l| is_fs_mount_of(m, l)) else {
            return Err(VolumeError::FailedPrecondition(format!(
                "{} holds a mount ({}) that is not volume {}",
                at.display(),
                m.source,
                vol.id
            )));
        };
        let published: Vec<String> = publications(&table, &l)
            .map(|p| p.mount_point.display().to_string())
            .collect();
        if !published.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is still published at {}; unpublish it first",
                vol.id,
                published.join(", ")
            )));
        }
        // Normally gone with the last publication; after a crash it may still be there.
        release::evict(&vol.id, &vol.record, at)?;
        sys::unmount(at, false)?;
        crash::point("unstage.unmounted");
        self.release_loop(vol)?;
        tracing::info!(volume.id = %vol.id, staging.path = %at.display(), "volume unstaged");
        Ok(())
    }

    /// Usage of the volume mounted at `path` (its staging or a target path), and whether it is
    /// healthy: abnormal when the loop device or the mount is gone.
    pub(crate) fn stats(&self, id: &VolumeId, path: &str) -> Result<VolumeStats, VolumeError> {
        // A path that cannot be one of this node's (relative, outside kubelet's directory) holds
        // no volume: NOT_FOUND, as the spec wants; it is never followed.
        let path =
            check_under(path, &self.settings.kubelet_dir, "volume_path").map_err(|e| match e {
                VolumeError::InvalidArgument { message, .. } if !path.is_empty() => {
                    VolumeError::NotFound(format!(
                        "volume_path {message}: no volume of this node is there"
                    ))
                }
                e => e,
            })?;
        if !path.exists() {
            return Err(VolumeError::NotFound(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        // What is mounted at the path, by statx and the loop device's number: this also finds
        // a volume whose backing file was removed under it.
        let mounted = sys::mount_root_at(&path)?;
        let device = match mounted {
            Some(m) => sys::attached_with_dev(m.dev)?,
            None => None,
        };
        let Some(vol) = self.load(id)? else {
            return match device.filter(|l| self.is_orphan_of(id, l)) {
                Some(l) => Ok(VolumeStats {
                    usage: Some(sys::statvfs(&path)?),
                    abnormal: Some(if l.backing_deleted() {
                        format!(
                            "the backing file of volume {id} was removed from its pool while the volume is mounted: what is written now is lost when it is unmounted"
                        )
                    } else {
                        format!(
                            "the pool of volume {id} is unreachable (its directory no longer holds the volume's file: unmounted or replaced under the mounted volume)"
                        )
                    }),
                }),
                None => Err(not_found(id)),
            };
        };
        let ours =
            device.filter(|l| Some(l.backing) == sys::FileId::of(&vol.file.path).ok().flatten());
        let Some(device) = ours else {
            let abnormal = match mounted {
                Some(_) => format!("{} holds another mount", path.display()),
                None => format!("volume {id} is not mounted at {}", path.display()),
            };
            return Ok(VolumeStats {
                usage: None,
                abnormal: Some(abnormal),
            });
        };
        let published = mounted.is_some_and(|m| m.ino != EXT4_ROOT_INO);
        let abnormal = self.health(&vol, &device, &path, published)?;
        self.abnormal_transition(&vol, abnormal.as_deref());
        Ok(VolumeStats {
            usage: Some(sys::statvfs(&path)?),
            abnormal,
        })
    }
}

impl Manager {
    /// Logs and events (on the volume's PVC or pod) a volume found abnormal, once when it is
    /// found, not at every NodeGetVolumeStats: kubelet's volume-health reading is alpha, so
    /// this, the metric and the log are what an operator sees.
    fn abnormal_transition(&self, vol: &Volume, abnormal: Option<&str>) {
        let mut seen = self.abnormal.lock().unwrap_or_else(|p| p.into_inner());
        let Some(why) = abnormal else {
            seen.remove(&vol.id);
            return;
        };
        if !seen.insert(vol.id.clone()) {
            return;
        }
        tracing::error!(volume.id = %vol.id, reason = %why, "volume abnormal");
        if let Some(owner) = &vol.record.owner {
            self.release.event(owner, "Warning", "VolumeAbnormal", why);
        }
    }

    /// What is wrong with a mounted volume, in words an operator can act on; None when
    /// nothing is. `path` is a mount of it; `published` says it is a pod's (its key belongs
    /// in the kernel then).
    pub(super) fn health(
        &self,
        vol: &Volume,
        device: &sys::AttachedLoop,
        path: &Path,
        published: bool,
    ) -> Result<Option<String>, VolumeError> {
        let errors =
            std::fs::read_to_string(format!("/sys/fs/ext4/loop{}/errors_count", device.number))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
        if errors > 0 {
            return Ok(Some(format!(
                "ext4 on volume {} recorded {errors} error(s) and may have turned read-only: its data may be damaged (see the node's kernel log for {})",
                vol.id,
                device.device_path().display()
            )));
        }
        // A journal aborted by a failed write (a thin volume's pool filled) shows nowhere until
        // a write starts; kubelet asks every minute or so, and the probe is one small write.
        if let Err(e) = sys::probe_metadata_write(path)
            && matches!(e, nix::errno::Errno::EROFS | nix::errno::Errno::EIO)
        {
            return Ok(Some(format!(
                "ext4 on volume {} refuses writes ({e}): a write underneath it failed and aborted its journal (on a thin volume most likely because the pool filled), so data written since may be lost (see the node's kernel log for {})",
                vol.id,
                device.device_path().display()
            )));
        }
        let len = std::fs::metadata(&vol.file.path)
            .map_err(io_err("stat", &vol.file.path))?
            .len();
        if len < HEADER_BYTES + vol.record.capacity_bytes {
            return Ok(Some(format!(
                "the backing file of volume {} was truncated to {len} bytes under the mounted volume: reads past its end fail",
                vol.id
            )));
        }
        if published
            && vol.record.key_mode != KeyMode::None
            && let Some(identifier) = vol
                .record
                .kms
                .as_ref()
                .and_then(|k| k.key_identifier.as_deref())
            && !crypt::key_present(path, identifier)?
        {
            return Ok(Some(format!(
                "volume {} is locked: its key is not in the kernel (a re-authorization was refused), so no file can be opened",
                vol.id
            )));
        }
        Ok(None)
    }
}
