//! Everything the emulator knows: tenants and identities, fake issuers' signing keys, vaults
//! with their key and secret versions, role assignments. Optionally persisted as one JSON file
//! (written whole, then renamed into place) so that keys survive a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{Config, FederatedCredential, Identity, KeySpec, RoleAssignment};
use crate::crypto::{self, SigningKey};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: String,
    /// "RSA" or "oct-HSM".
    pub kty: String,
    /// PKCS#8 DER for RSA, the raw key for oct-HSM; base64.
    pub material: String,
    pub enabled: bool,
    pub created: u64,
    pub updated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: String,
    pub value: String,
    pub content_type: Option<String>,
    pub enabled: bool,
    pub created: u64,
    pub updated: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Vault {
    pub tenant: String,
    /// Versions oldest first; the last one is "latest".
    pub keys: BTreeMap<String, Vec<KeyVersion>>,
    pub secrets: BTreeMap<String, Vec<SecretVersion>>,
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
    pub role_assignments: Vec<RoleAssignment>,
    file: Option<PathBuf>,
}

impl State {
    /// Builds the state from `config`, or loads it from `file` when that exists (the file
    /// then wins: it holds the keys created before).
    pub fn new(config: &Config, file: Option<PathBuf>) -> Result<State, String> {
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
                file,
            });
        }
        let mut state = State {
            tenants: BTreeMap::new(),
            issuers: BTreeMap::new(),
            vaults: BTreeMap::new(),
            hsms: BTreeMap::new(),
            role_assignments: config.role_assignments.clone(),
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
        for v in &config.vaults {
            state.vaults.insert(
                v.name.clone(),
                Vault {
                    tenant: v.tenant.clone(),
                    ..Vault::default()
                },
            );
            for k in &v.keys {
                state.create_key(&v.name, k)?;
            }
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

    /// Creates a key, or a new version of it (rotation). Returns the new version.
    pub fn create_key(&mut self, vault: &str, spec: &KeySpec) -> Result<KeyVersion, String> {
        let material = match spec.kty.as_str() {
            "RSA" | "RSA-HSM" => crypto::generate_rsa(spec.size.unwrap_or(2048))?,
            "oct-HSM" | "oct" => {
                let size = spec.size.unwrap_or(256);
                if size != 256 {
                    return Err(format!("oct-HSM key size {size} is not supported (256)"));
                }
                crypto::random_bytes(32)
            }
            other => {
                return Err(format!(
                    "key type {other} is not supported (RSA, RSA-HSM, oct-HSM)"
                ));
            }
        };
        let kty = if spec.kty.starts_with("oct") {
            "oct-HSM"
        } else {
            "RSA"
        };
        let now = crypto::now();
        let version = KeyVersion {
            version: crypto::random_hex(16),
            kty: kty.to_string(),
            material: crypto::b64(&material),
            enabled: true,
            created: now,
            updated: now,
        };
        let v = self
            .vaults
            .get_mut(vault)
            .ok_or_else(|| format!("no vault {vault}"))?;
        v.keys
            .entry(spec.name.clone())
            .or_default()
            .push(version.clone());
        Ok(version)
    }

    pub fn set_secret(
        &mut self,
        vault: &str,
        name: &str,
        value: &str,
        content_type: Option<String>,
    ) -> Result<SecretVersion, String> {
        let now = crypto::now();
        let version = SecretVersion {
            version: crypto::random_hex(16),
            value: value.to_string(),
            content_type,
            enabled: true,
            created: now,
            updated: now,
        };
        let v = self
            .vaults
            .get_mut(vault)
            .ok_or_else(|| format!("no vault {vault}"))?;
        v.secrets
            .entry(name.to_string())
            .or_default()
            .push(version.clone());
        Ok(version)
    }
}
