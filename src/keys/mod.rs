//! The key hierarchy: a 64-byte data-encryption key (DEK) per volume, generated from the OS RNG,
//! wrapped by a key-encryption key (KEK) that never leaves Azure:
//! - keyMode `keyvault-key`: Key Vault wrapKey/unwrapKey on a Key Vault or Managed HSM key
//!   (RSA-OAEP-256 for RSA keys, A256KW for oct-HSM keys);
//! - keyMode `keyvault-secret`: the KEK is a Key Vault secret of 32 random bytes, and the DEK
//!   is sealed locally with AES-256-GCM, the volume id and header format as associated data.
//!
//! Every call uses the publishing pod's access token, so the Key Vault call is the
//! authorization check: no call, no key. Plaintext keys live only in the locked key arena
//! (`sys::KeyBytes`: `Dek` and a secret KEK; cleared on drop, no Debug), and on their way
//! through HTTP and JSON in buffers that are cleared when freed; never in the header, a log
//! or an error.

mod vault;

pub(crate) use vault::{Bearer, KeyVault, known_vault_suffixes};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::sys;

pub(crate) const DEK_BYTES: usize = 64;
pub(super) const SECRET_KEK_BYTES: usize = 32;

/// A volume's data-encryption key: the fscrypt master key, in a slot of the locked key arena.
pub(crate) struct Dek(sys::KeyBytes);

impl Dek {
    pub(crate) fn generate() -> Result<Dek, KeyError> {
        let mut dek = Dek(sys::KeyBytes::zeroed(DEK_BYTES).map_err(key_memory)?);
        aws_lc_rs::rand::fill(dek.0.as_mut_slice())
            .map_err(|_| KeyError::Internal("the OS RNG failed".into()))?;
        Ok(dek)
    }

    pub(super) fn from_slice(bytes: &[u8]) -> Result<Dek, KeyError> {
        if bytes.len() != DEK_BYTES {
            return Err(KeyError::Corrupt(format!(
                "the unwrapped key has {} bytes, not {DEK_BYTES}",
                bytes.len()
            )));
        }
        Ok(Dek(sys::KeyBytes::copy_of(bytes).map_err(key_memory)?))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_slice()
    }
}

fn key_memory(e: sys::SysError) -> KeyError {
    KeyError::Internal(e.to_string())
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
    /// A request Key Vault will not take (another 4xx): nothing about the pod's rights.
    #[error("Key Vault refused the request: {0}")]
    Rejected(String),
    #[error("{0}")]
    Internal(String),
}

pub(super) fn seal(kek: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
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

pub(super) fn open(kek: &[u8], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
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
