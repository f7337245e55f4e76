//! Continuous authorization of each publication: when it was last authorized, whether it is
//! failing transiently, and the lock and unlock of its volume as state transitions.

use std::path::Path;

use super::id::VolumeId;
use super::params::OnRevoke;
use super::publish::PublishRequest;
use super::release::{self, PodAuth};
use super::{Manager, Volume, VolumeError};
use crate::crypt;
use crate::sys;

#[derive(Debug, Clone, Copy)]
pub(super) struct Authorization {
    pub(super) last_ok: std::time::Instant,
    /// Since when re-authorization has failed for a transient reason.
    pub(super) failing_since: Option<std::time::Instant>,
}

impl Authorization {
    pub(super) fn now() -> Authorization {
        Authorization {
            last_ok: std::time::Instant::now(),
            failing_since: None,
        }
    }
}

impl Manager {
    /// Continuous authorization, on kubelet's periodic republish of a published target: when
    /// the last authorization of this publication is older than `--reauthorize-interval` (or
    /// the volume is locked), a real Key Vault call with the pod's current token decides.
    /// Refused: the volume locks (its key leaves the kernel; with `onRevoke: lock-and-unmount`
    /// the target is unmounted too) and the call is PERMISSION_DENIED. Transient failure: the
    /// volume stays usable until failures have lasted `--revoke-grace`, then locks. Authorized
    /// again: a locked volume gets its key back, data intact.
    pub(super) fn reauthorize_if_due(
        &self,
        vol: &Volume,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let now = std::time::Instant::now();
        let identifier = vol
            .record
            .kms
            .as_ref()
            .and_then(|k| k.key_identifier.clone());
        let locked = match &identifier {
            Some(i) => !crypt::key_present(staging, i)?,
            None => false,
        };
        let previous = self.authorization(&vol.id, target);
        let due = locked
            || previous.is_none_or(|a| {
                now.duration_since(a.last_ok) >= self.settings.reauthorize_interval
            });
        if !due {
            return self.release.confirm(&vol.id, &vol.record, &req.auth);
        }
        match self.release.reauthorize(&vol.id, &vol.record, &req.auth) {
            Ok(dek) => {
                if locked {
                    crypt::unlock(staging, dek.expose(), identifier.as_deref())?;
                    release::audit(
                        "unlock",
                        &vol.id,
                        Some(&req.auth),
                        vol.record.kms.as_ref(),
                        "ok",
                        now.elapsed(),
                    );
                    tracing::info!(volume.id = %vol.id, target.path = %target.display(), "authorized again: volume unlocked");
                }
                self.set_authorization(&vol.id, target, Authorization::now());
                Ok(())
            }
            Err(
                e @ (VolumeError::Unauthenticated(_)
                | VolumeError::PermissionDenied(_)
                | VolumeError::Corrupt(_)),
            ) => {
                self.lock_volume(vol, staging, target, &e, &req.auth)?;
                Err(VolumeError::PermissionDenied(format!(
                    "re-authorization refused, volume {} is locked: {e}",
                    vol.id
                )))
            }
            Err(VolumeError::Unavailable(reason)) => {
                let since = previous.and_then(|a| a.failing_since).unwrap_or(now);
                let last_ok = previous.map(|a| a.last_ok).unwrap_or(now);
                self.set_authorization(
                    &vol.id,
                    target,
                    Authorization {
                        last_ok,
                        failing_since: Some(since),
                    },
                );
                let failing_for = now.duration_since(since);
                if failing_for >= self.settings.revoke_grace && !locked {
                    let e = VolumeError::Unavailable(reason.clone());
                    self.lock_volume(vol, staging, target, &e, &req.auth)?;
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization has failed for {}s, longer than --revoke-grace: volume {} is locked ({reason})",
                        failing_for.as_secs(),
                        vol.id
                    )));
                }
                if locked {
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization failed ({reason}); volume {} stays locked until one succeeds",
                        vol.id
                    )));
                }
                Err(VolumeError::Unavailable(format!(
                    "re-authorization failed ({reason}); volume {} stays usable for {}s more",
                    vol.id,
                    self.settings
                        .revoke_grace
                        .saturating_sub(failing_for)
                        .as_secs()
                )))
            }
            Err(other) => Err(other),
        }
    }

    pub(super) fn lock_volume(
        &self,
        vol: &Volume,
        staging: &Path,
        target: &Path,
        why: &VolumeError,
        auth: &PodAuth,
    ) -> Result<(), VolumeError> {
        let start = std::time::Instant::now();
        release::evict(&vol.id, &vol.record, staging)?;
        if vol.record.on_revoke == OnRevoke::LockAndUnmount {
            sys::unmount(target, true)?;
        }
        release::audit(
            "lock",
            &vol.id,
            Some(auth),
            vol.record.kms.as_ref(),
            "locked",
            start.elapsed(),
        );
        self.release.pod_event(
            auth,
            "VolumeLocked",
            &format!(
                "sealvol locked volume {}: its key left the node because re-authorization failed: {why}",
                vol.id
            ),
        );
        tracing::warn!(volume.id = %vol.id, target.path = %target.display(), reason = %why, on_revoke = ?vol.record.on_revoke, "volume locked: its key left the kernel");
        Ok(())
    }

    pub(super) fn authorization(&self, id: &VolumeId, target: &Path) -> Option<Authorization> {
        let map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(&(id.clone(), target.to_path_buf())).copied()
    }

    pub(super) fn set_authorization(&self, id: &VolumeId, target: &Path, a: Authorization) {
        let mut map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.insert((id.clone(), target.to_path_buf()), a);
    }

    pub(super) fn forget_authorization(&self, id: &VolumeId, target: &Path) {
        let mut map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&(id.clone(), target.to_path_buf()));
    }
}
