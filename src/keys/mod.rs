//! The key hierarchy: a 64-byte data-encryption key (DEK) per volume, generated from the OS RNG,
//! wrapped by a key-encryption key (KEK) that never leaves Azure:
//! - keyMode `keyvault-key`: Key Vault wrapKey/unwrapKey on a Key Vault or Managed HSM key
//!   (RSA-OAEP-256 for RSA keys, A256KW for oct-HSM keys);
//! - keyMode `keyvault-secret`: the KEK is a Key Vault secret of 32 random bytes, and the DEK
//!   is sealed locally with AES-256-GCM, the volume id and header format as associated data.
//!
//! Every call uses the publishing pod's access token, so the Key Vault call is the
//! authorization check: no call, no key. Plaintext keys live only in `Dek` (locked in memory,
//! zeroized on drop, no Debug) and never in the header, a log or an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientMethodOptions, ClientOptions, Context, RetryOptions};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientUnwrapKeyOptions, KeyClientWrapKeyOptions, KeyOperationParameters,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::models::SecretClientGetSecretOptions;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};

use crate::sys;

pub(crate) const DEK_BYTES: usize = 64;
const SECRET_KEK_BYTES: usize = 32;

/// A volume's data-encryption key: the fscrypt master key.
pub(crate) struct Dek(Box<[u8; DEK_BYTES]>);

impl Dek {
    pub(crate) fn generate() -> Result<Dek, KeyError> {
        let mut dek = Dek(Box::new([0u8; DEK_BYTES]));
        sys::lock_in_memory(dek.0.as_slice());
        aws_lc_rs::rand::fill(dek.0.as_mut_slice())
            .map_err(|_| KeyError::Internal("the OS RNG failed".into()))?;
        Ok(dek)
    }

    fn from_slice(bytes: &[u8]) -> Result<Dek, KeyError> {
        if bytes.len() != DEK_BYTES {
            return Err(KeyError::Corrupt(format!(
                "the unwrapped key has {} bytes, not {DEK_BYTES}",
                bytes.len()
            )));
        }
        let mut dek = Dek(Box::new([0u8; DEK_BYTES]));
        sys::lock_in_memory(dek.0.as_slice());
        dek.0.copy_from_slice(bytes);
        Ok(dek)
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        self.0.zeroize();
        sys::unlock_memory(self.0.as_slice());
    }
}

/// Where a volume's KEK is and how its DEK is wrapped: recorded in the volume header. Holds
/// no key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KmsRecord {
    pub(crate) vault_url: String,
    #[serde(default)]
    pub(crate) key_name: Option<String>,
    /// A pinned KEK version; None: the latest at first publish (then recorded in `wrapped`).
    #[serde(default)]
    pub(crate) key_version: Option<String>,
    #[serde(default)]
    pub(crate) secret_name: Option<String>,
    /// RSA-OAEP-256, A256KW, or A256GCM (keyvault-secret).
    pub(crate) algorithm: String,
    #[serde(default)]
    pub(crate) client_id: Option<String>,
    #[serde(default)]
    pub(crate) tenant_id: Option<String>,
    /// Set at the first publish.
    #[serde(default)]
    pub(crate) wrapped: Option<WrappedDek>,
    /// The fscrypt key identifier (hex) the kernel derived from the DEK.
    #[serde(default)]
    pub(crate) key_identifier: Option<String>,
}

impl KmsRecord {
    /// What an audit line calls the KEK: "vault/key" or "vault/secret".
    pub(crate) fn kek_name(&self) -> String {
        self.key_name
            .as_deref()
            .or(self.secret_name.as_deref())
            .unwrap_or_default()
            .to_string()
    }
}

/// The DEK as wrapped by the KEK, and which KEK version did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WrappedDek {
    pub(crate) kek_version: String,
    pub(crate) ciphertext: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("Key Vault refused the pod's access token: {0}")]
    Unauthenticated(String),
    #[error("Key Vault denied the operation: {0}")]
    Denied(String),
    #[error("Key Vault is unavailable: {0}")]
    Unavailable(String),
    #[error("the wrapped key is damaged or not for this volume: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
}

/// The pod's access token, carried in each call's context.
#[derive(Clone)]
struct CallToken(AccessToken);

/// A credential that hands Key Vault the access token of the pod whose call this is (taken
/// from the call's context), so that one client per vault serves every pod and learns the
/// vault's challenge once.
#[derive(Debug)]
struct PodTokenFromContext;

#[async_trait::async_trait]
impl TokenCredential for PodTokenFromContext {
    async fn get_token(
        &self,
        _: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        options
            .and_then(|o| {
                o.method_options
                    .context
                    .value::<CallToken>()
                    .map(|t| t.0.clone())
            })
            .ok_or_else(|| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "no pod token on this call",
                )
            })
    }
}

fn call_options(token: &AccessToken) -> ClientMethodOptions<'static> {
    ClientMethodOptions {
        context: Context::new().with_value(CallToken(token.clone())),
    }
}

/// Attempts of one Key Vault operation, and the pause before the first retry (doubling).
const ATTEMPTS: u32 = 4;
const FIRST_PAUSE: Duration = Duration::from_millis(200);

/// Key Vault, as the driver calls it.
pub(crate) struct KeyVault {
    options: ClientOptions,
    /// Off only for the emulator, whose host is not *.vault.azure.net.
    verify_challenge_resource: bool,
    keys: Mutex<HashMap<String, Arc<KeyClient>>>,
    secrets: Mutex<HashMap<String, Arc<SecretClient>>>,
}

impl KeyVault {
    /// `options` carries the transport; retries are the driver's own (see `retrying`).
    pub(crate) fn new(mut options: ClientOptions, verify_challenge_resource: bool) -> KeyVault {
        // The SDK's retry reuses a request whose body its challenge handling stashed in a
        // context that the next attempt no longer has: a throttled challenge probe then goes
        // out again without its body. Each of our attempts is a complete new request instead.
        options.retry = RetryOptions::none();
        KeyVault {
            options,
            verify_challenge_resource,
            keys: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
        }
    }

    fn key_client(&self, vault_url: &str) -> Result<Arc<KeyClient>, KeyError> {
        let mut clients = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(vault_url) {
            return Ok(Arc::clone(c));
        }
        let options = KeyClientOptions {
            client_options: self.options.clone(),
            verify_challenge_resource: Some(self.verify_challenge_resource),
            ..KeyClientOptions::default()
        };
        let client = Arc::new(
            KeyClient::new(vault_url, Arc::new(PodTokenFromContext), Some(options)).map_err(
                |e| KeyError::Internal(format!("Key Vault client for {vault_url}: {e}")),
            )?,
        );
        clients.insert(vault_url.to_string(), Arc::clone(&client));
        Ok(client)
    }

    fn secret_client(&self, vault_url: &str) -> Result<Arc<SecretClient>, KeyError> {
        let mut clients = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(vault_url) {
            return Ok(Arc::clone(c));
        }
        let options = SecretClientOptions {
            client_options: self.options.clone(),
            verify_challenge_resource: Some(self.verify_challenge_resource),
            ..SecretClientOptions::default()
        };
        let client = Arc::new(
            SecretClient::new(vault_url, Arc::new(PodTokenFromContext), Some(options)).map_err(
                |e| KeyError::Internal(format!("Key Vault client for {vault_url}: {e}")),
            )?,
        );
        clients.insert(vault_url.to_string(), Arc::clone(&client));
        Ok(client)
    }

    async fn secret_kek(
        &self,
        kms: &KmsRecord,
        token: &AccessToken,
        version: Option<&str>,
    ) -> Result<(Zeroizing<Vec<u8>>, String), KeyError> {
        let client = self.secret_client(&kms.vault_url)?;
        let name = kms.secret_name.as_deref().unwrap_or_default();
        let secret = retrying("keyvault.get_secret", || async {
            let get = SecretClientGetSecretOptions {
                secret_version: version.map(str::to_string),
                method_options: call_options(token),
                ..Default::default()
            };
            client.get_secret(name, Some(get)).await?.into_model()
        })
        .await?;
        let version = secret
            .id
            .as_deref()
            .and_then(|id| id.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        let value = Zeroizing::new(secret.value.unwrap_or_default());
        let kek = Zeroizing::new(
            STANDARD
                .decode(value.trim())
                .map_err(|_| KeyError::Corrupt(format!("secret {name} is not base64")))?,
        );
        if kek.len() != SECRET_KEK_BYTES {
            return Err(KeyError::Corrupt(format!(
                "secret {name} holds {} bytes; a KEK is {SECRET_KEK_BYTES}",
                kek.len()
            )));
        }
        Ok((kek, version))
    }

    /// Wraps `dek` under the volume's KEK with the pod's token.
    pub(crate) async fn wrap(
        &self,
        kms: &KmsRecord,
        token: &AccessToken,
        dek: &Dek,
        aad: &[u8],
    ) -> Result<WrappedDek, KeyError> {
        if kms.secret_name.is_some() {
            let (kek, version) = self.secret_kek(kms, token, None).await?;
            let ciphertext = seal(&kek, aad, dek.expose())?;
            return Ok(WrappedDek {
                kek_version: version,
                ciphertext: STANDARD.encode(ciphertext),
            });
        }
        let client = self.key_client(&kms.vault_url)?;
        let algorithm = algorithm(&kms.algorithm)?;
        let result = retrying("keyvault.wrap", || async {
            let params = KeyOperationParameters {
                algorithm: Some(algorithm.clone()),
                value: Some(dek.expose().to_vec()),
                ..Default::default()
            };
            let options = KeyClientWrapKeyOptions {
                key_version: kms.key_version.clone(),
                method_options: call_options(token),
            };
            client
                .wrap_key(
                    kms.key_name.as_deref().unwrap_or_default(),
                    params.try_into()?,
                    Some(options),
                )
                .await?
                .into_model()
        })
        .await?;
        let version = result
            .kid
            .as_deref()
            .and_then(|kid| kid.rsplit('/').next())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| KeyError::Unavailable("wrapKey answered without a key id".into()))?
            .to_string();
        let ciphertext = result
            .result
            .ok_or_else(|| KeyError::Unavailable("wrapKey answered without a value".into()))?;
        Ok(WrappedDek {
            kek_version: version,
            ciphertext: STANDARD.encode(ciphertext),
        })
    }

    /// Unwraps the volume's DEK with the pod's token.
    pub(crate) async fn unwrap(
        &self,
        kms: &KmsRecord,
        token: &AccessToken,
        aad: &[u8],
    ) -> Result<Dek, KeyError> {
        let wrapped = kms
            .wrapped
            .as_ref()
            .ok_or_else(|| KeyError::Corrupt("the volume has no wrapped key yet".into()))?;
        let ciphertext = STANDARD
            .decode(&wrapped.ciphertext)
            .map_err(|_| KeyError::Corrupt("the wrapped key is not base64".into()))?;
        if kms.secret_name.is_some() {
            let (kek, _) = self
                .secret_kek(kms, token, Some(&wrapped.kek_version))
                .await?;
            let plain = open(&kek, aad, &ciphertext)?;
            return Dek::from_slice(&plain);
        }
        let client = self.key_client(&kms.vault_url)?;
        let algorithm = algorithm(&kms.algorithm)?;
        let result = retrying("keyvault.unwrap", || async {
            let params = KeyOperationParameters {
                algorithm: Some(algorithm.clone()),
                value: Some(ciphertext.clone()),
                ..Default::default()
            };
            let options = KeyClientUnwrapKeyOptions {
                method_options: call_options(token),
            };
            client
                .unwrap_key(
                    kms.key_name.as_deref().unwrap_or_default(),
                    &wrapped.kek_version,
                    params.try_into()?,
                    Some(options),
                )
                .await?
                .into_model()
        })
        .await?;
        let plain = Zeroizing::new(result.result.unwrap_or_default());
        Dek::from_slice(&plain)
    }
}

/// Runs a Key Vault operation, retrying what is transient (429, 5xx, no connection) with
/// doubling pauses, a few seconds in all; refusals (401, 403, 404) are not retried.
async fn retrying<T, F, Fut>(operation: &str, mut attempt: F) -> Result<T, KeyError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = azure_core::Result<T>>,
{
    let mut pause = FIRST_PAUSE;
    let mut tries = 0;
    loop {
        tries += 1;
        let started = std::time::Instant::now();
        let result = attempt().await.map_err(classify);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(KeyError::Unauthenticated(_)) => "unauthenticated",
            Err(KeyError::Denied(_)) => "denied",
            Err(KeyError::Unavailable(_)) => "unavailable",
            Err(_) => "error",
        };
        crate::metrics::metrics().azure_call(operation, outcome, started.elapsed());
        match result {
            Ok(v) => return Ok(v),
            Err(e) => match e {
                KeyError::Unavailable(reason) if tries < ATTEMPTS => {
                    tracing::debug!(attempt = tries, reason, "Key Vault call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                other => return Err(other),
            },
        }
    }
}

fn algorithm(name: &str) -> Result<EncryptionAlgorithm, KeyError> {
    match name {
        "RSA-OAEP-256" => Ok(EncryptionAlgorithm::RsaOaep256),
        "A256KW" => Ok(EncryptionAlgorithm::A256Kw),
        other => Err(KeyError::Corrupt(format!("unknown wrap algorithm {other}"))),
    }
}

/// 401: the token; 403 (RBAC, disabled key) and 404 (no such key): denied; other 4xx: a request
/// Key Vault will not take (a damaged wrapped key); the rest: unavailable.
fn classify(e: azure_core::Error) -> KeyError {
    let text: String = e
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(400)
        .collect();
    match e.http_status().map(u16::from) {
        Some(401) => KeyError::Unauthenticated(text),
        Some(403) | Some(404) => KeyError::Denied(text),
        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => KeyError::Corrupt(text),
        // With the root cause: "retry policy expired" alone tells an operator nothing.
        _ => KeyError::Unavailable(crate::error_text::with_causes(&e)),
    }
}

fn seal(kek: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, kek).map_err(|_| KeyError::Corrupt("bad KEK".into()))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce)
        .map_err(|_| KeyError::Internal("the OS RNG failed".into()))?;
    let mut buf = Zeroizing::new(plaintext.to_vec());
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut *buf,
    )
    .map_err(|_| KeyError::Internal("AES-GCM seal failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

fn open(kek: &[u8], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if sealed.len() < NONCE_LEN {
        return Err(KeyError::Corrupt("sealed key too short".into()));
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, kek).map_err(|_| KeyError::Corrupt("bad KEK".into()))?,
    );
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| KeyError::Corrupt("bad nonce".into()))?;
    let mut buf = Zeroizing::new(rest.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| {
            KeyError::Corrupt("AES-GCM authentication failed (wrong KEK version or volume)".into())
        })?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_mode_seal_is_bound_to_the_volume() {
        let kek = [7u8; 32];
        let dek = Dek::generate().unwrap();
        let sealed = seal(&kek, b"sv-a|1", dek.expose()).unwrap();
        assert_eq!(
            open(&kek, b"sv-a|1", &sealed).unwrap().as_slice(),
            dek.expose()
        );
        assert!(
            open(&kek, b"sv-b|1", &sealed).is_err(),
            "another volume's AAD"
        );
        assert!(open(&[8u8; 32], b"sv-a|1", &sealed).is_err(), "another KEK");
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(open(&kek, b"sv-a|1", &tampered).is_err());
    }

    #[test]
    fn deks_are_random_and_full_size() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a.expose(), b.expose());
        assert!(Dek::from_slice(&[0u8; 32]).is_err());
    }
}
