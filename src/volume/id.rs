//! Volume ids: a fixed format, checked before an id touches a path.
//!
//! Two shapes are accepted: `sv-` and 32 lowercase hex digits, which CreateVolume derives from
//! the volume's name (so a repeated CreateVolume finds its volume without a lookup table), and
//! `csi-` and 64 lowercase hex digits, the id kubelet gives a CSI inline ephemeral volume.
//! Nothing else can name a volume, so an id never contains `/` or `..`. Snapshots have ids
//! of their own shape, `ss-` and 32 hex digits derived from the snapshot's name, which only
//! `parse_snapshot` accepts (a snapshot id never names a volume, nor the other way round).

use std::fmt;

use sha2::{Digest, Sha256};

const OWN_PREFIX: &str = "sv-";
const OWN_HEX: usize = 32;
const INLINE_PREFIX: &str = "csi-";
const INLINE_HEX: usize = 64;
const SNAPSHOT_PREFIX: &str = "ss-";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct VolumeId(String);

impl VolumeId {
    /// Checks `raw` against the two accepted shapes; the error says what is accepted.
    pub(crate) fn parse(raw: &str) -> Result<VolumeId, String> {
        let ok = |prefix: &str, hex: usize| {
            raw.strip_prefix(prefix).is_some_and(|rest| {
                rest.len() == hex && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
        };
        if ok(OWN_PREFIX, OWN_HEX) || ok(INLINE_PREFIX, INLINE_HEX) {
            Ok(VolumeId(raw.to_string()))
        } else {
            // The value is not echoed: it is unchecked caller text.
            Err(format!(
                "a {}-byte value that is not a sealvol volume id (expected \"sv-\" and 32 lowercase hex digits, or kubelet's \"csi-\" and 64)",
                raw.len()
            ))
        }
    }

    /// The id CreateVolume gives the volume named `name`.
    pub(crate) fn for_name(name: &str) -> VolumeId {
        VolumeId(format!("{OWN_PREFIX}{}", name_digest(name)))
    }

    /// The id CreateSnapshot gives the snapshot named `name`.
    pub(crate) fn snapshot_for_name(name: &str) -> VolumeId {
        VolumeId(format!("{SNAPSHOT_PREFIX}{}", name_digest(name)))
    }

    /// Checks `raw` as a snapshot id; the error says what is accepted.
    pub(crate) fn parse_snapshot(raw: &str) -> Result<VolumeId, String> {
        let ok = raw.strip_prefix(SNAPSHOT_PREFIX).is_some_and(|rest| {
            rest.len() == OWN_HEX && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(VolumeId(raw.to_string()))
        } else {
            Err(format!(
                "a {}-byte value that is not a sealvol snapshot id (expected \"ss-\" and 32 lowercase hex digits)",
                raw.len()
            ))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// The first 16 bytes of SHA-256 of `name`, in hex.
fn name_digest(name: &str) -> String {
    Sha256::digest(name.as_bytes())[..OWN_HEX / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_own_and_inline_ids() {
        let own = VolumeId::for_name("pvc-1234");
        assert_eq!(VolumeId::parse(own.as_str()).unwrap(), own);
        let inline = format!("csi-{}", "ab".repeat(32));
        assert!(VolumeId::parse(&inline).is_ok());
    }

    #[test]
    fn snapshot_ids_are_their_own_shape() {
        let snap = VolumeId::snapshot_for_name("snapshot-1");
        assert_eq!(VolumeId::parse_snapshot(snap.as_str()).unwrap(), snap);
        assert!(VolumeId::parse(snap.as_str()).is_err());
        let vol = VolumeId::for_name("snapshot-1");
        assert!(VolumeId::parse_snapshot(vol.as_str()).is_err());
        assert!(VolumeId::parse_snapshot("ss-../../etc").is_err());
    }

    #[test]
    fn rejects_paths_and_wrong_shapes() {
        for bad in [
            "",
            "sv-",
            "../sv-00000000000000000000000000000000",
            "sv-0000000000000000000000000000000/",
            "sv-0000000000000000000000000000000G",
            "sv-000000000000000000000000000000000",
            "SV-00000000000000000000000000000000",
            "csi-00",
            "sv-00000000000000000000000000000000/..",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = "a".repeat(10_000);
        let msg = VolumeId::parse(&long).unwrap_err();
        assert!(msg.len() < 300, "the error echoes the whole oversized id");
    }

    proptest! {
        #[test]
        fn parsed_ids_are_safe_file_names(s in "\\PC{0,80}") {
            if let Ok(id) = VolumeId::parse(&s) {
                prop_assert!(!id.as_str().contains('/'));
                prop_assert!(!id.as_str().contains(".."));
            }
        }

        #[test]
        fn derived_ids_parse(name in "\\PC{1,128}") {
            let id = VolumeId::for_name(&name);
            prop_assert_eq!(VolumeId::parse(id.as_str()), Ok(id.clone()));
        }
    }
}
