//! NodePublishVolume and NodeUnpublishVolume, read top to bottom: authorize the pod, unlock
//! the volume's key into its filesystem, bind-mount `data/` at the target; and the reverse.

use std::path::Path;

use super::id::VolumeId;
use super::params::{AccessMode, Capability, KeyMode, Lifecycle, VolumeParams};
use super::paths::check_under;
use super::release::{self, PodAuth};
use super::{
    Manager, MountedHere, Volume, VolumeError, crash, invalid, io_err, is_data_mount_of,
    is_fs_mount_of, mounted_here, not_found, publications, staged_at,
};
use crate::crypt;
use crate::sys::{self, AttachedLoop, MountTable};

/// A validated NodePublishVolume.
#[derive(Debug, Clone)]
pub(crate) struct PublishRequest {
    pub(crate) id: VolumeId,
    pub(crate) target: String,
    pub(crate) staging: Option<String>,
    pub(crate) read_only: bool,
    pub(crate) capability: Capability,
    /// Set for a CSI inline ephemeral volume: its parameters and size.
    pub(crate) inline: Option<(VolumeParams, u64)>,
    /// The publishing pod's token and name, for an encrypted volume's key release.
    pub(crate) auth: PodAuth,
}

impl Manager {
    /// Bind-mounts the volume's data directory at the target path (read-only if asked). For a
    /// CSI inline volume, first creates and stages the volume.
    pub(crate) fn publish(&self, req: &PublishRequest) -> Result<(), VolumeError> {
        let target = check_under(&req.target, &self.settings.kubelet_dir, "target_path")?;
        if let Some((params, size)) = &req.inline {
            return self.publish_inline(req, &target, params, *size);
        }
        let staging = req
            .staging
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                invalid(
                    "staging_target_path",
                    "is required: sealvol stages volumes before publishing them",
                )
            })?;
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(&req.id)?;
        let mut vol = self.load(&req.id)?.ok_or_else(|| not_found(&req.id))?;
        let Some(device) = staged_at(&vol.file.path, &staging)? else {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is not staged at {}",
                req.id,
                staging.display()
            )));
        };
        self.publish_staged(&mut vol, &device, &staging, &target, req)
    }

    /// The common end of a publish, in three steps: authorize (the pod's own identity unwraps
    /// the volume's key; on a republish, re-authorization when due), unlock (the key into the
    /// filesystem, the user-space copy zeroized), bind (`data/` at the target).
    pub(super) fn publish_staged(
        &self,
        vol: &mut Volume,
        device: &AttachedLoop,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let here = mounted_here(target, device.dev)?;
        if vol.record.key_mode == KeyMode::None {
            return self.bind_at(vol, device, here, staging, target, req);
        }
        if here == MountedHere::Data {
            self.reauthorize(vol, device, staging, target, req)?;
            return self.bind_at(vol, device, here, staging, target, req);
        }
        // 1. Authorize.
        let (dek, _principal) = self.authorize_first_publish(vol, device, target, req)?;
        // 2. Unlock.
        let recorded = vol
            .record
            .kms
            .as_ref()
            .and_then(|k| k.key_identifier.clone());
        let identifier = crypt::unlock(staging, dek.expose(), recorded.as_deref())?;
        drop(dek);
        if recorded.is_none()
            && let Some(k) = vol.record.kms.as_mut()
        {
            k.key_identifier = Some(identifier);
            self.save(vol)?;
        }
        // 3. Bind.
        match self.bind_at(vol, device, here, staging, target, req) {
            Ok(()) => self.publication_started(&vol.id, target, &req.auth),
            Err(e) => {
                // Nothing is published: the key goes again.
                let table = MountTable::read()?;
                if publications(&table, device).next().is_none() {
                    release::evict(&vol.id, &vol.record, staging)?;
                }
                Err(e)
            }
        }
    }

    /// Binds `data/` at `target`, whose mount state the caller found (`here`, under the
    /// volume's guard); a publication already there is done, or finished if a crash came
    /// between its bind and its read-only remount.
    pub(super) fn bind_at(
        &self,
        vol: &Volume,
        device: &AttachedLoop,
        here: MountedHere,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let read_only = req.read_only || req.capability.access_mode.read_only();
        match here {
            MountedHere::Data => {
                if sys::is_read_only(target)? == read_only {
                    tracing::debug!(volume.id = %vol.id, "already published");
                    return Ok(());
                }
                if read_only {
                    // A crash between the bind and its read-only remount: finish it.
                    sys::remount_bind_readonly(target)?;
                    return Ok(());
                }
                return Err(VolumeError::AlreadyExists(format!(
                    "target_path {} is already published read-only",
                    target.display()
                )));
            }
            MountedHere::Filesystem | MountedHere::Other => {
                let source = MountTable::read()?
                    .at(target)
                    .map(|m| m.source.clone())
                    .unwrap_or_default();
                return Err(VolumeError::AlreadyExists(format!(
                    "target_path {} already holds another mount ({source})",
                    target.display(),
                )));
            }
            MountedHere::Nothing => {}
        }
        if req.capability.access_mode == AccessMode::SingleNodeSingleWriter
            && let table = MountTable::read()?
            && let Some(other) = publications(&table, device).next()
        {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                vol.id,
                other.mount_point.display()
            )));
        }
        std::fs::create_dir_all(target).map_err(io_err("mkdir", target))?;
        sys::bind_mount(&staging.join(crypt::DATA_DIR), target)?;
        crash::point("publish.bound");
        if read_only && let Err(e) = sys::remount_bind_readonly(target) {
            let _ = sys::unmount(target, false);
            return Err(e.into());
        }
        tracing::info!(volume.id = %vol.id, target.path = %target.display(), read_only, "volume published");
        Ok(())
    }

    /// Unmounts the target path and removes it. For a CSI inline volume whose last
    /// publication this was, also unstages, deletes and wipes the volume.
    pub(crate) fn unpublish(&self, id: &VolumeId, target: &str) -> Result<(), VolumeError> {
        let target = check_under(target, &self.settings.kubelet_dir, "target_path")?;
        let _guard = self.lock(id)?;
        let vol = self.load(id)?;
        let table = MountTable::read()?;
        if let Some(m) = table.at(&target) {
            let Some(vol) = &vol else {
                if self.release_orphaned_mount(id, &target)? {
                    self.publication_ended(id, &target)?;
                    let _ = std::fs::remove_dir(&target);
                    return Ok(());
                }
                return Err(VolumeError::NotFound(format!(
                    "volume {id} does not exist, and {} holds a mount of something else",
                    target.display()
                )));
            };
            let ours = self
                .loops
                .find(&vol.file.path)?
                .is_some_and(|l| is_data_mount_of(m, &l));
            if !ours {
                return Err(VolumeError::FailedPrecondition(format!(
                    "target_path {} holds a mount ({}) that is not volume {id}",
                    target.display(),
                    m.source
                )));
            }
            sys::unmount(&target, false)?;
            crash::point("unpublish.unmounted");
            self.publication_ended(id, &target)?;
            tracing::info!(volume.id = %id, target.path = %target.display(), "volume unpublished");
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target.path = %target.display(), error = %e, "could not remove the target directory")
            }
        }
        let Some(vol) = vol else { return Ok(()) };
        let table = MountTable::read()?;
        let device = self.loops.find(&vol.file.path)?;
        let still_published = device
            .as_ref()
            .is_some_and(|l| publications(&table, l).next().is_some());
        if still_published {
            return Ok(());
        }
        if vol.record.lifecycle == Lifecycle::Ephemeral {
            self.teardown_inline(&vol)?;
            tracing::info!(volume.id = %id, wipe = vol.record.wipe.as_str(), "inline volume deleted and wiped");
        } else if let Some(fs) = device.and_then(|l| {
            table
                .entries()
                .iter()
                .find(|m| is_fs_mount_of(m, &l))
                .map(|m| m.mount_point.clone())
        }) {
            // The last publication is gone: so is the key.
            release::evict(&vol.id, &vol.record, &fs)?;
        }
        Ok(())
    }
}
