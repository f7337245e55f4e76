//! Authorization of each publication, and the lock and unlock of its volume as state
//! transitions.
//!
//! A publication (volume, target path) is live from its first successful NodePublishVolume to
//! its NodeUnpublishVolume; a refused first publish is never live. Each live publication was
//! authorized by its own pod's unwrap and is re-authorized on kubelet's republish once
//! `--reauthorize-interval` has passed (a fresh Entra exchange and a real unwrap). fscrypt keys
//! belong to the whole filesystem, so a refusal evicts the volume's key for every publication
//! of it (files already open stay readable until closed; no new file opens), and the volume
//! stays locked while any live publication of it is refused: another publication's republish
//! or a new publish then fails FAILED_PRECONDITION naming the refused pod, until that pod is
//! unpublished or authorized again. The state is kept per volume in the state directory, so a
//! restarted driver neither lets another pod unlock a refused volume nor restarts the grace
//! clock. Locks, unlocks and denials are audited, evented and counted once per transition,
//! never per kubelet retry.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::id::VolumeId;
use super::params::OnRevoke;
use super::publish::PublishRequest;
use super::release::{self, PodAuth, Principal};
use super::{Manager, Volume, VolumeError, io_err, with_header_saves};
use crate::crypt;
use crate::keys::Dek;
use crate::sys::{self, AttachedLoop};

const AUTHORIZATIONS_DIR: &str = "authorizations";

/// What is known of one live publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Publication {
    pub(super) pod_namespace: String,
    pub(super) pod_name: String,
    pub(super) pod_uid: String,
    pub(super) service_account: String,
    /// When this publication's pod was last authorized by Key Vault (unix milliseconds).
    pub(super) last_ok_ms: u64,
    /// Since when re-authorization has failed for a transient reason.
    pub(super) failing_since_ms: Option<u64>,
    /// Set while this publication's re-authorization is refused: the volume is locked.
    pub(super) refused: Option<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Refusal {
    pub(super) since_ms: u64,
    pub(super) reason: String,
}

impl Publication {
    fn of(auth: &PodAuth) -> Publication {
        Publication {
            pod_namespace: auth.pod_namespace.clone(),
            pod_name: auth.pod_name.clone(),
            pod_uid: auth.pod_uid.clone(),
            service_account: auth.service_account.clone(),
            last_ok_ms: now_ms(),
            failing_since_ms: None,
            refused: None,
        }
    }

    fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// The live publications of one volume, by target path.
type Publications = BTreeMap<PathBuf, Publication>;

/// The node's authorization state: per volume, on disk, with a copy in memory.
pub(super) struct Authorizations {
    dir: PathBuf,
    volumes: Mutex<HashMap<VolumeId, Publications>>,
    /// The last refusal of a first publish per (volume, target), so that kubelet's retries of
    /// the same refusal are not audited again.
    denials: Mutex<HashMap<(VolumeId, PathBuf), String>>,
}

impl Authorizations {
    pub(super) fn new(state_dir: &Path) -> Authorizations {
        Authorizations {
            dir: state_dir.join(AUTHORIZATIONS_DIR),
            volumes: Mutex::new(HashMap::new()),
            denials: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The volume's publications (from disk the first time after a start). Callers hold the
    /// volume's guard.
    fn get(&self, id: &VolumeId) -> Result<Publications, VolumeError> {
        if let Some(p) = self.lock().get(id) {
            return Ok(p.clone());
        }
        let path = self.path(id);
        let loaded = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| VolumeError::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Publications::new(),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        self.lock().insert(id.clone(), loaded.clone());
        Ok(loaded)
    }

    /// Writes the volume's publications atomically (or removes the file when none is left).
    fn put(&self, id: &VolumeId, publications: Publications) -> Result<(), VolumeError> {
        let path = self.path(id);
        if publications.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        } else {
            std::fs::create_dir_all(&self.dir).map_err(io_err("mkdir", &self.dir))?;
            let tmp = path.with_extension("json.tmp");
            let text = serde_json::to_vec(&publications)
                .map_err(|e| VolumeError::Internal(e.to_string()))?;
            let file = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
            std::io::Write::write_all(&mut &file, &text).map_err(io_err("write", &tmp))?;
            file.sync_all().map_err(io_err("fsync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            sys::fsync_dir(&self.dir)?;
        }
        self.lock().insert(id.clone(), publications);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, Publications>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this refusal of a first publish is new (to be audited), and remembers it.
    fn new_denial(&self, id: &VolumeId, target: &Path, result: &str) -> bool {
        let mut denials = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id.clone(), target.to_path_buf());
        if denials.get(&key).is_some_and(|r| r == result) {
            return false;
        }
        denials.insert(key, result.to_string());
        true
    }

    fn forget_denial(&self, id: &VolumeId, target: &Path) {
        let mut denials = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        denials.remove(&(id.clone(), target.to_path_buf()));
    }
}

/// The live publications only: entries whose target no longer holds this volume are dropped.
fn live(publications: Publications, device: &AttachedLoop) -> Result<Publications, VolumeError> {
    let dev = device.dev;
    let mut out = Publications::new();
    for (target, p) in publications {
        if super::mounted_here(&target, dev)? == super::MountedHere::Data {
            out.insert(target, p);
        }
    }
    Ok(out)
}

/// The refused live publication other than `target`, if any: it keeps the volume locked.
fn refused_other<'a>(
    publications: &'a Publications,
    target: &Path,
) -> Option<(&'a PathBuf, &'a Publication)> {
    publications
        .iter()
        .find(|(t, p)| t.as_path() != target && p.refused.is_some())
}

fn locked_by(id: &VolumeId, target: &Path, p: &Publication) -> VolumeError {
    VolumeError::FailedPrecondition(format!(
        "volume {id} is locked: the re-authorization of pod {} (at {}) was refused; it stays locked until that pod is unpublished or authorized again",
        p.pod(),
        target.display()
    ))
}

/// Whether a re-authorization failure is a refusal (lock now) rather than trouble (grace).
fn is_refusal(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Unauthenticated(_)
            | VolumeError::PermissionDenied(_)
            | VolumeError::Corrupt(_)
    )
}

impl Manager {
    /// A first publish at `target`: the pod's own identity must unwrap the volume's key (see
    /// `KeyRelease::release`), and a volume locked by another live publication's refusal is
    /// not unlocked by it. Returns the key and who it was released to. Refusals are audited
    /// and evented once, not per kubelet retry.
    pub(super) fn authorize_first_publish(
        &self,
        vol: &mut Volume,
        device: &AttachedLoop,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(Dek, Principal), VolumeError> {
        let start = Instant::now();
        let publications = live(self.authorizations.get(&vol.id)?, device)?;
        if let Some((t, p)) = refused_other(&publications, target) {
            return Err(locked_by(&vol.id, t, p));
        }
        let principal = self.release.principal(
            vol.record.kms.as_ref().ok_or_else(|| no_kms(&vol.id))?,
            &req.auth,
        );
        let id = vol.id.clone();
        let released = principal.and_then(|principal| {
            with_header_saves(vol, |record, save| {
                let first = record.kms.as_ref().is_some_and(|k| k.wrapped.is_none());
                let dek = self
                    .release
                    .release(&id, record, &req.auth, &principal, false, save)?;
                Ok((dek, principal, first))
            })
        });
        let kms = vol.record.kms.clone();
        match released {
            Ok((dek, principal, first)) => {
                self.authorizations.forget_denial(&vol.id, target);
                let latency = start.elapsed();
                if first {
                    for event in ["generate", "wrap"] {
                        release::audit(
                            event,
                            &vol.id,
                            Some(&req.auth),
                            Some(&principal),
                            kms.as_ref(),
                            "ok",
                            latency,
                        );
                    }
                }
                release::audit(
                    "unwrap",
                    &vol.id,
                    Some(&req.auth),
                    Some(&principal),
                    kms.as_ref(),
                    "ok",
                    latency,
                );
                Ok((dek, principal))
            }
            Err(e) => {
                let result = release::result_of(&e);
                if self.authorizations.new_denial(&vol.id, target, result) {
                    release::audit(
                        "denial",
                        &vol.id,
                        Some(&req.auth),
                        None,
                        kms.as_ref(),
                        result,
                        start.elapsed(),
                    );
                    if !matches!(e, VolumeError::Unavailable(_)) {
                        self.release.pod_event(
                            &req.auth,
                            "KeyReleaseDenied",
                            &format!("sealvol refused volume {}'s key to this pod: {e}", vol.id),
                        );
                    }
                }
                Err(e)
            }
        }
    }

    /// Records a publication that has just become live.
    pub(super) fn publication_started(
        &self,
        id: &VolumeId,
        target: &Path,
        auth: &PodAuth,
    ) -> Result<(), VolumeError> {
        let mut publications = self.authorizations.get(id)?;
        publications.insert(target.to_path_buf(), Publication::of(auth));
        self.authorizations.put(id, publications)
    }

    /// Forgets a publication that has ended.
    pub(super) fn publication_ended(
        &self,
        id: &VolumeId,
        target: &Path,
    ) -> Result<(), VolumeError> {
        let mut publications = self.authorizations.get(id)?;
        self.authorizations.forget_denial(id, target);
        if publications.remove(target).is_some() {
            self.authorizations.put(id, publications)?;
        }
        Ok(())
    }

    /// Forgets every publication of a volume that is gone.
    pub(super) fn publications_gone(&self, id: &VolumeId) -> Result<(), VolumeError> {
        self.authorizations.put(id, Publications::new())
    }

    /// kubelet's periodic republish of a live publication: cheap when not due (the pod's token
    /// confirmed, from the Entra cache, no Key Vault call); when due, or while the volume is
    /// locked, a fresh exchange and a real unwrap decide. Refused: the volume locks
    /// (PERMISSION_DENIED). Transient failure: the volume stays usable until failures have
    /// lasted `--revoke-grace`, then locks (UNAVAILABLE). Authorized again: the refusal is
    /// lifted and, when no other live publication is refused, the key goes back.
    pub(super) fn reauthorize(
        &self,
        vol: &mut Volume,
        device: &AttachedLoop,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let mut publications = live(self.authorizations.get(&vol.id)?, device)?;
        let auth = &req.auth;
        let mut me = match publications.get(target) {
            Some(p)
                if p.pod_namespace != auth.pod_namespace
                    || p.service_account != auth.service_account =>
            {
                return Err(VolumeError::PermissionDenied(format!(
                    "target_path {} is published for service account {}/{}, not this pod's",
                    target.display(),
                    p.pod_namespace,
                    p.service_account
                )));
            }
            Some(p) => p.clone(),
            // Published before this driver kept state: due now.
            None => Publication {
                last_ok_ms: 0,
                ..Publication::of(auth)
            },
        };
        if me.refused.is_none()
            && let Some((t, p)) = refused_other(&publications, target)
        {
            return Err(locked_by(&vol.id, t, p));
        }
        let identifier = vol
            .record
            .kms
            .as_ref()
            .and_then(|k| k.key_identifier.clone());
        let key_in_kernel = match &identifier {
            Some(i) => crypt::key_present(staging, i)?,
            None => false,
        };
        let now = now_ms();
        let due = me.refused.is_some()
            || !key_in_kernel
            || now.saturating_sub(me.last_ok_ms) >= millis(self.settings.reauthorize_interval);
        let kms = vol.record.kms.clone().ok_or_else(|| no_kms(&vol.id))?;
        let principal = self.release.principal(&kms, auth);
        if !due {
            let principal = principal?;
            return self.release.confirm(&vol.id, &vol.record, auth, &principal);
        }
        let start = Instant::now();
        let id = vol.id.clone();
        let released = principal.and_then(|principal| {
            let dek = with_header_saves(vol, |record, save| {
                self.release
                    .release(&id, record, auth, &principal, true, save)
            })?;
            Ok((dek, principal))
        });
        match released {
            Ok((dek, principal)) => {
                let was_refused = me.refused.take().is_some();
                me.last_ok_ms = now;
                me.failing_since_ms = None;
                publications.insert(target.to_path_buf(), me);
                let still_locked = refused_other(&publications, target).is_some();
                self.authorizations.put(&vol.id, publications)?;
                release::audit(
                    "reauthorize",
                    &vol.id,
                    Some(auth),
                    Some(&principal),
                    Some(&kms),
                    "ok",
                    start.elapsed(),
                );
                if !key_in_kernel && !still_locked {
                    crypt::unlock(staging, dek.expose(), identifier.as_deref())?;
                    release::audit(
                        "unlock",
                        &vol.id,
                        Some(auth),
                        Some(&principal),
                        Some(&kms),
                        "ok",
                        start.elapsed(),
                    );
                    tracing::info!(volume.id = %vol.id, target.path = %target.display(), "authorized again: volume unlocked");
                } else if was_refused {
                    tracing::info!(volume.id = %vol.id, target.path = %target.display(), "authorized again; the volume stays locked by another refused publication");
                }
                self.rewrap(vol, &dek, auth, &principal);
                Ok(())
            }
            Err(e) if is_refusal(&e) => {
                let first_refusal = me.refused.is_none();
                if first_refusal {
                    release::audit(
                        "denial",
                        &vol.id,
                        Some(auth),
                        None,
                        Some(&kms),
                        release::result_of(&e),
                        start.elapsed(),
                    );
                    me.refused = Some(Refusal {
                        since_ms: now,
                        reason: e.to_string(),
                    });
                    publications.insert(target.to_path_buf(), me);
                    self.authorizations.put(&vol.id, publications)?;
                    self.lock_volume(vol, staging, target, &e, auth)?;
                }
                Err(VolumeError::PermissionDenied(format!(
                    "re-authorization refused, volume {} is locked: {e}",
                    vol.id
                )))
            }
            Err(VolumeError::Unavailable(reason)) => {
                let since = match me.failing_since_ms {
                    Some(s) => s,
                    None => {
                        me.failing_since_ms = Some(now);
                        publications.insert(target.to_path_buf(), me.clone());
                        self.authorizations.put(&vol.id, publications.clone())?;
                        now
                    }
                };
                let failing_for = Duration::from_millis(now.saturating_sub(since));
                if me.refused.is_some() || !key_in_kernel {
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization failed ({reason}); volume {} stays locked until one succeeds",
                        vol.id
                    )));
                }
                if failing_for >= self.settings.revoke_grace {
                    let e = VolumeError::Unavailable(reason.clone());
                    me.refused = Some(Refusal {
                        since_ms: now,
                        reason: format!(
                            "re-authorization failing for {}s: {reason}",
                            failing_for.as_secs()
                        ),
                    });
                    publications.insert(target.to_path_buf(), me);
                    self.authorizations.put(&vol.id, publications)?;
                    self.lock_volume(vol, staging, target, &e, auth)?;
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization has failed for {}s, longer than --revoke-grace: volume {} is locked ({reason})",
                        failing_for.as_secs(),
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

    /// The lock, once per refusal: the key leaves the kernel (for every publication of the
    /// volume), one audit line, one event, one count; with `onRevoke: evict` the pod is evicted.
    fn lock_volume(
        &self,
        vol: &Volume,
        staging: &Path,
        target: &Path,
        why: &VolumeError,
        auth: &PodAuth,
    ) -> Result<(), VolumeError> {
        let start = Instant::now();
        release::evict(&vol.id, &vol.record, staging)?;
        release::audit(
            "lock",
            &vol.id,
            Some(auth),
            None,
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
        if vol.record.on_revoke == OnRevoke::Evict {
            self.release.evict_pod(auth);
        }
        Ok(())
    }

    /// KEK rotation, on a due re-authorization (so that a first publish stays at two Key Vault
    /// calls): best effort, the old wrap stays valid when it fails.
    fn rewrap(&self, vol: &mut Volume, dek: &Dek, auth: &PodAuth, principal: &Principal) {
        let id = vol.id.clone();
        let result = with_header_saves(vol, |record, save| {
            self.release
                .rewrap_if_rotated(&id, record, dek, auth, principal, save)
        });
        if let Err(e) = result {
            tracing::warn!(volume.id = %vol.id, error = %e, "the DEK could not be re-wrapped under the KEK's current version; the old wrap stays");
        }
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn no_kms(id: &VolumeId) -> VolumeError {
    VolumeError::Corrupt(format!("volume {id} is encrypted but has no key record"))
}
