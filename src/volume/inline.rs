//! CSI inline ephemeral volumes: created, staged under the state directory and published by
//! their NodePublishVolume; unstaged, wiped and deleted by their last NodeUnpublishVolume, or
//! by a timer when their first publish failed and kubelet's retries never succeeded.

use std::path::{Path, PathBuf};

use super::authorization::now_ms;
use super::header::{EventTarget, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::params::{Lifecycle, VolumeParams};
use super::publish::PublishRequest;
use super::release::PodAuth;
use super::{
    INLINE_DIR, Manager, Volume, VolumeError, crash, io_err, not_found, now_unix, publications,
    staged_at,
};
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
        if let Err(e) = self.stage_at(&mut vol, &staging, req.capability.mount_flags) {
            if created {
                self.roll_back_inline(&vol);
            }
            return Err(e);
        }
        let published = staged_at(&vol.file.path, &staging)?
            .ok_or_else(|| {
                VolumeError::FailedPrecondition(format!("volume {} lost its loop device", vol.id))
            })
            .and_then(|device| self.publish_staged(&mut vol, &device, &staging, target, req));
        match (published, vol.record.refused_since_ms) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(_)) => {
                vol.record.refused_since_ms = None;
                self.save(&mut vol)
            }
            // kubelet retries a failed first publish with backoff and never unpublishes it:
            // keep the staged volume (keyless: a failed publish leaves no key) for the retries
            // instead of creating, formatting and wiping it on each, until the TTL removes it.
            (Err(e), None) if is_key_refusal(&e) && !self.has_publications(&vol)? => {
                vol.record.refused_since_ms = Some(now_ms());
                if let Err(save) = self.save(&mut vol) {
                    tracing::error!(volume.id = %vol.id, error = %save, "could not record the refused inline volume; removing it");
                    self.roll_back_inline(&vol);
                    return Err(e);
                }
                tracing::warn!(volume.id = %vol.id, error = %e, ttl = ?self.settings.refused_inline_ttl, "inline volume kept keyless for kubelet's retries after its first publish failed");
                Err(e)
            }
            (Err(e), _) => {
                if created {
                    self.roll_back_inline(&vol);
                }
                Err(e)
            }
        }
    }

    fn has_publications(&self, vol: &Volume) -> Result<bool, VolumeError> {
        let table = sys::MountTable::read()?;
        Ok(self
            .loops
            .find(&vol.file.path)?
            .is_some_and(|l| publications(&table, &l).next().is_some()))
    }

    /// Undoes a half-made inline volume; what fails here, startup recovery finishes.
    fn roll_back_inline(&self, vol: &Volume) {
        if let Err(rollback) = self.teardown_inline(vol) {
            tracing::error!(volume.id = %vol.id, error = %rollback, "rollback of a failed inline publish failed; startup recovery will finish it");
        }
    }

    /// Removes the inline volumes whose first publish failed longer than
    /// `--refused-inline-ttl` ago and that were never published since; returns how many. Run
    /// periodically: kubelet never unpublishes a volume it could not publish.
    pub(crate) fn remove_expired_refused_inline(&self) -> Result<usize, VolumeError> {
        let ttl = u64::try_from(self.settings.refused_inline_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut removed = 0;
        let ids: Vec<String> = self
            .pools
            .disks()
            .map(|(_, disk)| disk.volume_ids())
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        let expired = |vol: &Volume| {
            vol.record.lifecycle == Lifecycle::Ephemeral
                && vol
                    .record
                    .refused_since_ms
                    .is_some_and(|since| now_ms().saturating_sub(since) >= ttl)
        };
        for id in ids {
            let Ok(id) = VolumeId::parse(&id) else {
                continue;
            };
            // Headers are read without the guard first (a header write is atomic), so the
            // sweep never holds up a call on another volume.
            if !self
                .load(&id)
                .ok()
                .flatten()
                .is_some_and(|vol| expired(&vol))
            {
                continue;
            }
            // A volume busy with a call is looked at on the next round.
            let Ok(_guard) = self.lock(&id) else { continue };
            let Some(vol) = self.load(&id)?.filter(expired) else {
                continue;
            };
            if self.has_publications(&vol)? {
                continue;
            }
            self.teardown_inline(&vol)?;
            removed += 1;
            tracing::info!(volume.id = %id, ttl = ?self.settings.refused_inline_ttl, "removed an inline volume whose first publish failed and was not retried successfully within the TTL");
        }
        Ok(removed)
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
        let disk = pool.place(HEADER_BYTES + size)?.0.ok_or_else(|| {
            VolumeError::ResourceExhausted(format!(
                "pool {} cannot hold an inline volume of {size} bytes",
                pool.name
            ))
        })?;
        let record = VolumeRecord {
            refused_since_ms: None,
            source: None,
            grow_filesystem: false,
            key_bound_to: None,
            backup: None,
            volume_id: id.to_string(),
            name: id.to_string(),
            capacity_bytes: size,
            lifecycle: Lifecycle::Ephemeral,
            pool: pool.name.clone(),
            fs_type: "ext4".into(),
            key_mode: params.key_mode,
            wipe: params.wipe,
            provisioning: params.provisioning,
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

/// Whether `e` is the key release's answer (a refused or unavailable identity or vault), which
/// kubelet keeps retrying, rather than a fault of the request.
fn is_key_refusal(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Unauthenticated(_)
            | VolumeError::PermissionDenied(_)
            | VolumeError::Unavailable(_)
    )
}
