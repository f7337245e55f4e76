//! fscrypt v2 on a volume's `data/` directory: add the volume's key to its filesystem, set the
//! policy on first use (AES-256-XTS contents, AES-256-CTS names, 32-byte padding), verify it
//! after, and remove the key when the volume is no longer published.

use std::path::Path;
use std::time::Duration;

use crate::sys::{self, KEY_IDENTIFIER_SIZE, KeyStatus, Removal, SysError};

use super::DATA_DIR;

/// How often an eviction is retried while files are still open.
const BUSY_RETRIES: u32 = 3;
const BUSY_PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub(crate) enum CryptError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Unencrypted(String),
}

pub(crate) fn to_hex(id: &[u8; KEY_IDENTIFIER_SIZE]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<[u8; KEY_IDENTIFIER_SIZE]> {
    if s.len() != KEY_IDENTIFIER_SIZE * 2 {
        return None;
    }
    let mut out = [0u8; KEY_IDENTIFIER_SIZE];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Adds `key` to the filesystem mounted at `fs_root` and makes sure `data/` is encrypted under
/// it: a fresh, empty `data/` gets the policy; an existing policy must name this key. Returns
/// the key identifier (hex). On a mismatch the key is removed again.
pub(crate) fn unlock(
    fs_root: &Path,
    key: &[u8],
    expected: Option<&str>,
) -> Result<String, CryptError> {
    let id = sys::add_key(fs_root, key)?;
    let hex = to_hex(&id);
    let checked = check_policy(fs_root, &id, &hex, expected);
    if checked.is_err() {
        let _ = sys::remove_key(fs_root, &id);
    }
    checked.map(|()| hex)
}

fn check_policy(
    fs_root: &Path,
    id: &[u8; KEY_IDENTIFIER_SIZE],
    hex: &str,
    expected: Option<&str>,
) -> Result<(), CryptError> {
    if expected.is_some_and(|e| e != hex) {
        return Err(CryptError::Mismatch(
            "the unwrapped key is not the one this volume was encrypted with".into(),
        ));
    }
    let data = fs_root.join(DATA_DIR);
    match sys::policy_identifier(&data)? {
        Some(p) if &p == id => Ok(()),
        Some(_) => Err(CryptError::Mismatch(format!(
            "{} is encrypted under another key",
            data.display()
        ))),
        None => {
            let empty = std::fs::read_dir(&data)
                .map_err(|e| SysError::io("read_dir", &data, e))?
                .next()
                .is_none();
            if !empty {
                return Err(CryptError::Unencrypted(format!(
                    "{} holds unencrypted files; refusing to publish it",
                    data.display()
                )));
            }
            sys::set_policy(&data, id)?;
            Ok(())
        }
    }
}

/// Removes the key from the filesystem. Files still open keep the key until they are closed:
/// the kernel reports them busy; eviction is retried a few times (after a sync, so that dirty
/// pages are written), then reported as `FilesBusy`.
pub(crate) fn evict(fs_root: &Path, identifier: &str) -> Result<Removal, CryptError> {
    let id = from_hex(identifier)
        .ok_or_else(|| CryptError::Mismatch(format!("bad key identifier {identifier:?}")))?;
    let mut outcome = sys::remove_key(fs_root, &id)?;
    let mut tries = 0;
    while outcome == Removal::FilesBusy && tries < BUSY_RETRIES {
        tries += 1;
        nix::unistd::sync();
        std::thread::sleep(BUSY_PAUSE);
        outcome = match sys::remove_key(fs_root, &id)? {
            // The keyring entry went with the first call; absent now means fully gone.
            Removal::Absent => Removal::Removed,
            other => other,
        };
    }
    Ok(outcome)
}

/// The identifier the kernel derives from a v2 master key: HKDF-SHA512 with the all-zero salt,
/// info "fscrypt\0" and context byte 1 (HKDF_CONTEXT_KEY_IDENTIFIER), 16 bytes; lets a
/// re-authorization check an unwrapped key against the header without the kernel.
pub(crate) fn identifier_for(key: &[u8]) -> Result<String, CryptError> {
    use aws_lc_rs::hkdf::{HKDF_SHA512, KeyType, Salt};
    struct Len;
    impl KeyType for Len {
        fn len(&self) -> usize {
            KEY_IDENTIFIER_SIZE
        }
    }
    let prk = Salt::new(HKDF_SHA512, &[0u8; 64]).extract(key);
    let mut out = [0u8; KEY_IDENTIFIER_SIZE];
    prk.expand(&[b"fscrypt\0\x01"], Len)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| CryptError::Mismatch("HKDF failed".into()))?;
    Ok(to_hex(&out))
}

/// Whether the key is usable in the filesystem. A key removed while inodes were still in use
/// (a mounted target pins the encrypted `data/` directory) is "incompletely removed": its
/// secret is wiped, nothing new can be opened or created, and it counts as absent here.
pub(crate) fn key_present(fs_root: &Path, identifier: &str) -> Result<bool, CryptError> {
    let id = from_hex(identifier)
        .ok_or_else(|| CryptError::Mismatch(format!("bad key identifier {identifier:?}")))?;
    Ok(sys::key_status(fs_root, &id)? == KeyStatus::Present)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_round_trip_through_hex() {
        let id = [0xab; KEY_IDENTIFIER_SIZE];
        assert_eq!(from_hex(&to_hex(&id)), Some(id));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(32)), None);
    }
}
