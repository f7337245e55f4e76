//! Entra ID answers as Entra does where sealvol or an operator can tell: one known resource
//! per client-credentials request (else AADSTS500011 or AADSTS70011), access tokens in the
//! v1.0 shape the resources take, lifetimes by kind of identity. Each expectation cites the
//! documentation it follows, or the recorded observation where the documentation is silent.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use sealvol_azure_emulator::crypto;
use sealvol_azure_emulator::{Config, Options};
use serde_json::json;

const VAULT: &str = "https://vault.azure.net";

#[tokio::test]
async fn entra_answers_for_one_known_resource_with_v1_tokens() {
    let emu = start().await;
    let assertion = sa_token(&emu, "cluster", "app");
    // https://learn.microsoft.com/entra/identity-platform/reference-error-codes: AADSTS500011
    // invalid_resource for a resource the tenant does not have.
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &assertion,
        "https://nowhere.example/.default",
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str(), b["error_codes"][0].as_u64()),
        (400, Some("invalid_resource"), Some(500011))
    );
    // Several resources in one client-credentials request: AADSTS70011 invalid_scope
    // (observed: Azure/azure-sdk-for-net#9076).
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &assertion,
        "https://vault.azure.net/.default https://storage.azure.com/.default",
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str(), b["error_codes"][0].as_u64()),
        (400, Some("invalid_scope"), Some(70011))
    );
    // The v1.0 access token shape Key Vault takes
    // (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference).
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &assertion,
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!(s, 200);
    let (_, c) = crypto::peek_jwt(b["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(c["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(c["ver"], "1.0");
    assert_eq!(c["aud"], VAULT);
    assert_eq!(
        (c["appid"].as_str(), c["oid"].as_str(), c["tid"].as_str()),
        (Some(APP_CLIENT), Some(APP_OID), Some(TENANT))
    );
    // Storage tokens, for a Blob endpoint such as Azurite.
    let storage = token_for(&emu, APP_CLIENT, "app", "https://storage.azure.com").await;
    assert_eq!(
        crypto::peek_jwt(&storage).unwrap().1["aud"],
        "https://storage.azure.com"
    );
}

#[tokio::test]
async fn token_lifetimes_follow_the_kind_of_identity() {
    // Managed identities get tokens for about a day, app registrations for about an hour
    // (https://learn.microsoft.com/entra/identity-platform/configurable-token-lifetimes,
    // https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/managed-identities-faq);
    // a configured lifetime wins.
    let config = Config::parse(&json!({
        "tenants": [{"id": TENANT, "identities": [
            {"name": "mi", "client_id": "c-mi", "object_id": "o-mi", "managed": true, "federated_credentials": [
                {"name": "p", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:mi"}]},
            {"name": "app", "client_id": "c-app", "object_id": "o-app", "federated_credentials": [
                {"name": "p", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:app"}]},
            {"name": "short", "client_id": "c-short", "object_id": "o-short", "managed": true, "token_lifetime_secs": 120, "federated_credentials": [
                {"name": "p", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:short"}]}
        ]}],
        "issuers": ["cluster"]
    }).to_string())
    .unwrap();
    let emu = start_with(Options {
        config,
        ..Options::default()
    })
    .await;
    for (client, sa, lo, hi) in [
        ("c-mi", "mi", 86_000, 86_400),
        ("c-app", "app", 3_500, 3_600),
        ("c-short", "short", 100, 120),
    ] {
        let (s, b) = exchange(
            &emu,
            TENANT,
            client,
            &sa_token(&emu, "cluster", sa),
            "https://vault.azure.net/.default",
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let expires = b["expires_in"].as_u64().unwrap();
        assert!((lo..hi).contains(&expires), "{client}: {expires}");
    }
}
