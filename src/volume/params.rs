//! What a caller may ask of a volume, validated: StorageClass parameters (and the same keys as
//! inline-volume attributes), capacity ranges, sizes, and volume capabilities. Every refusal
//! names the field and what is accepted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::VolumeError;
use crate::keys::KmsRecord;
use crate::sys::MountFlags;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
/// The capacity of a volume whose request names none.
pub(crate) const DEFAULT_CAPACITY: u64 = GIB;
/// The smallest ext4 volume worth having (journal and metadata included).
pub(crate) const MIN_CAPACITY: u64 = 16 * MIB;
/// Kubernetes' own limit on a CSI volume name is 128 bytes; this leaves room for other COs.
const MAX_NAME_BYTES: usize = 256;

const BASIC_PARAMETERS: &[&str] = &["pool", "fsType", "keyMode", "wipe", "provisioning"];
/// The parameters that only an encrypted volume takes.
const KEY_PARAMETERS: &[&str] = &[
    "keyVaultURL",
    "keyName",
    "keyVersion",
    "keyAlgorithm",
    "secretName",
    "clientID",
    "tenantID",
    "onRevoke",
];
const INLINE_ONLY: &[&str] = &["size"];
/// Keys that Kubernetes adds (external-provisioner's `--extra-create-metadata`, kubelet's pod
/// info for inline volumes); accepted and ignored here.
const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Lifecycle {
    /// Created by CreateVolume, lives until DeleteVolume.
    Persistent,
    /// A CSI inline volume: created by its NodePublishVolume, destroyed by its unpublish.
    Ephemeral,
    /// A snapshot of a volume (CreateSnapshot), never staged; lives until DeleteSnapshot.
    Snapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum KeyMode {
    /// No encryption and no identity: for benchmarks, and only when named explicitly.
    None,
    KeyvaultKey,
    KeyvaultSecret,
}

impl KeyMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyMode::None => "none",
            KeyMode::KeyvaultKey => "keyvault-key",
            KeyMode::KeyvaultSecret => "keyvault-secret",
        }
    }
}

/// What a refused re-authorization does to a published volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnRevoke {
    /// Remove the key: nothing new can be opened or created. (Headers written by earlier
    /// versions may say `lock-and-unmount`: read as `lock`.)
    #[serde(alias = "lock-and-unmount")]
    #[default]
    Lock,
    /// Also evict the pod through the Eviction API (the node needs `pods/eviction` create).
    /// A host unmount would not do: a running container keeps its own copy of the mount.
    Evict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WipeMode {
    /// Release the blocks (a discard on the device).
    Discard,
    /// Overwrite the allocated blocks with zeros, then release them.
    Zero,
}

impl WipeMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WipeMode::Discard => "discard",
            WipeMode::Zero => "zero",
        }
    }
}

/// Whether a volume's blocks are reserved in the pool when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Provisioning {
    /// Every block allocated at create and at expansion (fallocate): what the pool promised
    /// is on disk, so something else filling the pool's filesystem cannot fail the volume's
    /// writes underneath ext4. The default.
    Thick,
    /// A sparse file: blocks are allocated as the pod writes. If something else fills the
    /// pool's filesystem, the volume's writes fail underneath ext4 and data can be lost. What
    /// volumes made before `provisioning` existed are.
    Thin,
}

impl Provisioning {
    /// What a header written before the field existed says: those files were sparse.
    pub(crate) fn legacy() -> Provisioning {
        Provisioning::Thin
    }
}

/// StorageClass parameters (or inline volume attributes), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeParams {
    pub(crate) pool: Option<String>,
    pub(crate) key_mode: KeyMode,
    pub(crate) wipe: WipeMode,
    pub(crate) provisioning: Provisioning,
    /// Where the KEK is, for the keyvault modes.
    pub(crate) kms: Option<KmsRecord>,
    pub(crate) on_revoke: OnRevoke,
    /// The PVC (namespace, name) external-provisioner's --extra-create-metadata names.
    pub(crate) pvc: Option<(String, String)>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> VolumeError {
    VolumeError::InvalidArgument {
        field,
        message: message.into(),
    }
}

impl VolumeParams {
    /// Parses CreateVolume `parameters`.
    pub(crate) fn from_parameters(map: &BTreeMap<String, String>) -> Result<Self, VolumeError> {
        Self::parse(map, "parameters", &[])
    }

    /// Parses an inline volume's `volume_context` (its `volumeAttributes` plus kubelet's pod
    /// keys) and the `size` attribute.
    pub(crate) fn from_inline_attributes(
        map: &BTreeMap<String, String>,
    ) -> Result<(Self, u64), VolumeError> {
        let params = Self::parse(map, "volume_context", INLINE_ONLY)?;
        let size = match map.get("size") {
            Some(s) => align_capacity(
                parse_size(s).map_err(|m| invalid("volume_context.size", m))?,
                "volume_context.size",
            )?,
            None => DEFAULT_CAPACITY,
        };
        Ok((params, size))
    }

    fn parse(
        map: &BTreeMap<String, String>,
        field: &'static str,
        extra: &[&str],
    ) -> Result<Self, VolumeError> {
        for key in map.keys() {
            if !(BASIC_PARAMETERS.contains(&key.as_str())
                || KEY_PARAMETERS.contains(&key.as_str())
                || extra.contains(&key.as_str())
                || key.starts_with(KUBERNETES_PREFIX))
            {
                let mut accepted: Vec<&str> = BASIC_PARAMETERS.to_vec();
                accepted.extend_from_slice(KEY_PARAMETERS);
                accepted.extend_from_slice(extra);
                let shown: String = key.chars().take(64).collect();
                return Err(invalid(
                    field,
                    format!(
                        "unknown key {shown:?}; accepted: {} (and {KUBERNETES_PREFIX}* keys)",
                        accepted.join(", ")
                    ),
                ));
            }
        }
        if let Some(fs) = map.get("fsType") {
            check_fs_type(fs).map_err(|m| invalid("fsType", m))?;
        }
        let key_mode = match map.get("keyMode").map(String::as_str) {
            Some("none") => KeyMode::None,
            None | Some("keyvault-key") => KeyMode::KeyvaultKey,
            Some("keyvault-secret") => KeyMode::KeyvaultSecret,
            Some(other) => {
                return Err(invalid(
                    "keyMode",
                    format!(
                        "{other:?} is not a key mode; accepted: keyvault-key, keyvault-secret, none"
                    ),
                ));
            }
        };
        let wipe = match map.get("wipe").map(String::as_str) {
            None | Some("discard") => WipeMode::Discard,
            Some("zero") => WipeMode::Zero,
            Some(other) => {
                return Err(invalid(
                    "wipe",
                    format!("{other:?} is not a wipe mode; accepted: discard, zero"),
                ));
            }
        };
        let provisioning = match map.get("provisioning").map(String::as_str) {
            None | Some("thick") => Provisioning::Thick,
            Some("thin") => Provisioning::Thin,
            Some(other) => {
                return Err(invalid(
                    "provisioning",
                    format!(
                        "{other:?} is not accepted; use thick (default: blocks reserved at create) or thin (sparse; see the docs for the risk)"
                    ),
                ));
            }
        };
        let pool = map.get("pool").cloned();
        if let Some(p) = &pool
            && !crate::pool::valid_pool_name(p)
        {
            return Err(invalid("pool", format!("{p:?} is not a pool name")));
        }
        let kms = kms_record(map, key_mode)?;
        let on_revoke = match map.get("onRevoke").map(String::as_str) {
            None | Some("lock") => OnRevoke::Lock,
            Some("evict") => OnRevoke::Evict,
            Some("lock-and-unmount") => {
                return Err(invalid(
                    "onRevoke",
                    "lock-and-unmount is no longer accepted: a host unmount never reaches a running container, and it left pods stuck in Terminating; use lock (default) or evict",
                ));
            }
            Some(other) => {
                return Err(invalid(
                    "onRevoke",
                    format!("{other:?} is not accepted; use lock (default) or evict"),
                ));
            }
        };
        let pvc = match (
            map.get("csi.storage.k8s.io/pvc/namespace"),
            map.get("csi.storage.k8s.io/pvc/name"),
        ) {
            (Some(ns), Some(name)) => Some((ns.clone(), name.clone())),
            _ => None,
        };
        Ok(VolumeParams {
            pool,
            key_mode,
            wipe,
            provisioning,
            kms,
            on_revoke,
            pvc,
        })
    }
}

/// The KEK's whereabouts from the parameters; every missing or malformed one is named.
fn kms_record(
    map: &BTreeMap<String, String>,
    mode: KeyMode,
) -> Result<Option<KmsRecord>, VolumeError> {
    let get = |k: &str| {
        map.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if mode == KeyMode::None {
        for &k in KEY_PARAMETERS {
            if map.contains_key(k) {
                return Err(invalid(
                    "keyMode",
                    format!("is none, which takes no {k}; use keyvault-key or keyvault-secret"),
                ));
            }
        }
        return Ok(None);
    }
    let vault_url = get("keyVaultURL").ok_or_else(|| {
        invalid(
            "keyVaultURL",
            format!(
                "is required with keyMode {} (https://NAME.vault.azure.net)",
                mode.as_str()
            ),
        )
    })?;
    let host_ok = vault_url
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(['?', '#', ' ', '@']));
    if !host_ok || vault_url.len() > 512 {
        return Err(invalid(
            "keyVaultURL",
            "must be an https:// URL of a Key Vault or Managed HSM",
        ));
    }
    let name_ok =
        |v: &str| v.len() <= 127 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let (key_name, secret_name, algorithm) = match mode {
        KeyMode::KeyvaultKey => {
            if map.contains_key("secretName") {
                return Err(invalid(
                    "secretName",
                    "belongs to keyMode keyvault-secret, not keyvault-key",
                ));
            }
            let key = get("keyName")
                .ok_or_else(|| invalid("keyName", "is required with keyMode keyvault-key"))?;
            if !name_ok(&key) {
                return Err(invalid("keyName", "must be 1-127 letters, digits and '-'"));
            }
            let alg = match get("keyAlgorithm").as_deref() {
                None | Some("RSA-OAEP-256") => "RSA-OAEP-256",
                Some("A256KW") => "A256KW",
                Some(other) => {
                    return Err(invalid(
                        "keyAlgorithm",
                        format!(
                            "{other:?} is not accepted; use RSA-OAEP-256 (RSA keys) or A256KW (Managed HSM oct-HSM keys)"
                        ),
                    ));
                }
            };
            (Some(key), None, alg)
        }
        KeyMode::KeyvaultSecret => {
            for k in ["keyName", "keyVersion", "keyAlgorithm"] {
                if map.contains_key(k) {
                    return Err(invalid(
                        "keyMode",
                        format!("keyvault-secret takes secretName, not {k}"),
                    ));
                }
            }
            let secret = get("secretName")
                .ok_or_else(|| invalid("secretName", "is required with keyMode keyvault-secret"))?;
            if !name_ok(&secret) {
                return Err(invalid(
                    "secretName",
                    "must be 1-127 letters, digits and '-'",
                ));
            }
            (None, Some(secret), "A256GCM")
        }
        KeyMode::None => (None, None, ""),
    };
    let key_version = get("keyVersion");
    if key_version.as_deref().is_some_and(|v| !name_ok(v)) {
        return Err(invalid(
            "keyVersion",
            "must be a Key Vault key version (hex)",
        ));
    }
    Ok(Some(KmsRecord {
        vault_url: vault_url.trim_end_matches('/').to_string(),
        key_name,
        key_version,
        secret_name,
        algorithm: algorithm.to_string(),
        client_id: get("clientID"),
        tenant_id: get("tenantID"),
        wrapped: None,
        key_identifier: None,
    }))
}

pub(crate) fn check_fs_type(fs: &str) -> Result<(), String> {
    match fs {
        "" | "ext4" => Ok(()),
        other => Err(format!("{other:?} is not supported; accepted: ext4")),
    }
}

/// Checks a volume name (CreateVolume `name`).
pub(crate) fn check_name(name: &str) -> Result<(), VolumeError> {
    if name.is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid(
            "name",
            format!(
                "is {} bytes; at most {MAX_NAME_BYTES} are accepted",
                name.len()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("name", "must not contain control characters"));
    }
    Ok(())
}

/// A CSI capacity range: 0 means "not set" for either bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CapacityRange {
    pub(crate) required_bytes: i64,
    pub(crate) limit_bytes: i64,
}

impl CapacityRange {
    /// The capacity to create: the required size rounded up to whole MiB (at least the
    /// minimum), or the default when none is required, within the limit.
    pub(crate) fn resolve(self) -> Result<u64, VolumeError> {
        if self.required_bytes < 0 {
            return Err(invalid(
                "capacity_range.required_bytes",
                "must not be negative",
            ));
        }
        if self.limit_bytes < 0 {
            return Err(invalid(
                "capacity_range.limit_bytes",
                "must not be negative",
            ));
        }
        let required = self.required_bytes as u64;
        let limit = self.limit_bytes as u64;
        if limit != 0 && limit < required {
            return Err(invalid(
                "capacity_range",
                format!("limit_bytes {limit} is below required_bytes {required}"),
            ));
        }
        let size = if required == 0 {
            let default = DEFAULT_CAPACITY;
            if limit != 0 {
                default.min(limit / MIB * MIB)
            } else {
                default
            }
        } else {
            required.div_ceil(MIB) * MIB
        }
        .max(MIN_CAPACITY);
        if limit != 0 && size > limit {
            return Err(VolumeError::OutOfRange(format!(
                "capacity_range: volumes are whole MiB and at least {MIN_CAPACITY} bytes; none fits between {required} and {limit} bytes"
            )));
        }
        Ok(size)
    }

    /// Whether an existing volume of `capacity` bytes satisfies this range.
    pub(crate) fn admits(self, capacity: u64) -> bool {
        capacity >= self.required_bytes.max(0) as u64
            && (self.limit_bytes <= 0 || capacity <= self.limit_bytes as u64)
    }
}

fn align_capacity(bytes: u64, field: &'static str) -> Result<u64, VolumeError> {
    if bytes > (1u64 << 60) {
        return Err(invalid(field, "is larger than 1 EiB"));
    }
    Ok((bytes.div_ceil(MIB) * MIB).max(MIN_CAPACITY))
}

/// Parses a Kubernetes-style quantity: plain bytes, or a number with one of the suffixes
/// Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let err = || {
        format!(
            "{:?} is not a size; use bytes or a number with Ki, Mi, Gi, Ti, k, M, G or T",
            s.chars().take(32).collect::<String>()
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() || digits.len() > 19 {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// The single-node access modes sealvol serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Named as in the CSI spec, so a reader can match them to its text.
#[allow(clippy::enum_variant_names)]
pub(crate) enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub(crate) fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
}

/// A volume capability, validated: a mounted ext4 filesystem with one of the single-node
/// access modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capability {
    pub(crate) access_mode: AccessMode,
    pub(crate) mount_flags: MountFlags,
}

/// Parses StorageClass `mountOptions` into the flags sealvol supports.
pub(crate) fn parse_mount_flags(options: &[String]) -> Result<MountFlags, VolumeError> {
    let mut flags = MountFlags::default();
    for opt in options {
        match opt.as_str() {
            "noatime" => flags.noatime = true,
            "lazytime" => flags.lazytime = true,
            "relatime" | "defaults" => {}
            "discard" => flags.discard = true,
            other => {
                return Err(invalid(
                    "volume_capability.mount.mount_flags",
                    format!(
                        "{:?} is not supported; accepted: noatime, lazytime, relatime, discard, defaults",
                        other.chars().take(64).collect::<String>()
                    ),
                ));
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_name_what_is_accepted() {
        let ok = VolumeParams::from_parameters(&map(&[
            ("keyMode", "none"),
            ("wipe", "zero"),
            ("pool", "fast"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(ok.wipe, WipeMode::Zero);
        let e = VolumeParams::from_parameters(&map(&[("keyMode", "none"), ("colour", "blue")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("colour") && e.contains("pool, fsType, keyMode, wipe"),
            "{e}"
        );
        let e = VolumeParams::from_parameters(&map(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("keyVaultURL") && e.contains("keyvault-key"),
            "{e}"
        );
        let kv = VolumeParams::from_parameters(&map(&[
            ("keyVaultURL", "https://kv.vault.azure.net/"),
            ("keyName", "kek"),
            ("clientID", "c"),
        ]))
        .unwrap();
        let kms = kv.kms.unwrap();
        assert_eq!(
            (kms.vault_url.as_str(), kms.algorithm.as_str()),
            ("https://kv.vault.azure.net", "RSA-OAEP-256")
        );
        for bad in [
            vec![("keyVaultURL", "http://kv"), ("keyName", "k")],
            vec![("keyVaultURL", "https://kv")],
            vec![("keyVaultURL", "https://kv"), ("keyName", "../k")],
            vec![
                ("keyVaultURL", "https://kv"),
                ("keyName", "k"),
                ("keyAlgorithm", "RSA1_5"),
            ],
            vec![
                ("keyMode", "keyvault-secret"),
                ("keyVaultURL", "https://kv"),
            ],
            vec![
                ("keyMode", "keyvault-secret"),
                ("keyVaultURL", "https://kv"),
                ("secretName", "s"),
                ("keyName", "k"),
            ],
            vec![("keyMode", "none"), ("keyVaultURL", "https://kv")],
        ] {
            assert!(
                VolumeParams::from_parameters(&map(&bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(
            VolumeParams::from_parameters(&map(&[("keyMode", "none"), ("fsType", "xfs")])).is_err()
        );
        assert!(
            VolumeParams::from_parameters(&map(&[("keyMode", "none"), ("wipe", "shred")])).is_err()
        );
        assert!(
            VolumeParams::from_parameters(&map(&[("keyMode", "none"), ("pool", "../x")])).is_err()
        );
    }

    #[test]
    fn capacity_ranges() {
        let r = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(r(0, 0).resolve().unwrap(), DEFAULT_CAPACITY);
        assert_eq!(r(1, 0).resolve().unwrap(), MIN_CAPACITY);
        assert_eq!(r(100 * MIB as i64 + 1, 0).resolve().unwrap(), 101 * MIB);
        assert_eq!(r(0, 64 * MIB as i64).resolve().unwrap(), 64 * MIB);
        assert!(matches!(
            r(10, 5).resolve(),
            Err(VolumeError::InvalidArgument { .. })
        ));
        assert!(matches!(
            r(-1, 0).resolve(),
            Err(VolumeError::InvalidArgument { .. })
        ));
        assert!(matches!(
            r(0, MIB as i64).resolve(),
            Err(VolumeError::OutOfRange(_))
        ));
        assert!(matches!(
            r(MIB as i64 + 1, MIB as i64 + 2).resolve(),
            Err(VolumeError::OutOfRange(_))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1Gi").unwrap(), GIB);
        assert_eq!(parse_size("512Mi").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "-1",
            "1Pi",
            "1 Gi",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999Ti").is_err());
    }

    proptest! {
        #[test]
        fn resolved_capacity_is_within_range(required in 0i64..(1 << 40), slack in 0i64..(1 << 30)) {
            let range = CapacityRange { required_bytes: required, limit_bytes: required + slack };
            if let Ok(size) = range.resolve() {
                prop_assert!(range.admits(size) || required == 0);
                prop_assert_eq!(size % MIB, 0);
            }
        }

        #[test]
        fn parse_size_never_panics(s in "\\PC{0,40}") {
            let _ = parse_size(&s);
        }
    }
}
