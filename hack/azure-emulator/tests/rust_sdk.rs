//! The driver side's own crates against the emulator: azure_identity's
//! ClientAssertionCredential with the pod's token from memory, and azure_security_keyvault_keys
//! / _secrets 1.0 — the known-good client set-up the key path starts from: a custom cloud
//! (authority host = the emulator), a reqwest transport that trusts the emulator's CA, no
//! retries (so a refusal is immediate), and challenge-resource verification off (the emulator's
//! vault host is not *.vault.azure.net).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::Arc;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientMethodOptions, ClientOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientWrapKeyOptions, KeyOperationParameters,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use sealvol_azure_emulator::Emulator;

/// The pod's service-account token, held in memory: never a file.
#[derive(Debug)]
struct PodToken(String);

#[async_trait::async_trait]
impl ClientAssertion for PodToken {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

fn client_options(emu: &Emulator) -> ClientOptions {
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(emu.ca_cert_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = emu.base_url.clone();
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        cloud: Some(Arc::new(CloudConfiguration::from(cloud))),
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    }
}

fn credential(
    emu: &Emulator,
    client_id: &str,
    sa: &str,
) -> Arc<ClientAssertionCredential<PodToken>> {
    ClientAssertionCredential::new(
        TENANT.to_string(),
        client_id.to_string(),
        PodToken(sa_token(emu, "cluster", sa)),
        Some(ClientAssertionCredentialOptions {
            client_options: client_options(emu),
        }),
    )
    .unwrap()
}

#[tokio::test]
async fn client_assertion_credential_gets_a_token() {
    let emu = start().await;
    let token = credential(&emu, APP_CLIENT, "app")
        .get_token(&["https://vault.azure.net/.default"], None)
        .await
        .unwrap();
    assert_eq!(token.token.secret().split('.').count(), 3);
    assert_eq!(emu.count("entra.token", Some(200)), 1);
    let refused = credential(&emu, APP_CLIENT, "intruder")
        .get_token(&["https://vault.azure.net/.default"], None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("AADSTS70021"), "{refused}");
}

#[tokio::test]
async fn key_client_wraps_and_unwraps_with_rsa_oaep_256() {
    let emu = start().await;
    let options = KeyClientOptions {
        client_options: client_options(&emu),
        verify_challenge_resource: Some(false),
        ..KeyClientOptions::default()
    };
    let keys = KeyClient::new(
        &emu.vault_url("kv").unwrap(),
        credential(&emu, APP_CLIENT, "app"),
        Some(options.clone()),
    )
    .unwrap();
    let key = keys
        .get_key("kek", None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    let kid = key.key.and_then(|k| k.kid).unwrap();
    let version = kid.rsplit('/').next().unwrap().to_string();
    let dek = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_vec();
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: Some(dek.clone()),
        ..Default::default()
    };
    let wrap_options = KeyClientWrapKeyOptions {
        key_version: Some(version.clone()),
        ..Default::default()
    };
    let wrapped = keys
        .wrap_key("kek", params.try_into().unwrap(), Some(wrap_options))
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(wrapped.kid.as_deref(), Some(kid.as_str()));
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: wrapped.result.clone(),
        ..Default::default()
    };
    let unwrapped = keys
        .unwrap_key("kek", &version, params.try_into().unwrap(), None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(unwrapped.result.unwrap(), dek);
    // One token exchange served every call of the client.
    assert_eq!(emu.count("entra.token", Some(200)), 1);

    // An identity without a role: the SDK surfaces Key Vault's 403.
    let stranger = KeyClient::new(
        &emu.vault_url("kv").unwrap(),
        credential(&emu, OTHER_CLIENT, "other"),
        Some(options),
    )
    .unwrap();
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: wrapped.result,
        ..Default::default()
    };
    let err = stranger
        .unwrap_key("kek", &version, params.try_into().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err.http_status().map(u16::from), Some(403), "{err}");
}

#[tokio::test]
async fn secret_client_sets_and_gets() {
    let emu = start().await;
    let options = SecretClientOptions {
        client_options: client_options(&emu),
        verify_challenge_resource: Some(false),
        ..SecretClientOptions::default()
    };
    let secrets = SecretClient::new(
        &emu.vault_url("kv").unwrap(),
        credential(&emu, APP_CLIENT, "app"),
        Some(options),
    )
    .unwrap();
    let params = SetSecretParameters {
        value: Some("a 32-byte KEK, base64".into()),
        ..Default::default()
    };
    secrets
        .set_secret("kek2", params.try_into().unwrap(), None)
        .await
        .unwrap();
    let got = secrets
        .get_secret("kek2", None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(got.value.as_deref(), Some("a 32-byte KEK, base64"));
}
