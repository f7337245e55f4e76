//! Identity-gated key release, in order: the pod's token, the Entra exchange (cached), the Key
//! Vault call that wraps or unwraps the volume's key with the pod's access token, the key into
//! the filesystem; and the reverse, eviction. One audit line per key event (generate, wrap,
//! unwrap, evict, wipe, denial) with who, what, result and latency; never a token or key byte.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypt;
use crate::identity::{Entra, IdentityError, KubeApi, PodToken};
use crate::keys::{Dek, KeyVault, KmsRecord};
use crate::sys::Removal;

use super::VolumeError;
use super::header::{EventTarget, VolumeRecord};
use super::id::VolumeId;

/// What the publishing pod brings: its token (or why there is none) and who it is.
#[derive(Debug, Clone)]
pub(crate) struct PodAuth {
    pub(crate) token: Result<PodToken, String>,
    pub(crate) pod_name: String,
    pub(crate) pod_namespace: String,
    pub(crate) pod_uid: String,
}

impl PodAuth {
    fn token(&self) -> Result<&PodToken, VolumeError> {
        self.token
            .as_ref()
            .map_err(|e| VolumeError::Unauthenticated(e.clone()))
    }
}

/// The services key release calls, and how.
pub(crate) struct KeyRelease {
    pub(crate) entra: Entra,
    pub(crate) vault: KeyVault,
    pub(crate) default_tenant: Option<String>,
    /// Where ServiceAccount annotations are read and events posted, in a cluster.
    pub(crate) kube: Option<Arc<KubeApi>>,
    pub(crate) runtime: tokio::runtime::Handle,
}

/// The associated data that binds a keyvault-secret wrap to its volume and header format.
fn aad(id: &VolumeId) -> Vec<u8> {
    format!("sealvol|{id}|header-v1").into_bytes()
}

pub(crate) fn audit(
    event: &str,
    id: &VolumeId,
    auth: Option<&PodAuth>,
    kms: Option<&KmsRecord>,
    result: &str,
    latency: Duration,
) {
    crate::metrics::metrics().key_event(event, result);
    let token = auth.and_then(|a| a.token.as_ref().ok());
    tracing::info!(
        target: "sealvol::audit",
        event,
        volume.id = %id,
        pod.namespace = auth.map(|a| a.pod_namespace.as_str()).or(token.map(|t| t.namespace())).unwrap_or(""),
        pod.name = auth.map(|a| a.pod_name.as_str()).unwrap_or(""),
        pod.service_account = token.map(|t| t.service_account()).unwrap_or(""),
        identity.client_id = kms.and_then(|k| k.client_id.as_deref()).unwrap_or(""),
        vault = kms.map(|k| k.vault_url.as_str()).unwrap_or(""),
        key = kms.map(|k| k.kek_name()).unwrap_or_default(),
        result,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "audit"
    );
}

fn audit_denial(id: &VolumeId, auth: &PodAuth, kms: &KmsRecord, e: &VolumeError, start: Instant) {
    audit(
        "denial",
        id,
        Some(auth),
        Some(kms),
        &result_of(e),
        start.elapsed(),
    );
}

/// Denials worth an event on the pod: the identity's, not Azure's passing trouble.
fn is_denial(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Unauthenticated(_)
            | VolumeError::PermissionDenied(_)
            | VolumeError::FailedPrecondition(_)
    )
}

fn result_of(e: &VolumeError) -> String {
    let code = match e {
        VolumeError::Unauthenticated(_) => "unauthenticated",
        VolumeError::PermissionDenied(_) => "permission_denied",
        VolumeError::Unavailable(_) => "unavailable",
        _ => "error",
    };
    code.to_string()
}

impl KeyRelease {
    /// Tenant and client id: the volume's parameters first, then the pod's ServiceAccount
    /// annotations (in a cluster), then `--tenant-id` for the tenant.
    fn identity(&self, kms: &KmsRecord, auth: &PodAuth) -> Result<(String, String), VolumeError> {
        let needed = kms.client_id.is_none() || kms.tenant_id.is_none();
        let annotations = match (&self.kube, needed) {
            (Some(kube), true) => {
                let token = auth.token()?;
                match self
                    .runtime
                    .block_on(kube.annotations(token.namespace(), token.service_account()))
                {
                    Ok(a) => Some(a),
                    // The volume names its client: the lookup could only have changed the
                    // tenant, so go on with the default one rather than fail the pod.
                    Err(e) if kms.client_id.is_some() => {
                        tracing::warn!(error = %e, "ServiceAccount annotations unavailable; using the volume's clientID and the default tenant");
                        None
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => None,
        };
        let tenant = kms
            .tenant_id
            .clone()
            .or_else(|| annotations.as_ref().and_then(|a| a.tenant_id.clone()))
            .or_else(|| self.default_tenant.clone())
            .ok_or(IdentityError::NoTenantId)?;
        let client = kms
            .client_id
            .clone()
            .or_else(|| annotations.and_then(|a| a.client_id))
            .ok_or(IdentityError::NoClientId)?;
        Ok((tenant, client))
    }

    /// A republish of a volume already published at the target: the pod's token must still be
    /// valid and exchangeable (from the cache when warm); no Key Vault call.
    pub(crate) fn confirm(
        &self,
        id: &VolumeId,
        record: &VolumeRecord,
        auth: &PodAuth,
    ) -> Result<(), VolumeError> {
        let kms = record.kms.as_ref().ok_or_else(|| {
            VolumeError::Corrupt(format!("volume {id} is encrypted but has no key record"))
        })?;
        let start = Instant::now();
        let checked = self.identity(kms, auth).and_then(|(tenant, client)| {
            let token = auth.token()?;
            self.runtime
                .block_on(self.entra.access_token(&tenant, &client, token))
                .map(|_| ())
                .map_err(VolumeError::from)
        });
        if let Err(e) = &checked {
            audit_denial(id, auth, kms, e, start);
            if is_denial(e) {
                self.pod_event(
                    auth,
                    "KeyReleaseDenied",
                    &format!("sealvol refused volume {id} to this pod: {e}"),
                );
            }
        }
        checked
    }

    /// Gets the volume's key with the pod's identity (generating and wrapping it on the first
    /// publish, recording the wrap in `record`), adds it to the filesystem at `fs_root` and
    /// makes sure `data/` is encrypted under it. `save` persists `record` (before the key is
    /// used for the first time). The plaintext key is gone when this returns.
    pub(crate) fn unlock(
        &self,
        id: &VolumeId,
        record: &mut VolumeRecord,
        fs_root: &Path,
        auth: &PodAuth,
        save: impl FnOnce(&VolumeRecord) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let kms = record.kms.clone().ok_or_else(|| {
            VolumeError::Corrupt(format!("volume {id} is encrypted but has no key record"))
        })?;
        let start = Instant::now();
        let result = self.unlock_inner(id, record, &kms, fs_root, auth, save);
        if let Err(e) = &result {
            audit_denial(id, auth, &kms, e, start);
            if is_denial(e) {
                self.pod_event(
                    auth,
                    "KeyReleaseDenied",
                    &format!("sealvol refused volume {id}'s key to this pod: {e}"),
                );
            }
        }
        result
    }

    fn unlock_inner(
        &self,
        id: &VolumeId,
        record: &mut VolumeRecord,
        kms: &KmsRecord,
        fs_root: &Path,
        auth: &PodAuth,
        save: impl FnOnce(&VolumeRecord) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let (tenant, client) = self.identity(kms, auth)?;
        let token =
            self.runtime
                .block_on(self.entra.access_token(&tenant, &client, auth.token()?))?;
        let aad = aad(id);
        let dek = match &kms.wrapped {
            None => {
                let start = Instant::now();
                let dek = Dek::generate()?;
                audit("generate", id, Some(auth), Some(kms), "ok", start.elapsed());
                let start = Instant::now();
                let wrapped = self
                    .runtime
                    .block_on(self.vault.wrap(kms, &token, &dek, &aad))?;
                audit("wrap", id, Some(auth), Some(kms), "ok", start.elapsed());
                if let Some(k) = record.kms.as_mut() {
                    k.wrapped = Some(wrapped);
                }
                save(record)?;
                dek
            }
            Some(_) => {
                let start = Instant::now();
                let dek = self
                    .runtime
                    .block_on(self.vault.unwrap(kms, &token, &aad))?;
                audit("unwrap", id, Some(auth), Some(kms), "ok", start.elapsed());
                dek
            }
        };
        let identifier = crypt::unlock(fs_root, dek.expose(), kms.key_identifier.as_deref())?;
        drop(dek);
        if kms.key_identifier.is_none()
            && let Some(k) = record.kms.as_mut()
        {
            k.key_identifier = Some(identifier);
        }
        Ok(())
    }
}

impl KeyRelease {
    /// Posts a Warning event on the publishing pod (in a cluster), in the background: an
    /// operator sees why the pod's volume failed or stopped with `kubectl describe pod`.
    pub(crate) fn pod_event(&self, auth: &PodAuth, reason: &str, message: &str) {
        if auth.pod_name.is_empty() || auth.pod_namespace.is_empty() {
            return;
        }
        let target = EventTarget {
            kind: "Pod".into(),
            namespace: auth.pod_namespace.clone(),
            name: auth.pod_name.clone(),
            uid: auth.pod_uid.clone(),
        };
        self.event(&target, "Warning", reason, message);
    }

    /// Posts an event on `target` in the background.
    pub(crate) fn event(
        &self,
        target: &EventTarget,
        event_type: &str,
        reason: &str,
        message: &str,
    ) {
        let Some(kube) = self.kube.clone() else {
            return;
        };
        let (target, event_type, reason, message) = (
            target.clone(),
            event_type.to_string(),
            reason.to_string(),
            message.to_string(),
        );
        self.runtime.spawn(async move {
            if let Err(e) = kube
                .event(
                    &target.kind,
                    &target.namespace,
                    &target.name,
                    &target.uid,
                    &event_type,
                    &reason,
                    &message,
                )
                .await
            {
                tracing::warn!(object = %target.name, error = %e, "could not post the event");
            }
        });
    }

    /// A due re-authorization: a fresh Entra exchange and a real Key Vault unwrap with the
    /// pod's current token, the result checked against the key identifier in the header.
    /// Returns the key (for a locked volume to be unlocked again); refusals are audited.
    pub(crate) fn reauthorize(
        &self,
        id: &VolumeId,
        record: &VolumeRecord,
        auth: &PodAuth,
    ) -> Result<Dek, VolumeError> {
        let kms = record.kms.as_ref().ok_or_else(|| {
            VolumeError::Corrupt(format!("volume {id} is encrypted but has no key record"))
        })?;
        let start = Instant::now();
        let result = self.identity(kms, auth).and_then(|(tenant, client)| {
            let token = self.runtime.block_on(self.entra.fresh_access_token(
                &tenant,
                &client,
                auth.token()?,
            ))?;
            let dek = self
                .runtime
                .block_on(self.vault.unwrap(kms, &token, &aad(id)))?;
            let derived = crypt::identifier_for(dek.expose())?;
            if kms
                .key_identifier
                .as_deref()
                .is_some_and(|recorded| recorded != derived)
            {
                return Err(VolumeError::Corrupt(format!(
                    "volume {id}: the unwrapped key does not match the header"
                )));
            }
            Ok(dek)
        });
        match &result {
            Ok(_) => audit(
                "reauthorize",
                id,
                Some(auth),
                Some(kms),
                "ok",
                start.elapsed(),
            ),
            Err(e) => audit_denial(id, auth, kms, e, start),
        }
        result
    }
}

/// Removes the volume's key from its filesystem (mounted at `fs_root`), with an audit line.
/// A volume whose key never reached the kernel has nothing to evict.
pub(crate) fn evict(
    id: &VolumeId,
    record: &VolumeRecord,
    fs_root: &Path,
) -> Result<(), VolumeError> {
    let Some(kms) = record.kms.as_ref() else {
        return Ok(());
    };
    let Some(identifier) = kms.key_identifier.as_deref() else {
        return Ok(());
    };
    let start = Instant::now();
    let outcome = crypt::evict(fs_root, identifier)?;
    let result = match outcome {
        Removal::Removed => "ok",
        Removal::Absent => "already_absent",
        Removal::FilesBusy => {
            tracing::warn!(volume.id = %id, "key secret wiped; inodes still in use (open files, or a mounted target) keep theirs until released");
            "files_busy"
        }
    };
    if outcome != Removal::Absent {
        audit("evict", id, None, Some(kms), result, start.elapsed());
    }
    Ok(())
}
