//! The emulator's configuration file (JSON or YAML): tenants with their identities and
//! federated credentials, fake Kubernetes issuers, vaults with keys and secrets, and role
//! assignments. `{emulator}` in an issuer URL stands for the emulator's own base URL, which
//! is only known once it listens (port 0).

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
    #[serde(default)]
    pub role_assignments: Vec<RoleAssignment>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub name: String,
    pub tenant: String,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
}

/// A key to create: `kty` RSA (size 2048, 3072 or 4096) or oct-HSM (size 256).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default = "default_kty")]
    pub kty: String,
    #[serde(default)]
    pub size: Option<u32>,
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
/// `/vaults/{vault}`, `/vaults/{vault}/keys/{key}` or `/vaults/{vault}/secrets/{secret}`.
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
