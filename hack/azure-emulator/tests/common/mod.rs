//! A standard emulator for the tests: one tenant, an authorized app, an unauthorized one, a
//! fake issuer, a vault with an RSA key and a secret, a Managed HSM with an oct-HSM key.
#![allow(dead_code, clippy::unwrap_used)]

use sealvol_azure_emulator::{Config, Emulator, Options, TokenRequest};
use serde_json::{Value, json};

pub const TENANT: &str = "72f988bf-0000-4000-8000-00000000000a";
pub const APP_CLIENT: &str = "3d1c6a0e-1111-4111-8111-00000000000a";
pub const APP_OID: &str = "9f0c2d4e-2222-4222-8222-00000000000a";
pub const OTHER_CLIENT: &str = "3d1c6a0e-1111-4111-8111-00000000000b";
pub const OTHER_OID: &str = "9f0c2d4e-2222-4222-8222-00000000000b";

pub fn config() -> Config {
    Config::parse(&json!({
        "tenants": [{"id": TENANT, "identities": [
            {"name": "app", "client_id": APP_CLIENT, "object_id": APP_OID, "federated_credentials": [
                {"name": "pod", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:app"}]},
            {"name": "other", "client_id": OTHER_CLIENT, "object_id": OTHER_OID, "federated_credentials": [
                {"name": "pod", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:other"}]}
        ]}],
        "issuers": ["cluster", "rogue"],
        "vaults": [{"name": "kv", "tenant": TENANT, "keys": [{"name": "kek"}], "secrets": [{"name": "kek-secret", "value": "c2VjcmV0"}]}],
        "hsms": [{"name": "mhsm", "tenant": TENANT, "keys": [{"name": "hsm", "kty": "oct-HSM", "size": 256}, {"name": "rsa", "kty": "RSA-HSM"}]}],
        "role_assignments": [
            {"principal": APP_OID, "role": "Key Vault Administrator", "scope": "/vaults/kv"},
            {"principal": APP_OID, "role": "Managed HSM Crypto User", "scope": "/hsms/mhsm/keys"}
        ]
    }).to_string())
    .unwrap()
}

pub async fn start() -> Emulator {
    start_with(Options {
        config: config(),
        admin: true,
        ..Options::default()
    })
    .await
}

pub async fn start_with(options: Options) -> Emulator {
    Emulator::start(options).await.unwrap()
}

pub fn http(emu: &Emulator) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(emu.ca_cert_pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

pub fn sa_token(emu: &Emulator, issuer: &str, sa: &str) -> String {
    emu.mint_token(
        issuer,
        &TokenRequest {
            namespace: "default".into(),
            service_account: sa.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
            pod_name: Some("pod-1".into()),
            pod_uid: Some("uid-1".into()),
            ttl_secs: 3600,
            offset_secs: 0,
        },
    )
    .unwrap()
}

/// POSTs the client-assertion exchange; returns (status, body).
pub async fn exchange(
    emu: &Emulator,
    tenant: &str,
    client_id: &str,
    assertion: &str,
    scope: &str,
) -> (u16, Value) {
    let r = http(emu)
        .post(format!("{}/{tenant}/oauth2/v2.0/token", emu.base_url))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A Key Vault access token for the app (or `client`/`sa`).
pub async fn access_token(emu: &Emulator, client: &str, sa: &str) -> String {
    let (status, body) = exchange(
        emu,
        TENANT,
        client,
        &sa_token(emu, "cluster", sa),
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

/// An access token for `resource` (e.g. `https://managedhsm.azure.net`).
pub async fn token_for(emu: &Emulator, client: &str, sa: &str, resource: &str) -> String {
    let (status, body) = exchange(
        emu,
        TENANT,
        client,
        &sa_token(emu, "cluster", sa),
        &format!("{resource}/.default"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

/// A Key Vault call: (status, body, headers).
pub async fn kv(
    emu: &Emulator,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    call(
        emu,
        &emu.vault_url("kv").unwrap(),
        token,
        method,
        path,
        body,
    )
    .await
}

/// A Managed HSM call (HSM "mhsm"): (status, body, headers).
pub async fn hsm(
    emu: &Emulator,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    call(
        emu,
        &emu.hsm_url("mhsm").unwrap(),
        token,
        method,
        path,
        body,
    )
    .await
}

/// A data-plane call to `base`: (status, body, headers).
pub async fn call(
    emu: &Emulator,
    base: &str,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let url = format!(
        "{base}{path}{}api-version=7.6",
        if path.contains('?') { "&" } else { "?" }
    );
    let mut req = http(emu).request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}
