//! The emulator's configuration file (JSON or YAML): tenants with their identities and
//! federated credentials, fake Kubernetes issuers, vaults with keys and secrets, Managed HSMs
//! with keys, role assignments (Key Vault, Managed HSM local RBAC, Storage Blob Data), and the
//! role-assignment propagation delay, and storage accounts with their Blob containers (served
//! by Azurite behind the emulator's RBAC gateway). `{emulator}` in an issuer URL stands for the
//! emulator's own base URL, which is only known once it listens (port 0).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Names of fake Kubernetes service-account issuers served at `/issuers/{name}`.
    #[serde(default)]
    pub issuers: Vec<String>,
    #[serde(default)]
    pub vaults: Vec<VaultConfig>,
    /// Managed HSMs, each on its own port like a vault.
    #[serde(default)]
    pub hsms: Vec<HsmConfig>,
    #[serde(default)]
    pub role_assignments: Vec<RoleAssignment>,
    /// How long a role assignment change (control plane or Rust API) takes to take effect, in
    /// milliseconds (Azure: up to ten minutes; default 0, at once).
    #[serde(default)]
    pub propagation_delay_ms: u64,
    /// Storage accounts served by Azurite behind the Blob gateway (needs `Options::azurite`).
    #[serde(default)]
    pub storage_accounts: Vec<StorageAccountConfig>,
}

/// A storage account and the Blob containers created in it at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageAccountConfig {
    /// 3 to 24 lowercase letters and digits, as Azure names storage accounts.
    pub name: String,
    #[serde(default)]
    pub containers: Vec<String>,
}

impl StorageAccountConfig {
    /// Checks the account and container names against Azure's naming rules
    /// (https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata):
    /// Azurite takes names Azure refuses, so a test could pass here and fail in Azure.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if !(3..=24).contains(&n.len())
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "storage account {n:?}: a name is 3 to 24 lowercase letters and digits"
            ));
        }
        for c in &self.containers {
            let ok = (3..=63).contains(&c.len())
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
                && !c.contains("--");
            if !ok {
                return Err(format!(
                    "storage account {n}: container {c:?}: a name is 3 to 63 lowercase letters, digits and single dashes, starting and ending with a letter or digit"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    #[serde(default)]
    pub identities: Vec<Identity>,
}

/// A user-assigned managed identity (or app registration): its client id, the object id RBAC
/// names it by, and the federated credentials it trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub name: String,
    pub client_id: String,
    pub object_id: String,
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredential>,
    /// A managed identity (its access tokens live about 24 hours, as Entra issues them to
    /// managed identities) rather than an app registration (about an hour).
    #[serde(default)]
    pub managed: bool,
    /// The access-token lifetime in seconds, overriding the default of its kind.
    #[serde(default)]
    pub token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedCredential {
    pub name: String,
    pub issuer: String,
    pub subject: String,
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
}

pub fn default_audiences() -> Vec<String> {
    vec!["api://AzureADTokenExchange".to_string()]
}

/// Soft-delete settings of a vault or Managed HSM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSettings {
    pub purge_protection: bool,
    pub soft_delete_retention_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub name: String,
    pub tenant: String,
    /// RSA or RSA-HSM keys (symmetric keys belong to a Managed HSM).
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
    /// Purge protection: deleted keys and secrets cannot be purged.
    #[serde(default)]
    pub purge_protection: bool,
    /// Soft-delete retention, 7 to 90 days (default 90).
    #[serde(default)]
    pub soft_delete_retention_days: Option<u32>,
}

impl VaultConfig {
    pub fn settings(&self) -> StoreSettings {
        StoreSettings {
            purge_protection: self.purge_protection,
            soft_delete_retention_days: self.soft_delete_retention_days,
        }
    }
}

/// A Managed HSM: keys only (RSA-HSM, oct-HSM), its own local RBAC scopes `/hsms/{name}`,
/// `/hsms/{name}/keys` and `/hsms/{name}/keys/{key}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    pub name: String,
    pub tenant: String,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub purge_protection: bool,
    #[serde(default)]
    pub soft_delete_retention_days: Option<u32>,
}

impl HsmConfig {
    pub fn settings(&self) -> StoreSettings {
        StoreSettings {
            purge_protection: self.purge_protection,
            soft_delete_retention_days: self.soft_delete_retention_days,
        }
    }
}

/// A key to create through the Rust API: `kty` RSA or RSA-HSM (size 2048, 3072 or 4096) in a
/// vault, RSA-HSM or oct-HSM (size 256) in a Managed HSM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default = "default_kty")]
    pub kty: String,
    #[serde(default)]
    pub size: Option<u32>,
}

/// A key in the configuration file: a `KeySpec` plus the attributes Key Vault keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    #[serde(default = "default_kty")]
    pub kty: String,
    #[serde(default)]
    pub size: Option<u32>,
    /// The operations the key allows (`encrypt`, `decrypt`, `sign`, `verify`, `wrapKey`,
    /// `unwrapKey`); all of its type's when absent.
    #[serde(default)]
    pub key_ops: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Not before / expires, seconds since the epoch.
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
}

fn default_true() -> bool {
    true
}

fn default_kty() -> String {
    "RSA".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    pub name: String,
    pub value: String,
}

/// `principal` is an identity's object id; `role` a built-in role name; `scope` is
/// `/vaults/{vault}`, `/vaults/{vault}/keys/{key}` or `/vaults/{vault}/secrets/{secret}` for
/// Key Vault roles, `/hsms/{hsm}`, `/hsms/{hsm}/keys` or `/hsms/{hsm}/keys/{key}` for Managed
/// HSM roles, `/storageAccounts/{account}` or
/// `/storageAccounts/{account}/containers/{container}` for Storage Blob Data roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleAssignment {
    pub principal: String,
    pub role: String,
    pub scope: String,
}

impl Config {
    /// Parses JSON, or YAML when the text does not start with `{`.
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_norway::from_str(text).map_err(|e| e.to_string())
        }
    }
}
