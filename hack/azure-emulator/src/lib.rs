//! sealvol-azure-emulator: the parts of Entra ID, Key Vault and Managed HSM that sealvol uses,
//! emulated over HTTPS on 127.0.0.1 faithfully enough that Microsoft's own SDKs work against
//! it, plus a fake Kubernetes service-account issuer to play kubelet. Test and demo infrastructure only: the
//! sealvol node plugin never depends on this crate.
//!
//! URLs, all under one base `https://127.0.0.1:PORT`:
//! - Entra ID authority host: the base itself (`/{tenant}/oauth2/v2.0/token`, ...);
//! - fake issuer `NAME`: `/issuers/NAME` (discovery and JWKS below it);
//! - vault `NAME`: its own port, `https://127.0.0.1:VAULTPORT` (chosen by the Host header, so
//!   key and secret ids have the exact shape the SDKs parse);
//! - Managed HSM `NAME`: likewise its own port, `https://127.0.0.1:HSMPORT`, taking tokens for
//!   `https://managedhsm.azure.net` only;
//! - Blob storage account `NAME` (served by Azurite, a child process, behind the emulator's RBAC
//!   gateway): `https://127.0.0.1:BLOBPORT/NAME`, path-style, taking tokens for
//!   `https://storage.azure.com`;
//! - control plane (with `--admin`): `/_emulator/`.

// Handlers return an early `Response` as the error of small helpers: the idiom of axum code.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod azurite;
pub mod blob;
pub mod config;
pub mod crypto;
pub mod entra;
pub mod faults;
pub mod issuer;
pub mod keyvault;
pub mod rbac;
pub mod records;
pub mod server;
pub mod state;
pub mod tls;

use std::time::Duration;

pub use config::{
    Config, FederatedCredential, HsmConfig, Identity, KeyConfig, KeySpec, RoleAssignment,
    StorageAccountConfig, VaultConfig,
};
pub use faults::{FaultKind, FaultSpec};
pub use issuer::TokenRequest;
pub use rbac::BlobAccess;
pub use records::RequestRecord;
pub use server::{Emulator, Options, Service};

impl Emulator {
    /// Mints a service-account token from fake issuer `issuer`, as kubelet receives one.
    pub fn mint_token(&self, issuer: &str, req: &TokenRequest) -> Result<String, String> {
        issuer::mint(&self.shared, issuer, req)
    }

    /// Adds a role assignment; takes effect on the next call (after the propagation delay,
    /// when one is set).
    pub fn assign_role(&self, ra: RoleAssignment) {
        self.shared.lock().change_role(ra, true);
    }

    /// Removes a role assignment; takes effect on the next call (after the propagation delay,
    /// when one is set). Whether there was such an assignment.
    pub fn revoke_role(&self, ra: &RoleAssignment) -> bool {
        self.shared.lock().change_role(ra.clone(), false)
    }

    /// Sets how long role assignment changes take to take effect from now on (Azure documents
    /// up to ten minutes; zero, the default, is at once).
    pub fn set_propagation_delay(&self, d: Duration) {
        self.shared.lock().propagation_delay = d;
    }

    pub fn inject_fault(&self, spec: FaultSpec) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.push(spec.into());
        }
    }

    pub fn clear_faults(&self) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.clear();
        }
    }

    /// Enables or disables every version of key `key` in vault (or Managed HSM) `vault`, as an
    /// operator would in the portal. Whether the key exists.
    pub fn set_key_enabled(&self, vault: &str, key: &str, enabled: bool) -> bool {
        self.change_key(vault, key, None, enabled)
    }

    /// Enables or disables one version of a key. Whether that version exists.
    pub fn set_key_version_enabled(
        &self,
        vault: &str,
        key: &str,
        version: &str,
        enabled: bool,
    ) -> bool {
        self.change_key(vault, key, Some(version), enabled)
    }

    fn change_key(&self, vault: &str, key: &str, version: Option<&str>, enabled: bool) -> bool {
        let mut state = self.shared.lock();
        let Some(versions) = state.store_mut(vault).and_then(|v| v.keys.get_mut(key)) else {
            return false;
        };
        let now = crypto::now();
        let mut found = false;
        for k in versions
            .iter_mut()
            .filter(|k| version.is_none_or(|v| v == k.version))
        {
            k.enabled = enabled;
            k.updated = now;
            found = true;
        }
        let _ = state.save();
        found
    }

    /// Enables or disables every version of secret `secret` in vault `vault`. Whether the
    /// secret exists.
    pub fn set_secret_enabled(&self, vault: &str, secret: &str, enabled: bool) -> bool {
        let mut state = self.shared.lock();
        let Some(versions) = state
            .store_mut(vault)
            .and_then(|v| v.secrets.get_mut(secret))
        else {
            return false;
        };
        let now = crypto::now();
        for s in versions.iter_mut() {
            s.enabled = enabled;
            s.updated = now;
        }
        let _ = state.save();
        true
    }

    /// Adds a new version of an existing key (same type, size and operations), as Key Vault's
    /// rotate does. Returns the new version.
    pub fn rotate_key(&self, vault: &str, key: &str) -> Result<String, String> {
        let mut state = self.shared.lock();
        let store = state
            .store_mut(vault)
            .ok_or_else(|| format!("no vault or Managed HSM {vault}"))?;
        let v = store.rotate_key(key).map_err(|e| e.to_string())?;
        let _ = state.save();
        Ok(v.version)
    }

    /// Sets a new version of secret `secret` in vault `vault`, as an operator's setSecret
    /// would. Returns the new version.
    pub fn set_secret(&self, vault: &str, secret: &str, value: &str) -> Result<String, String> {
        let mut state = self.shared.lock();
        let store = state
            .store_mut(vault)
            .ok_or_else(|| format!("no vault {vault}"))?;
        let v = store
            .new_secret_version(secret, value, None, state::KeyAttrs::default())
            .map_err(|e| e.to_string())?;
        let _ = state.save();
        Ok(v.version)
    }

    /// Unwraps `wrapped` with version `version` of key `key`, as unwrapKey would, without a
    /// token or a record: for tests that must know a volume's DEK to look for copies of it.
    pub fn unwrap_as_vault(
        &self,
        vault: &str,
        key: &str,
        version: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut state = self.shared.lock();
        let store = state
            .store_mut(vault)
            .ok_or_else(|| format!("no vault or Managed HSM {vault}"))?;
        let k = store
            .keys
            .get(key)
            .and_then(|versions| versions.iter().find(|k| k.version == version))
            .ok_or_else(|| format!("no version {version} of key {key}"))?;
        let material = crypto::b64_decode(&k.material).unwrap_or_default();
        if k.is_rsa() {
            crypto::rsa_decrypt(&material, "RSA-OAEP-256", wrapped)
        } else {
            crypto::aes_kw_unwrap(&material, wrapped)
        }
    }

    /// Turns purge protection of a vault or Managed HSM on or off. Whether it exists.
    pub fn set_purge_protection(&self, vault: &str, on: bool) -> bool {
        let mut state = self.shared.lock();
        let Some(store) = state.store_mut(vault) else {
            return false;
        };
        store.purge_protection = on;
        let _ = state.save();
        true
    }

    /// Whether `principal` may `access` blobs in `container` (None: the account itself) of
    /// storage account `account` by its Storage Blob Data role assignments, as the Blob
    /// gateway decides.
    pub fn blob_allowed(
        &self,
        principal: &str,
        account: &str,
        container: Option<&str>,
        access: BlobAccess,
    ) -> bool {
        let mut state = self.shared.lock();
        rbac::blob_allowed(
            state.effective_roles(),
            principal,
            account,
            container,
            access,
        )
    }
}
