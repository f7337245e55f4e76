//! Key material and tokens: RSA and AES keys, JWKs, JWT signing and verification. Everything
//! goes through aws-lc-rs, the one crypto provider of the workspace.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    OaepPublicEncryptingKey, PrivateDecryptingKey,
};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    // The system RNG does not fail on Linux; a zeroed buffer would only weaken test keys.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut out);
    out
}

pub fn random_hex(bytes: usize) -> String {
    random_bytes(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A GUID-shaped random id.
pub fn random_guid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Generates an RSA key; returns its PKCS#8 DER.
pub fn generate_rsa(bits: u32) -> Result<Vec<u8>, String> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        other => {
            return Err(format!(
                "RSA key size {other} is not supported (2048, 3072, 4096)"
            ));
        }
    };
    let pair = KeyPair::generate(size).map_err(|e| e.to_string())?;
    let der = pair.as_der().map_err(|e| e.to_string())?;
    Ok(der.as_ref().to_vec())
}

/// The public modulus and exponent of an RSA key, big-endian.
pub fn rsa_public(pkcs8: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let pair = KeyPair::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
    let public = pair.public_key();
    Ok((
        public.modulus().big_endian_without_leading_zero().to_vec(),
        public.exponent().big_endian_without_leading_zero().to_vec(),
    ))
}

pub fn rsa_bits(pkcs8: &[u8]) -> usize {
    KeyPair::from_pkcs8(pkcs8)
        .map(|p| p.public_modulus_len() * 8)
        .unwrap_or(0)
}

fn oaep(alg: &str) -> Option<&'static aws_lc_rs::rsa::OaepAlgorithm> {
    match alg {
        "RSA-OAEP" => Some(&OAEP_SHA1_MGF1SHA1),
        "RSA-OAEP-256" => Some(&OAEP_SHA256_MGF1SHA256),
        _ => None,
    }
}

pub fn rsa_encrypt(pkcs8: &[u8], alg: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
    let alg = oaep(alg).ok_or("unsupported algorithm")?;
    let private = PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
    let public = OaepPublicEncryptingKey::new(private.public_key()).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(alg, plaintext, &mut out, None)
        .map_err(|_| "plaintext too long for this key and algorithm".to_string())?
        .len();
    out.truncate(n);
    Ok(out)
}

pub fn rsa_decrypt(pkcs8: &[u8], alg: &str, ciphertext: &[u8]) -> Result<Vec<u8>, String> {
    let alg = oaep(alg).ok_or("unsupported algorithm")?;
    let private = PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
    let key = OaepPrivateDecryptingKey::new(private).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; key.min_output_size()];
    let n = key
        .decrypt(alg, ciphertext, &mut out, None)
        .map_err(|_| "decryption failed".to_string())?
        .len();
    out.truncate(n);
    Ok(out)
}

pub fn aes_kw_wrap(kek: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap};
    let kek = AesKek::new(&AES_256, kek).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; plaintext.len() + 8];
    let n = kek
        .wrap(plaintext, &mut out)
        .map_err(|_| "A256KW needs a multiple of 8 bytes, at least 16".to_string())?
        .len();
    out.truncate(n);
    Ok(out)
}

pub fn aes_kw_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, String> {
    use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap};
    let kek = AesKek::new(&AES_256, kek).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; wrapped.len()];
    let n = kek
        .unwrap(wrapped, &mut out)
        .map_err(|_| "unwrap failed: wrong key or damaged input".to_string())?
        .len();
    out.truncate(n);
    Ok(out)
}

/// Whether Key Vault signs with `alg` on RSA keys (RS256/384/512, PS256/384/512).
pub fn signature_alg_ok(alg: &str) -> bool {
    signature_params(alg).is_some()
}

type SignatureParams = (
    &'static dyn aws_lc_rs::signature::RsaEncoding,
    &'static aws_lc_rs::signature::RsaParameters,
    &'static aws_lc_rs::digest::Algorithm,
);

fn signature_params(alg: &str) -> Option<SignatureParams> {
    use aws_lc_rs::digest::{SHA256, SHA384, SHA512};
    use aws_lc_rs::signature::*;
    Some(match alg {
        "RS256" => (&RSA_PKCS1_SHA256, &RSA_PKCS1_2048_8192_SHA256, &SHA256),
        "RS384" => (&RSA_PKCS1_SHA384, &RSA_PKCS1_2048_8192_SHA384, &SHA384),
        "RS512" => (&RSA_PKCS1_SHA512, &RSA_PKCS1_2048_8192_SHA512, &SHA512),
        "PS256" => (&RSA_PSS_SHA256, &RSA_PSS_2048_8192_SHA256, &SHA256),
        "PS384" => (&RSA_PSS_SHA384, &RSA_PSS_2048_8192_SHA384, &SHA384),
        "PS512" => (&RSA_PSS_SHA512, &RSA_PSS_2048_8192_SHA512, &SHA512),
        _ => return None,
    })
}

fn import_digest(
    alg: &'static aws_lc_rs::digest::Algorithm,
    digest: &[u8],
) -> Result<aws_lc_rs::digest::Digest, String> {
    aws_lc_rs::digest::Digest::import_less_safe(digest, alg).map_err(|_| {
        format!(
            "The digest must be {} bytes for this algorithm.",
            alg.output_len()
        )
    })
}

/// Signs a digest the caller computed, as Key Vault's sign operation does.
pub fn rsa_sign(pkcs8: &[u8], alg: &str, digest: &[u8]) -> Result<Vec<u8>, String> {
    let (encoding, _, hash) = signature_params(alg).ok_or("unsupported algorithm")?;
    let digest = import_digest(hash, digest)?;
    let pair = KeyPair::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
    let mut sig = vec![0u8; pair.public_modulus_len()];
    pair.sign_digest(encoding, &digest, &mut sig)
        .map_err(|_| "signing failed".to_string())?;
    Ok(sig)
}

/// Verifies a signature over a digest; whether it holds.
pub fn rsa_verify(pkcs8: &[u8], alg: &str, digest: &[u8], sig: &[u8]) -> Result<bool, String> {
    let (_, params, hash) = signature_params(alg).ok_or("unsupported algorithm")?;
    let digest = import_digest(hash, digest)?;
    let pair = KeyPair::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
    let public = aws_lc_rs::signature::UnparsedPublicKey::new(params, pair.public_key().as_ref());
    Ok(public.verify_digest(&digest, sig).is_ok())
}

/// An RS256 signing key with its JWK (`kid`, `n`, `e`).
pub struct SigningKey {
    pub kid: String,
    pkcs8: Vec<u8>,
    encoding: jsonwebtoken::EncodingKey,
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, String> {
        Self::from_pkcs8(generate_rsa(2048)?)
    }

    pub fn from_pkcs8(pkcs8: Vec<u8>) -> Result<SigningKey, String> {
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64(&pkcs8)
        );
        let encoding =
            jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let (n, _) = rsa_public(&pkcs8)?;
        let kid = b64url(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &n).as_ref()[..16]);
        Ok(SigningKey {
            kid,
            pkcs8,
            encoding,
        })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn jwk(&self) -> serde_json::Value {
        let (n, e) = rsa_public(&self.pkcs8).unwrap_or_default();
        serde_json::json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": b64url(&n), "e": b64url(&e)})
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| e.to_string())
    }

    /// Verifies an RS256 token signed by this key (signature, `exp`, `nbf`; the caller checks
    /// the other claims).
    pub fn verify<T: DeserializeOwned>(&self, token: &str, leeway: u64) -> Result<T, String> {
        let jwk = self.jwk();
        verify_with_jwk(token, &jwk, leeway)
    }
}

/// Verifies an RS256 token against one JWK.
pub fn verify_with_jwk<T: DeserializeOwned>(
    token: &str,
    jwk: &serde_json::Value,
    leeway: u64,
) -> Result<T, String> {
    let n = jwk["n"].as_str().ok_or("JWK without n")?;
    let e = jwk["e"].as_str().ok_or("JWK without e")?;
    let key = jsonwebtoken::DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.leeway = leeway;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.required_spec_claims = ["exp".to_string()].into();
    jsonwebtoken::decode::<T>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// The header and claims of a JWT, unverified: only to find out who claims to have signed it.
pub fn peek_jwt(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut parts = token.split('.');
    let header = serde_json::from_slice(&b64url_decode(parts.next()?)?).ok()?;
    let claims = serde_json::from_slice(&b64url_decode(parts.next()?)?).ok()?;
    parts.next()?;
    Some((header, claims))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
