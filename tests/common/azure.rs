//! The Azure emulator for the key tests: one tenant, an app identity authorized on a vault's
//! RSA key, oct-HSM key and secret, an intruder identity with no role, a fake cluster issuer;
//! and a node plugin pointed at it.
#![allow(dead_code, clippy::unwrap_used)]

use super::*;
use sealvol::harness::keys::with_pod_token;
use sealvol_azure_emulator::{Config, Emulator, Options, TokenRequest};
use serde_json::json;

pub const TENANT: &str = "72f988bf-0000-4000-8000-0000000000aa";
pub const APP: &str = "3d1c6a0e-1111-4111-8111-0000000000aa";
pub const APP_OID: &str = "9f0c2d4e-2222-4222-8222-0000000000aa";
pub const INTRUDER: &str = "3d1c6a0e-1111-4111-8111-0000000000bb";
pub const AUD: &str = "api://AzureADTokenExchange";

pub struct Azure {
    pub emu: Emulator,
}

/// The driver's own identity (snapshot backups): a Blob role on the backup container, no Key
/// Vault role.
pub const DRIVER: &str = "3d1c6a0e-1111-4111-8111-0000000000dd";
pub const DRIVER_OID: &str = "9f0c2d4e-2222-4222-8222-0000000000dd";
/// Reads the backup container (the tests' eyes on what a backup holds).
pub const READER: &str = "3d1c6a0e-1111-4111-8111-0000000000ee";
pub const ACCOUNT: &str = "devstoreaccount1";
pub const CONTAINER: &str = "backups";

impl Azure {
    pub async fn start() -> Azure {
        Azure::start_with(false).await
    }

    /// With Blob storage (Azurite behind the emulator's RBAC gateway), the driver's identity
    /// and a reader.
    pub async fn start_with_blob() -> Azure {
        Azure::start_with(true).await
    }

    async fn start_with(blob: bool) -> Azure {
        let mut config = json!({
            "tenants": [{"id": TENANT, "identities": [
                {"name": "app", "client_id": APP, "object_id": APP_OID, "federated_credentials": [
                    {"name": "app", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:app"},
                    {"name": "app2", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:app2"}]},
                {"name": "intruder", "client_id": INTRUDER, "object_id": "9f0c2d4e-2222-4222-8222-0000000000bb", "federated_credentials": [
                    {"name": "intruder", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:intruder"}]}
            ]}],
            "issuers": ["cluster", "rogue"],
            "vaults": [{"name": "kv", "tenant": TENANT,
                "keys": [{"name": "kek"}],
                "secrets": [{"name": "kek-secret", "value": "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="}]}],
            // A Managed HSM is its own service: its own host, its own token resource
            // (https://managedhsm.azure.net) and its own local RBAC roles.
            "hsms": [{"name": "hsm1", "tenant": TENANT,
                "keys": [{"name": "hsm", "kty": "oct-HSM", "size": 256}]}],
            "role_assignments": [
                {"principal": APP_OID, "role": "Key Vault Crypto Service Encryption User", "scope": "/vaults/kv/keys/kek"},
                {"principal": APP_OID, "role": "Managed HSM Crypto Service Encryption User", "scope": "/hsms/hsm1/keys/hsm"},
                {"principal": APP_OID, "role": "Key Vault Secrets User", "scope": "/vaults/kv/secrets/kek-secret"},
                {"principal": "9f0c2d4e-2222-4222-8222-0000000000bb", "role": "Key Vault Reader", "scope": "/vaults/kv"}
            ]
        });
        let mut azurite = None;
        if blob {
            let scope = format!("/storageAccounts/{ACCOUNT}/containers/{CONTAINER}");
            config["tenants"][0]["identities"]
                .as_array_mut()
                .unwrap()
                .extend([
                    json!({"name": "sealvol-node", "client_id": DRIVER, "object_id": DRIVER_OID, "federated_credentials": [
                        {"name": "node", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:kube-system:sealvol-node"}]}),
                    json!({"name": "reader", "client_id": READER, "object_id": "9f0c2d4e-2222-4222-8222-0000000000ee", "federated_credentials": [
                        {"name": "reader", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:reader"}]}),
                ]);
            config["role_assignments"].as_array_mut().unwrap().extend([
                json!({"principal": DRIVER_OID, "role": "Storage Blob Data Contributor", "scope": scope}),
                json!({"principal": "9f0c2d4e-2222-4222-8222-0000000000ee", "role": "Storage Blob Data Reader", "scope": scope}),
            ]);
            config["storage_accounts"] = json!([{"name": ACCOUNT, "containers": [CONTAINER]}]);
            azurite = Some(
                sealvol::harness::azure::azurite_binary()
                    .unwrap_or_else(|e| panic!("{e} (hack/test installs it)")),
            );
        }
        let emu = Emulator::start(Options {
            config: Config::parse(&config.to_string()).unwrap(),
            admin: true,
            azurite,
            ..Options::default()
        })
        .await
        .unwrap();
        Azure { emu }
    }

    /// The backup container's URL.
    pub fn container_url(&self) -> String {
        format!("{}/{CONTAINER}", self.emu.blob_url(ACCOUNT).unwrap())
    }

    /// The driver's projected ServiceAccount token (kube-system/sealvol-node).
    pub fn driver_token(&self) -> String {
        self.emu
            .mint_token(
                "cluster",
                &TokenRequest {
                    namespace: "kube-system".into(),
                    service_account: "sealvol-node".into(),
                    audiences: vec![AUD.into()],
                    pod_name: None,
                    pod_uid: None,
                    ttl_secs: 3600,
                    offset_secs: 0,
                },
            )
            .unwrap()
    }

    pub fn token(&self, sa: &str) -> String {
        self.token_with(sa, AUD, 0, "cluster")
    }

    pub fn token_with(&self, sa: &str, aud: &str, offset: i64, issuer: &str) -> String {
        self.emu
            .mint_token(
                issuer,
                &TokenRequest {
                    namespace: "default".into(),
                    service_account: sa.into(),
                    audiences: vec![aud.into()],
                    pod_name: None,
                    pod_uid: None,
                    ttl_secs: 3600,
                    offset_secs: offset,
                },
            )
            .unwrap()
    }

    pub fn params(&self, mode: &str) -> Vec<(String, String)> {
        let vault = self.emu.vault_url("kv").unwrap();
        let mut p = vec![
            ("keyMode".to_string(), mode.to_string()),
            ("keyVaultURL".to_string(), vault),
            ("clientID".to_string(), APP.to_string()),
        ];
        match mode {
            "keyvault-secret" => p.push(("secretName".into(), "kek-secret".into())),
            "hsm" => {
                p[0].1 = "keyvault-key".into();
                p[1].1 = self.emu.hsm_url("hsm1").unwrap();
                p.push(("keyName".into(), "hsm".into()));
                p.push(("keyAlgorithm".into(), "A256KW".into()));
            }
            _ => p.push(("keyName".into(), "kek".into())),
        }
        p
    }

    /// Every vault's host:port, as `--allowed-vault-hosts` takes them.
    pub fn vault_hosts(&self) -> String {
        [self.emu.vault_url("kv"), self.emu.hsm_url("hsm1")]
            .into_iter()
            .flatten()
            .map(|u| {
                u.trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn wraps(&self) -> u64 {
        self.emu.count("keyvault.wrap", Some(200))
    }

    pub fn unwraps(&self) -> u64 {
        self.emu.count("keyvault.unwrap", Some(200))
    }
}

/// A node plugin that backs snapshots up to the emulator's container with the driver's own
/// identity, started with `env`.
pub async fn node_with_backup(
    azure: &Azure,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (ScratchNode, CsiClient) {
    require_root();
    let node = ScratchNode::new(&binary(), None).unwrap();
    let token = node.root.join("driver-token");
    std::fs::write(&token, azure.driver_token()).unwrap();
    let mut args = vec![
        format!("--backup-url={}", azure.container_url()),
        format!("--backup-client-id={DRIVER}"),
        format!("--backup-token-file={}", token.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_for_env(azure, node, &args, env).await
}

pub async fn node_for(azure: &Azure) -> (ScratchNode, CsiClient) {
    node_with(azure, &[]).await
}

pub async fn node_with(azure: &Azure, extra: &[&str]) -> (ScratchNode, CsiClient) {
    require_root();
    let node = ScratchNode::new(&binary(), None).unwrap();
    start_for(azure, node, extra).await
}

/// A node plugin run as a container runs it (see `ScratchNode::containerized`).
pub async fn node_in_container(azure: &Azure, extra: &[&str]) -> (ScratchNode, CsiClient) {
    require_root();
    let node = ScratchNode::new(&binary(), None)
        .unwrap()
        .containerized(1 << 30)
        .unwrap();
    start_for(azure, node, extra).await
}

async fn start_for(azure: &Azure, node: ScratchNode, extra: &[&str]) -> (ScratchNode, CsiClient) {
    start_for_env(azure, node, extra, &[]).await
}

async fn start_for_env(
    azure: &Azure,
    mut node: ScratchNode,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (ScratchNode, CsiClient) {
    let ca = node.root.join("emulator-ca.pem");
    std::fs::write(&ca, &azure.emu.ca_cert_pem).unwrap();
    let args = [
        format!("--authority-host={}", azure.emu.base_url),
        format!("--ca-file={}", ca.display()),
        format!("--tenant-id={TENANT}"),
        "--keyvault-verify-challenge=false".to_string(),
        "--log-format=json".to_string(),
        format!("--allowed-vault-hosts={}", azure.vault_hosts()),
    ];
    let args: Vec<String> = args
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    node = node.with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let client = node.start(env).await.unwrap();
    (node, client)
}

pub async fn create_encrypted(c: &mut CsiClient, azure: &Azure, name: &str, mode: &str) -> String {
    let params = azure.params(mode);
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    create_with(c, name, 32 * MIB, &refs).await
}

pub fn publish_as(
    node: &ScratchNode,
    id: &str,
    pod: &str,
    token: &str,
    sa: &str,
) -> csi::NodePublishVolumeRequest {
    let mut req = node.publish(id, pod);
    with_pod_token(&mut req, token, AUD, "default", sa, true);
    req
}

/// The header's wrapped DEK and key identifier, from the volume file's header JSON.
pub fn header(node: &ScratchNode, id: &str) -> serde_json::Value {
    let bytes = std::fs::read(node.pool_dir.join(format!("{id}.img"))).unwrap_or_default();
    let mut best = serde_json::Value::Null;
    for slot in 0..2 {
        let s = &bytes[slot * 4096..(slot + 1) * 4096];
        let len = u32::from_le_bytes(s[20..24].try_into().unwrap()) as usize;
        if len > 0
            && len < 4000
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&s[24..24 + len])
        {
            let generation = u64::from_le_bytes(s[12..20].try_into().unwrap());
            if best.is_null() || generation > best["_gen"].as_u64().unwrap_or(0) {
                best = v;
                best["_gen"] = json!(generation);
            }
        }
    }
    best
}

pub fn identifier(node: &ScratchNode, id: &str) -> String {
    header(node, id)["kms"]["key_identifier"]
        .as_str()
        .unwrap()
        .to_string()
}
