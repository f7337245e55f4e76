//! Identity-gated key release: who the publishing pod is, and the Azure calls made with its own
//! token. Entra exchanges the pod's service-account token for an access token scoped to the
//! volume's vault (cached per pod token and scope); Key Vault wraps or unwraps the volume's DEK
//! with that access token and no other. The unwrap is the authorization check: a pod gets a key
//! only from its own identity's unwrap. Nothing here decides what a refusal does to a volume
//! (`authorization.rs` does) and nothing here logs a token or a key byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypt;
use crate::identity::{Entra, IdentityError, KubeApi, PodToken};
use crate::keys::{Bearer, Dek, KeyError, KeyVault, KmsRecord};
use crate::sys::Removal;

use super::VolumeError;
use super::header::{EventTarget, VolumeRecord};
use super::id::VolumeId;

/// What the publishing pod brings: its token (or why there is none) and who kubelet says it
/// is (podInfoOnMount).
#[derive(Debug, Clone)]
pub(crate) struct PodAuth {
    pub(crate) token: Result<PodToken, String>,
    pub(crate) pod_name: String,
    pub(crate) pod_namespace: String,
    pub(crate) pod_uid: String,
    pub(crate) service_account: String,
}

impl PodAuth {
    /// The pod's token, which must name the service account kubelet says the pod runs as.
    fn token(&self) -> Result<&PodToken, VolumeError> {
        let token = self
            .token
            .as_ref()
            .map_err(|e| VolumeError::Unauthenticated(e.clone()))?;
        if self.pod_namespace.is_empty() || self.service_account.is_empty() {
            return Err(VolumeError::FailedPrecondition(
                "kubelet passed no csi.storage.k8s.io/pod.namespace or serviceAccount.name: set podInfoOnMount: true on the CSIDriver".into(),
            ));
        }
        if token.namespace() != self.pod_namespace
            || token.service_account() != self.service_account
        {
            return Err(VolumeError::Unauthenticated(
                "the token's subject is not the publishing pod's service account".into(),
            ));
        }
        Ok(token)
    }

    /// "namespace/pod", for messages.
    pub(crate) fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// The identity a key was released to (or refused to), for audit lines.
#[derive(Debug, Clone, Default)]
pub(crate) struct Principal {
    pub(crate) tenant: String,
    pub(crate) client_id: String,
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
fn aad(id: &str) -> Vec<u8> {
    format!("sealvol|{id}|header-v1").into_bytes()
}

/// The associated data the volume's wrapped DEK is sealed with: bound to the volume it was
/// wrapped for, which for a restore or clone is its source.
fn bound_aad(id: &VolumeId, record: &VolumeRecord) -> Vec<u8> {
    aad(record.key_bound_to.as_deref().unwrap_or(id.as_str()))
}

/// One audit line (target `sealvol::audit`) and the key-event counter: who, what, result,
/// latency. Called once per state transition, never per retry.
pub(crate) fn audit(
    event: &str,
    id: &VolumeId,
    auth: Option<&PodAuth>,
    principal: Option<&Principal>,
    kms: Option<&KmsRecord>,
    result: &str,
    latency: Duration,
) {
    crate::metrics::metrics().key_event(event, result);
    tracing::info!(
        target: "sealvol::audit",
        event,
        volume.id = %id,
        pod.namespace = auth.map(|a| a.pod_namespace.as_str()).unwrap_or(""),
        pod.name = auth.map(|a| a.pod_name.as_str()).unwrap_or(""),
        pod.service_account = auth.map(|a| a.service_account.as_str()).unwrap_or(""),
        identity.tenant_id = principal.map(|p| p.tenant.as_str()).unwrap_or(""),
        identity.client_id = principal.map(|p| p.client_id.as_str()).unwrap_or(""),
        vault = kms.map(|k| k.vault_url.as_str()).unwrap_or(""),
        key = kms.map(|k| k.kek_name()).unwrap_or_default(),
        result,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "audit"
    );
}

/// The result word of an audit line for a refusal.
pub(crate) fn result_of(e: &VolumeError) -> &'static str {
    match e {
        VolumeError::Unauthenticated(_) => "unauthenticated",
        VolumeError::PermissionDenied(_) => "permission_denied",
        VolumeError::Unavailable(_) => "unavailable",
        VolumeError::FailedPrecondition(_) => "failed_precondition",
        _ => "error",
    }
}

fn kms_of<'a>(id: &VolumeId, record: &'a VolumeRecord) -> Result<&'a KmsRecord, VolumeError> {
    record.kms.as_ref().ok_or_else(|| {
        VolumeError::Corrupt(format!("volume {id} is encrypted but has no key record"))
    })
}

impl KeyRelease {
    /// Tenant and client id: the volume's parameters first, then the pod's ServiceAccount
    /// annotations (in a cluster), then `--tenant-id` for the tenant.
    pub(crate) fn principal(
        &self,
        kms: &KmsRecord,
        auth: &PodAuth,
    ) -> Result<Principal, VolumeError> {
        let token = auth.token()?;
        let needed = kms.client_id.is_none() || kms.tenant_id.is_none();
        let annotations = match (&self.kube, needed) {
            (Some(kube), true) => {
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
        let client_id = kms
            .client_id
            .clone()
            .or_else(|| annotations.and_then(|a| a.client_id))
            .ok_or(IdentityError::NoClientId)?;
        Ok(Principal { tenant, client_id })
    }

    /// A republish that is not due: the pod's token must still be valid and exchangeable
    /// (from the cache when warm). No Key Vault call.
    pub(crate) fn confirm(
        &self,
        id: &VolumeId,
        record: &VolumeRecord,
        auth: &PodAuth,
        principal: &Principal,
    ) -> Result<(), VolumeError> {
        let kms = kms_of(id, record)?;
        let scope = self.runtime.block_on(self.vault.scope(kms))?;
        self.runtime.block_on(self.entra.access_token(
            &principal.tenant,
            &principal.client_id,
            auth.token()?,
            &scope,
        ))?;
        Ok(())
    }

    /// The volume's key, released to this pod's own identity. On the first publish of a fresh
    /// volume the DEK is generated, wrapped (the wrap recorded through `save` before the key is
    /// used) and then unwrapped by the pod's identity and compared: Key Vault allows wrapKey on
    /// a disabled key and to principals with read access only, so only the unwrap proves the
    /// pod may have the key. With `fresh`, the Entra exchange ignores the cache (a due
    /// re-authorization must notice a deleted federated credential).
    pub(crate) fn release(
        &self,
        id: &VolumeId,
        record: &mut VolumeRecord,
        auth: &PodAuth,
        principal: &Principal,
        fresh: bool,
        save: impl FnOnce(&VolumeRecord) -> Result<(), VolumeError>,
    ) -> Result<Dek, VolumeError> {
        let kms = kms_of(id, record)?.clone();
        // A new wrap is bound to this volume; an existing one to whom it was made for.
        let aad = match &kms.wrapped {
            Some(_) => bound_aad(id, record),
            None => aad(id.as_str()),
        };
        let pod = auth.token()?;
        let scope = self.runtime.block_on(self.vault.scope(&kms))?;
        let exchange = |fresh: bool| {
            let (tenant, client) = (&principal.tenant, &principal.client_id);
            self.runtime.block_on(async {
                if fresh {
                    self.entra
                        .fresh_access_token(tenant, client, pod, &scope)
                        .await
                } else {
                    self.entra.access_token(tenant, client, pod, &scope).await
                }
            })
        };
        let mut token = exchange(fresh)?;
        let mut retried = fresh;
        loop {
            let bearer = Bearer(token.token.secret());
            let attempt = self.runtime.block_on(async {
                match &kms.wrapped {
                    Some(_) => self
                        .vault
                        .unwrap(&kms, &bearer, &aad)
                        .await
                        .map(|d| (d, None)),
                    None => {
                        let dek = Dek::generate()?;
                        let wrapped = self.vault.wrap(&kms, &bearer, &dek, &aad).await?;
                        Ok((dek, Some(wrapped)))
                    }
                }
            });
            match attempt {
                // A cached token Key Vault no longer takes: one more try with a fresh one.
                Err(KeyError::Unauthenticated(_)) if !retried => {
                    retried = true;
                    token = exchange(true)?;
                }
                Err(e) => return Err(e.into()),
                Ok((dek, None)) => {
                    check_identifier(id, &kms, &dek)?;
                    return Ok(dek);
                }
                Ok((dek, Some(wrapped))) => {
                    let mut with_wrap = kms.clone();
                    with_wrap.wrapped = Some(wrapped);
                    record.kms = Some(with_wrap.clone());
                    record.key_bound_to = None;
                    save(record)?;
                    let proved = self.runtime.block_on(self.vault.unwrap(
                        &with_wrap,
                        &Bearer(token.token.secret()),
                        &aad,
                    ))?;
                    if proved.expose() != dek.expose() {
                        return Err(VolumeError::Corrupt(format!(
                            "volume {id}: Key Vault unwrapped a different key than it wrapped"
                        )));
                    }
                    return Ok(dek);
                }
            }
        }
    }

    /// Re-wraps the volume's DEK under the KEK's current enabled version when the KEK is not
    /// pinned and has moved on (a key rotated, a secret given a new version), with the pod's
    /// identity; the header is updated through `save` (one atomic header write). Returns
    /// whether it re-wrapped.
    pub(crate) fn rewrap_if_rotated(
        &self,
        id: &VolumeId,
        record: &mut VolumeRecord,
        dek: &Dek,
        auth: &PodAuth,
        principal: &Principal,
        save: impl FnOnce(&VolumeRecord) -> Result<(), VolumeError>,
    ) -> Result<bool, VolumeError> {
        let kms = kms_of(id, record)?.clone();
        let Some(wrapped) = &kms.wrapped else {
            return Ok(false);
        };
        if kms.key_version.is_some() {
            return Ok(false);
        }
        let scope = self.runtime.block_on(self.vault.scope(&kms))?;
        let token = self.runtime.block_on(self.entra.access_token(
            &principal.tenant,
            &principal.client_id,
            auth.token()?,
            &scope,
        ))?;
        let bearer = Bearer(token.token.secret());
        let rewrapped = if kms.secret_name.is_some() {
            // Sealing with the secret's newest version says which version that is.
            let sealed =
                self.runtime
                    .block_on(self.vault.wrap(&kms, &bearer, dek, &aad(id.as_str())))?;
            if sealed.kek_version == wrapped.kek_version {
                return Ok(false);
            }
            sealed
        } else {
            let current = self
                .runtime
                .block_on(self.vault.current_key_version(&kms, &bearer))?;
            let Some(current) = current.filter(|c| *c != wrapped.kek_version) else {
                return Ok(false);
            };
            let mut pinned = kms.clone();
            pinned.key_version = Some(current);
            self.runtime
                .block_on(self.vault.wrap(&pinned, &bearer, dek, &aad(id.as_str())))?
        };
        let from = wrapped.kek_version.clone();
        let to = rewrapped.kek_version.clone();
        let mut updated = kms;
        updated.wrapped = Some(rewrapped);
        record.kms = Some(updated);
        // Wrapped again, for this volume.
        record.key_bound_to = None;
        save(record)?;
        tracing::info!(volume.id = %id, kek.from = %from, kek.to = %to, "DEK re-wrapped under the KEK's current version");
        Ok(true)
    }

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

    /// Asks the API server to evict the pod (the Eviction API, so disruption budgets hold), in
    /// the background. Without a Kubernetes API there is nobody to ask.
    pub(crate) fn evict_pod(&self, auth: &PodAuth) {
        let Some(kube) = self.kube.clone() else {
            tracing::warn!(pod = %auth.pod(), "onRevoke evict: no Kubernetes API to evict the pod through");
            return;
        };
        let (namespace, name) = (auth.pod_namespace.clone(), auth.pod_name.clone());
        self.runtime.spawn(async move {
            match kube.evict(&namespace, &name).await {
                Ok(()) => tracing::info!(pod.namespace = %namespace, pod.name = %name, "revoked pod evicted"),
                Err(e) => tracing::warn!(pod.namespace = %namespace, pod.name = %name, error = %e, "could not evict the revoked pod"),
            }
        });
    }
}

/// A later unwrap must give the key the filesystem was set up with.
fn check_identifier(id: &VolumeId, kms: &KmsRecord, dek: &Dek) -> Result<(), VolumeError> {
    let Some(recorded) = kms.key_identifier.as_deref() else {
        return Ok(());
    };
    if crypt::identifier_for(dek.expose())? != recorded {
        return Err(VolumeError::Corrupt(format!(
            "volume {id}: the unwrapped key does not match the header"
        )));
    }
    Ok(())
}

/// Removes the volume's key from its filesystem (mounted at `fs_root`), with an audit line.
/// A volume whose key never reached the kernel has nothing to evict.
pub(crate) fn evict(
    id: &VolumeId,
    record: &VolumeRecord,
    fs_root: &std::path::Path,
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
        audit("evict", id, None, None, Some(kms), result, start.elapsed());
    }
    Ok(())
}
