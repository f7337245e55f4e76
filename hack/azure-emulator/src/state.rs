//! Everything the emulator knows: tenants and identities, fake issuers' signing keys, vaults
//! and Managed HSMs with their key and secret versions (live and soft-deleted), role
//! assignments (with their optional propagation delay). Optionally persisted as one JSON file
//! (written whole, then renamed into place) so that keys survive a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{
    Config, FederatedCredential, Identity, KeyConfig, KeySpec, RoleAssignment, StoreSettings,
};
use crate::crypto::{self, SigningKey};

/// Why a change to a vault or HSM was refused; each maps onto one Key Vault error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    /// The name belongs to a soft-deleted object (409 Conflict).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadParameter(String),
    /// Refused by a vault setting (purge protection).
    #[error("{0}")]
    Forbidden(String),
}

/// The operations a key may allow (`key_ops`), as Key Vault names them.
pub const KEY_OPS: &[&str] = &[
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
    "import",
    "export",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: String,
    /// "RSA", "RSA-HSM" or "oct-HSM".
    pub kty: String,
    /// PKCS#8 DER for RSA, the raw key for oct-HSM; base64.
    pub material: String,
    pub enabled: bool,
    pub created: u64,
    pub updated: u64,
    /// The operations given at creation; None: every operation the key type has.
    #[serde(default)]
    pub key_ops: Option<Vec<String>>,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl KeyVersion {
    pub fn is_rsa(&self) -> bool {
        self.kty.starts_with("RSA")
    }

    /// The key's operations: those given at creation, or all of its type's.
    pub fn ops(&self) -> Vec<String> {
        match &self.key_ops {
            Some(ops) => ops.clone(),
            None if self.is_rsa() => [
                "encrypt",
                "decrypt",
                "sign",
                "verify",
                "wrapKey",
                "unwrapKey",
            ]
            .map(str::to_string)
            .to_vec(),
            None => ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
                .map(str::to_string)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: String,
    pub value: String,
    pub content_type: Option<String>,
    pub enabled: bool,
    pub created: u64,
    pub updated: u64,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// A soft-deleted key or secret: all its versions, kept until purged or recovered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deleted<T> {
    pub versions: Vec<T>,
    pub deleted: u64,
    pub scheduled_purge: u64,
}

fn default_retention() -> u32 {
    90
}

/// A vault or a Managed HSM (`hsm`): keys (and, in a vault, secrets), live and deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vault {
    pub tenant: String,
    /// Versions oldest first; the last one is "latest".
    pub keys: BTreeMap<String, Vec<KeyVersion>>,
    pub secrets: BTreeMap<String, Vec<SecretVersion>>,
    #[serde(default)]
    pub deleted_keys: BTreeMap<String, Deleted<KeyVersion>>,
    #[serde(default)]
    pub deleted_secrets: BTreeMap<String, Deleted<SecretVersion>>,
    /// Purge protection: deleted objects cannot be purged before their retention ends.
    #[serde(default)]
    pub purge_protection: bool,
    /// Soft-delete retention (7 to 90 days).
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// A Managed HSM rather than a vault.
    #[serde(default)]
    pub hsm: bool,
}

impl Default for Vault {
    fn default() -> Self {
        Vault {
            tenant: String::new(),
            keys: BTreeMap::new(),
            secrets: BTreeMap::new(),
            deleted_keys: BTreeMap::new(),
            deleted_secrets: BTreeMap::new(),
            purge_protection: false,
            retention_days: default_retention(),
            hsm: false,
        }
    }
}

impl Vault {
    fn with_settings(tenant: &str, settings: &StoreSettings, hsm: bool) -> Result<Vault, String> {
        let retention = settings.soft_delete_retention_days.unwrap_or(90);
        if !(7..=90).contains(&retention) {
            return Err(format!(
                "soft_delete_retention_days {retention} is out of range (7 to 90)"
            ));
        }
        Ok(Vault {
            tenant: tenant.to_string(),
            purge_protection: settings.purge_protection,
            retention_days: retention,
            hsm,
            ..Vault::default()
        })
    }

    /// A copy with the settings and none of the objects.
    pub fn settings_only(&self) -> Vault {
        Vault {
            tenant: self.tenant.clone(),
            purge_protection: self.purge_protection,
            retention_days: self.retention_days,
            hsm: self.hsm,
            ..Vault::default()
        }
    }

    /// The recovery level every object of this vault reports.
    pub fn recovery_level(&self) -> &'static str {
        match (self.retention_days < 90, self.purge_protection) {
            (false, false) => "Recoverable+Purgeable",
            (false, true) => "Recoverable",
            (true, false) => "CustomizedRecoverable+Purgeable",
            (true, true) => "CustomizedRecoverable",
        }
    }

    fn deleted_stamp(&self) -> (u64, u64) {
        let now = crypto::now();
        (now, now + u64::from(self.retention_days) * 86_400)
    }

    /// Creates a key, or its next version; refused for a soft-deleted name and for key types
    /// the store does not have (symmetric keys only in a Managed HSM, as
    /// https://learn.microsoft.com/azure/key-vault/keys/about-keys-details says; HSM-protected
    /// types only in a Managed HSM, https://learn.microsoft.com/azure/key-vault/managed-hsm/about-keys).
    pub fn new_key_version(
        &mut self,
        name: &str,
        kty: &str,
        size: Option<u32>,
        attrs: KeyAttrs,
    ) -> Result<KeyVersion, StoreError> {
        if self.deleted_keys.contains_key(name) {
            return Err(StoreError::Conflict(format!(
                "Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."
            )));
        }
        let allowed: &[&str] = if self.hsm {
            &["RSA-HSM", "oct-HSM"]
        } else {
            &["RSA", "RSA-HSM"]
        };
        if !allowed.contains(&kty) {
            let where_ = if self.hsm { "a Managed HSM" } else { "a vault" };
            return Err(StoreError::BadParameter(format!(
                "The key type '{kty}' is not supported in {where_} (supported here: {}).",
                allowed.join(", ")
            )));
        }
        if let Some(ops) = &attrs.key_ops
            && let Some(bad) = ops.iter().find(|o| !KEY_OPS.contains(&o.as_str()))
        {
            return Err(StoreError::BadParameter(format!(
                "Invalid key operation '{bad}'; valid operations: {}.",
                KEY_OPS.join(", ")
            )));
        }
        let material = if kty == "oct-HSM" {
            let size = size.unwrap_or(256);
            if size != 256 {
                return Err(StoreError::BadParameter(format!(
                    "oct-HSM key size {size} is not supported by this emulator (256)"
                )));
            }
            crypto::random_bytes(32)
        } else {
            crypto::generate_rsa(size.unwrap_or(2048)).map_err(StoreError::BadParameter)?
        };
        let now = crypto::now();
        let version = KeyVersion {
            version: crypto::random_hex(16),
            kty: kty.to_string(),
            material: crypto::b64(&material),
            enabled: attrs.enabled.unwrap_or(true),
            created: now,
            updated: now,
            key_ops: attrs.key_ops,
            nbf: attrs.nbf,
            exp: attrs.exp,
            tags: attrs.tags,
        };
        self.keys
            .entry(name.to_string())
            .or_default()
            .push(version.clone());
        Ok(version)
    }

    /// A new version of an existing key: same type, size and operations.
    pub fn rotate_key(&mut self, name: &str) -> Result<KeyVersion, StoreError> {
        let latest = self
            .keys
            .get(name)
            .and_then(|v| v.last())
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("no key {name}")))?;
        let size = if latest.is_rsa() {
            let der = crypto::b64_decode(&latest.material).unwrap_or_default();
            Some(crypto::rsa_bits(&der) as u32)
        } else {
            Some(256)
        };
        let attrs = KeyAttrs {
            key_ops: latest.key_ops.clone(),
            tags: latest.tags.clone(),
            ..KeyAttrs::default()
        };
        self.new_key_version(name, &latest.kty, size, attrs)
    }

    /// Sets a secret's next version; refused for a soft-deleted name.
    pub fn new_secret_version(
        &mut self,
        name: &str,
        value: &str,
        content_type: Option<String>,
        attrs: KeyAttrs,
    ) -> Result<SecretVersion, StoreError> {
        if self.hsm {
            return Err(StoreError::BadParameter(
                "A Managed HSM has no secrets.".to_string(),
            ));
        }
        if self.deleted_secrets.contains_key(name) {
            return Err(StoreError::Conflict(format!(
                "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged."
            )));
        }
        let now = crypto::now();
        let version = SecretVersion {
            version: crypto::random_hex(16),
            value: value.to_string(),
            content_type,
            enabled: attrs.enabled.unwrap_or(true),
            created: now,
            updated: now,
            nbf: attrs.nbf,
            exp: attrs.exp,
            tags: attrs.tags,
        };
        self.secrets
            .entry(name.to_string())
            .or_default()
            .push(version.clone());
        Ok(version)
    }

    /// Soft-deletes a key (every version).
    pub fn delete_key(&mut self, name: &str) -> Option<Deleted<KeyVersion>> {
        let versions = self.keys.remove(name)?;
        let (deleted, scheduled_purge) = self.deleted_stamp();
        let d = Deleted {
            versions,
            deleted,
            scheduled_purge,
        };
        self.deleted_keys.insert(name.to_string(), d.clone());
        Some(d)
    }

    pub fn delete_secret(&mut self, name: &str) -> Option<Deleted<SecretVersion>> {
        let versions = self.secrets.remove(name)?;
        let (deleted, scheduled_purge) = self.deleted_stamp();
        let d = Deleted {
            versions,
            deleted,
            scheduled_purge,
        };
        self.deleted_secrets.insert(name.to_string(), d.clone());
        Some(d)
    }

    pub fn recover_key(&mut self, name: &str) -> Option<Vec<KeyVersion>> {
        let d = self.deleted_keys.remove(name)?;
        self.keys.insert(name.to_string(), d.versions.clone());
        Some(d.versions)
    }

    pub fn recover_secret(&mut self, name: &str) -> Option<Vec<SecretVersion>> {
        let d = self.deleted_secrets.remove(name)?;
        self.secrets.insert(name.to_string(), d.versions.clone());
        Some(d.versions)
    }

    fn purge_allowed(&self) -> Result<(), StoreError> {
        if self.purge_protection {
            return Err(StoreError::Forbidden(
                "Operation \"purge\" is not allowed because purge protection is enabled for this vault. Key Vault service will automatically purge it after the retention period has passed.".to_string(),
            ));
        }
        Ok(())
    }

    pub fn purge_key(&mut self, name: &str) -> Result<bool, StoreError> {
        if !self.deleted_keys.contains_key(name) {
            return Ok(false);
        }
        self.purge_allowed()?;
        Ok(self.deleted_keys.remove(name).is_some())
    }

    pub fn purge_secret(&mut self, name: &str) -> Result<bool, StoreError> {
        if !self.deleted_secrets.contains_key(name) {
            return Ok(false);
        }
        self.purge_allowed()?;
        Ok(self.deleted_secrets.remove(name).is_some())
    }
}

/// Attributes given when a key or secret version is made.
#[derive(Debug, Clone, Default)]
pub struct KeyAttrs {
    pub enabled: Option<bool>,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    pub key_ops: Option<Vec<String>>,
    pub tags: BTreeMap<String, String>,
}

/// A role assignment change waiting for its propagation delay.
#[derive(Debug, Clone)]
struct PendingRole {
    at: Instant,
    assign: bool,
    ra: RoleAssignment,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    tenants: BTreeMap<String, Vec<Identity>>,
    issuer_keys: BTreeMap<String, String>,
    vaults: BTreeMap<String, Vault>,
    #[serde(default)]
    hsms: BTreeMap<String, Vault>,
    role_assignments: Vec<RoleAssignment>,
}

pub struct State {
    pub tenants: BTreeMap<String, Vec<Identity>>,
    pub issuers: BTreeMap<String, Arc<SigningKey>>,
    pub vaults: BTreeMap<String, Vault>,
    /// Managed HSMs, by name (a namespace of their own: a vault and an HSM may share a name).
    pub hsms: BTreeMap<String, Vault>,
    /// The role assignments in effect (what RBAC decides by).
    pub role_assignments: Vec<RoleAssignment>,
    /// How long an assignment change takes to take effect (Azure documents up to ten minutes;
    /// zero by default here).
    pub propagation_delay: Duration,
    pending_roles: Vec<PendingRole>,
    file: Option<PathBuf>,
}

impl State {
    /// Builds the state from `config`, or loads it from `file` when that exists (the file
    /// then wins: it holds the keys created before).
    pub fn new(config: &Config, file: Option<PathBuf>) -> Result<State, String> {
        let propagation_delay = Duration::from_millis(config.propagation_delay_ms);
        if let Some(path) = &file
            && path.exists()
        {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let snap: Snapshot =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let issuers = snap
                .issuer_keys
                .into_iter()
                .map(|(name, b64)| {
                    let der = crypto::b64_decode(&b64).ok_or("bad issuer key")?;
                    Ok((name, Arc::new(SigningKey::from_pkcs8(der)?)))
                })
                .collect::<Result<_, String>>()?;
            return Ok(State {
                tenants: snap.tenants,
                issuers,
                vaults: snap.vaults,
                hsms: snap.hsms,
                role_assignments: snap.role_assignments,
                propagation_delay,
                pending_roles: Vec::new(),
                file,
            });
        }
        for ra in &config.role_assignments {
            crate::rbac::validate(ra)?;
        }
        let mut state = State {
            tenants: BTreeMap::new(),
            issuers: BTreeMap::new(),
            vaults: BTreeMap::new(),
            hsms: BTreeMap::new(),
            role_assignments: config.role_assignments.clone(),
            propagation_delay,
            pending_roles: Vec::new(),
            file,
        };
        // "{emulator}" stays in issuer URLs and is expanded when an assertion is matched, so a
        // state file keeps working when the emulator restarts on another port.
        for t in &config.tenants {
            state.tenants.insert(t.id.clone(), t.identities.clone());
        }
        for name in &config.issuers {
            state.add_issuer(name)?;
        }
        let stores = config
            .vaults
            .iter()
            .map(|v| (false, &v.name, &v.tenant, v.settings(), &v.keys))
            .chain(
                config
                    .hsms
                    .iter()
                    .map(|h| (true, &h.name, &h.tenant, h.settings(), &h.keys)),
            );
        for (hsm, name, tenant, settings, keys) in stores {
            let what = if hsm { "hsm" } else { "vault" };
            let mut store = Vault::with_settings(tenant, &settings, hsm)
                .map_err(|e| format!("{what} {name}: {e}"))?;
            for k in keys {
                add_configured_key(&mut store, k).map_err(|e| {
                    let hint = if !hsm && k.kty.starts_with("oct") {
                        " (symmetric keys exist only in a Managed HSM: list this key under `hsms:`)"
                    } else {
                        ""
                    };
                    format!("{what} {name}: key {}: {e}{hint}", k.name)
                })?;
            }
            let map = if hsm {
                &mut state.hsms
            } else {
                &mut state.vaults
            };
            map.insert(name.clone(), store);
        }
        for v in &config.vaults {
            for s in &v.secrets {
                state.set_secret(&v.name, &s.name, &s.value, None)?;
            }
        }
        state.save()?;
        Ok(state)
    }

    /// Writes the state file, if there is one.
    pub fn save(&self) -> Result<(), String> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let snap = Snapshot {
            tenants: self.tenants.clone(),
            issuer_keys: self
                .issuers
                .iter()
                .map(|(n, k)| (n.clone(), crypto::b64(k.pkcs8())))
                .collect(),
            vaults: self.vaults.clone(),
            hsms: self.hsms.clone(),
            role_assignments: self.role_assignments.clone(),
        };
        let text = serde_json::to_string_pretty(&snap).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn add_issuer(&mut self, name: &str) -> Result<Arc<SigningKey>, String> {
        if let Some(k) = self.issuers.get(name) {
            return Ok(Arc::clone(k));
        }
        let key = Arc::new(SigningKey::generate()?);
        self.issuers.insert(name.to_string(), Arc::clone(&key));
        Ok(key)
    }

    /// The identity with `client_id` in `tenant`.
    pub fn identity(&self, tenant: &str, client_id: &str) -> Option<&Identity> {
        self.tenants
            .get(tenant)?
            .iter()
            .find(|i| i.client_id == client_id)
    }

    pub fn add_identity(&mut self, tenant: &str, identity: Identity) {
        let list = self.tenants.entry(tenant.to_string()).or_default();
        list.retain(|i| i.client_id != identity.client_id);
        list.push(identity);
    }

    pub fn remove_identity(&mut self, client_id: &str) -> bool {
        let mut removed = false;
        for list in self.tenants.values_mut() {
            let before = list.len();
            list.retain(|i| i.client_id != client_id);
            removed |= list.len() != before;
        }
        removed
    }

    pub fn add_federated_credential(&mut self, client_id: &str, fc: FederatedCredential) -> bool {
        for list in self.tenants.values_mut() {
            if let Some(i) = list.iter_mut().find(|i| i.client_id == client_id) {
                i.federated_credentials.retain(|f| f.name != fc.name);
                i.federated_credentials.push(fc);
                return true;
            }
        }
        false
    }

    pub fn remove_federated_credential(&mut self, client_id: &str, name: &str) -> bool {
        for list in self.tenants.values_mut() {
            if let Some(i) = list.iter_mut().find(|i| i.client_id == client_id) {
                let before = i.federated_credentials.len();
                i.federated_credentials.retain(|f| f.name != name);
                return before != i.federated_credentials.len();
            }
        }
        false
    }

    /// The vault named `name`, else the Managed HSM named so.
    pub fn store_mut(&mut self, name: &str) -> Option<&mut Vault> {
        if self.vaults.contains_key(name) {
            return self.vaults.get_mut(name);
        }
        self.hsms.get_mut(name)
    }

    /// Creates a key, or a new version of it (rotation), in vault (or Managed HSM) `vault`.
    /// Returns the new version.
    pub fn create_key(&mut self, vault: &str, spec: &KeySpec) -> Result<KeyVersion, String> {
        let v = self
            .store_mut(vault)
            .ok_or_else(|| format!("no vault {vault}"))?;
        v.new_key_version(&spec.name, &spec.kty, spec.size, KeyAttrs::default())
            .map_err(|e| e.to_string())
    }

    pub fn set_secret(
        &mut self,
        vault: &str,
        name: &str,
        value: &str,
        content_type: Option<String>,
    ) -> Result<SecretVersion, String> {
        let v = self
            .vaults
            .get_mut(vault)
            .ok_or_else(|| format!("no vault {vault}"))?;
        v.new_secret_version(name, value, content_type, KeyAttrs::default())
            .map_err(|e| e.to_string())
    }

    /// Adds (`assign`) or removes a role assignment, now or after the propagation delay.
    /// Returns whether it changed anything once every pending change is counted.
    pub fn change_role(&mut self, ra: RoleAssignment, assign: bool) -> bool {
        let mut desired = self.role_assignments.clone();
        for p in &self.pending_roles {
            apply(&mut desired, &p.ra, p.assign);
        }
        let changes = apply(&mut desired, &ra, assign);
        if !changes {
            return false;
        }
        if self.propagation_delay.is_zero() {
            apply(&mut self.role_assignments, &ra, assign);
        } else {
            self.pending_roles.push(PendingRole {
                at: Instant::now() + self.propagation_delay,
                assign,
                ra,
            });
        }
        true
    }

    /// The role assignments in effect now (pending changes whose delay has passed applied).
    pub fn effective_roles(&mut self) -> &[RoleAssignment] {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_roles)
            .into_iter()
            .partition(|p| p.at <= now);
        self.pending_roles = later;
        for p in due {
            apply(&mut self.role_assignments, &p.ra, p.assign);
        }
        &self.role_assignments
    }
}

/// Adds or removes `ra` in `list`; whether that changed it.
fn apply(list: &mut Vec<RoleAssignment>, ra: &RoleAssignment, assign: bool) -> bool {
    if assign {
        if list.contains(ra) {
            return false;
        }
        list.push(ra.clone());
        true
    } else {
        let before = list.len();
        list.retain(|r| r != ra);
        list.len() != before
    }
}

fn add_configured_key(store: &mut Vault, k: &KeyConfig) -> Result<KeyVersion, StoreError> {
    store.new_key_version(
        &k.name,
        &k.kty,
        k.size,
        KeyAttrs {
            enabled: Some(k.enabled),
            nbf: k.nbf,
            exp: k.exp,
            key_ops: k.key_ops.clone(),
            tags: BTreeMap::new(),
        },
    )
}
