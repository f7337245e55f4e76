//! CSI inline ephemeral volumes: created, staged under the state directory and published by
//! their NodePublishVolume; unstaged, wiped and deleted by their last NodeUnpublishVolume.

use std::path::{Path, PathBuf};

use super::header::{EventTarget, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::params::{Lifecycle, VolumeParams};
use super::publish::PublishRequest;
use super::release::PodAuth;
use super::{INLINE_DIR, Manager, Volume, VolumeError, crash, io_err, not_found, now_unix};
use crate::sys;

impl Manager {
    pub(super) fn publish_inline(
        &self,
        req: &PublishRequest,
        target: &Path,
        params: &VolumeParams,
        size: u64,
    ) -> Result<(), VolumeError> {
        let _guard = self.lock(&req.id)?;
        let (mut vol, created) = match self.load(&req.id)? {
            Some(vol) if vol.record.lifecycle == Lifecycle::Ephemeral => (vol, false),
            Some(_) => {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {} is a persistent volume; csi.storage.k8s.io/ephemeral=true is for inline volumes",
                    req.id
                )));
            }
            None => {
                let default_pool = self.pools.get(None)?.name.clone();
                self.settings
                    .policy
                    .check_inline(params, size, &default_pool)?;
                (self.create_inline(&req.id, params, size, &req.auth)?, true)
            }
        };
        let staging = self.inline_staging(&vol.id);
        let result = self
            .stage_at(&mut vol, &staging, req.capability.mount_flags)
            .and_then(|()| {
                let device = sys::find_loop_for(&vol.file.path)?.ok_or_else(|| {
                    VolumeError::FailedPrecondition(format!(
                        "volume {} lost its loop device",
                        vol.id
                    ))
                })?;
                self.publish_staged(&mut vol, &device, &staging, target, req)
            });
        if let Err(e) = result {
            if created {
                // A refused first publish leaves nothing behind.
                if let Err(rollback) = self.teardown_inline(&vol) {
                    tracing::error!(volume.id = %vol.id, error = %rollback, "rollback of a failed inline publish failed; startup recovery will finish it");
                }
            }
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn create_inline(
        &self,
        id: &VolumeId,
        params: &VolumeParams,
        size: u64,
        auth: &PodAuth,
    ) -> Result<Volume, VolumeError> {
        let pool = self.pools.get(params.pool.as_deref())?;
        let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let disk = pool.place(HEADER_BYTES + size)?.ok_or_else(|| {
            VolumeError::ResourceExhausted(format!(
                "pool {} cannot hold an inline volume of {size} bytes",
                pool.name
            ))
        })?;
        let record = VolumeRecord {
            volume_id: id.to_string(),
            name: id.to_string(),
            capacity_bytes: size,
            lifecycle: Lifecycle::Ephemeral,
            pool: pool.name.clone(),
            fs_type: "ext4".into(),
            key_mode: params.key_mode,
            wipe: params.wipe,
            created_unix: now_unix(),
            formatted: false,
            kms: params.kms.clone(),
            on_revoke: params.on_revoke,
            owner: (!auth.pod_name.is_empty()).then(|| EventTarget {
                kind: "Pod".into(),
                namespace: auth.pod_namespace.clone(),
                name: auth.pod_name.clone(),
                uid: auth.pod_uid.clone(),
            }),
        };
        self.create_file(disk, &record)?;
        crash::point("inline.created");
        tracing::info!(volume.id = %id, pool = %pool.name, capacity = size, "inline volume created");
        self.load(id)?.ok_or_else(|| not_found(id))
    }

    pub(super) fn inline_staging(&self, id: &VolumeId) -> PathBuf {
        self.settings.state_dir.join(INLINE_DIR).join(id.as_str())
    }

    pub(super) fn teardown_inline(&self, vol: &Volume) -> Result<(), VolumeError> {
        let staging = self.inline_staging(&vol.id);
        self.unstage_at(vol, &staging)?;
        match std::fs::remove_dir(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("rmdir", &staging)(e)),
        }
        self.destroy(vol)
    }
}
