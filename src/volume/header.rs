//! The volume header: the first MiB of a volume's backing file, the volume's source of truth.
//!
//! Two 4 KiB slots, each `magic | format | generation | length | JSON record | crc32`. A write
//! goes to the slot the current generation does not occupy, then is synced; a reader takes
//! the valid slot with the highest generation. A torn write therefore leaves the previous
//! record readable, and the next write overwrites the torn slot. The record never holds a
//! plaintext key. Erasing both slots makes the file anonymous (and, once the key issue lands,
//! crypto-erases the volume).

use std::io::{Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use super::params::{KeyMode, Lifecycle, OnRevoke, Provisioning, WipeMode};
use crate::keys::KmsRecord;

/// Bytes before the filesystem starts; the loop device maps the file from this offset.
pub(crate) const HEADER_BYTES: u64 = 1 << 20;
const SLOT_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"SEALVOLH";
const FORMAT: u32 = 1;
const FIXED: usize = 8 + 4 + 8 + 4;
const MAX_RECORD: usize = SLOT_BYTES - FIXED - 4;

/// What sealvol knows about a volume, persisted in its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VolumeRecord {
    pub(crate) volume_id: String,
    pub(crate) name: String,
    pub(crate) capacity_bytes: u64,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) pool: String,
    pub(crate) fs_type: String,
    pub(crate) key_mode: KeyMode,
    pub(crate) wipe: WipeMode,
    /// Thick volumes have every block allocated; headers from before the field are thin.
    #[serde(default = "Provisioning::legacy")]
    pub(crate) provisioning: Provisioning,
    pub(crate) created_unix: u64,
    /// Set once mkfs has completed; a volume is mounted only after this is durable, so a
    /// volume without it never held data and may be formatted again.
    pub(crate) formatted: bool,
    /// The KEK's whereabouts and, after the first publish, the wrapped DEK.
    #[serde(default)]
    pub(crate) kms: Option<KmsRecord>,
    #[serde(default)]
    pub(crate) on_revoke: OnRevoke,
    /// The object events about this volume go to: its PVC, or an inline volume's pod.
    #[serde(default)]
    pub(crate) owner: Option<EventTarget>,
    /// For an inline volume whose first publish failed: since when (Unix ms) it has been kept,
    /// keyless, for kubelet's retries; `--refused-inline-ttl` later it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) refused_since_ms: Option<u64>,
    /// A snapshot's volume, or the snapshot or volume a volume was restored or cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<String>,
    /// The filesystem is smaller than the volume (restored from a smaller snapshot): the next
    /// stage grows it before mounting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) grow_filesystem: bool,
    /// The volume whose id the wrapped DEK's seal is bound to (its associated data), when not
    /// this volume's own: a snapshot, restore or clone keeps its source's wrapped DEK. Cleared
    /// when the DEK is wrapped again under this volume's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_bound_to: Option<String>,
    /// A snapshot's backup container, and whether its upload finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) backup: Option<super::backup::BackupRecord>,
}

/// A Kubernetes object to post events on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EventTarget {
    pub(crate) kind: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) uid: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("no valid header slot (not a sealvol volume, or its header was erased)")]
    NoValidSlot,
    #[error("record of {0} bytes does not fit a {MAX_RECORD}-byte slot")]
    TooLarge(usize),
    #[error("header I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the newest valid record and its generation.
pub(crate) fn read<R: Read + Seek>(r: &mut R) -> Result<(VolumeRecord, u64), HeaderError> {
    let mut best: Option<(VolumeRecord, u64)> = None;
    for slot in 0..2u64 {
        let mut buf = vec![0u8; SLOT_BYTES];
        r.seek(SeekFrom::Start(slot * SLOT_BYTES as u64))?;
        if let Err(e) = r.read_exact(&mut buf) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                continue;
            }
            return Err(e.into());
        }
        if let Some((record, generation)) = decode_slot(&buf)
            && best.as_ref().is_none_or(|(_, g)| generation > *g)
        {
            best = Some((record, generation));
        }
    }
    best.ok_or(HeaderError::NoValidSlot)
}

/// Writes `record` as generation `previous + 1` into the slot that does not hold `previous`.
/// The caller syncs the file. Returns the new generation.
pub(crate) fn write<W: Write + Seek>(
    w: &mut W,
    record: &VolumeRecord,
    previous: u64,
) -> Result<u64, HeaderError> {
    let generation = previous + 1;
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    if json.len() > MAX_RECORD {
        return Err(HeaderError::TooLarge(json.len()));
    }
    let mut buf = vec![0u8; SLOT_BYTES];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    buf[12..20].copy_from_slice(&generation.to_le_bytes());
    buf[20..24].copy_from_slice(&(json.len() as u32).to_le_bytes());
    buf[FIXED..FIXED + json.len()].copy_from_slice(&json);
    let crc = crc32fast::hash(&buf[..FIXED + json.len()]);
    buf[FIXED + json.len()..FIXED + json.len() + 4].copy_from_slice(&crc.to_le_bytes());
    w.seek(SeekFrom::Start((generation % 2) * SLOT_BYTES as u64))?;
    w.write_all(&buf)?;
    Ok(generation)
}

/// Overwrites both slots with zeros. The caller syncs the file.
pub(crate) fn erase<W: Write + Seek>(w: &mut W) -> Result<(), HeaderError> {
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&vec![0u8; 2 * SLOT_BYTES])?;
    Ok(())
}

fn decode_slot(buf: &[u8]) -> Option<(VolumeRecord, u64)> {
    if &buf[..8] != MAGIC || u32::from_le_bytes(buf[8..12].try_into().ok()?) != FORMAT {
        return None;
    }
    let generation = u64::from_le_bytes(buf[12..20].try_into().ok()?);
    let len = u32::from_le_bytes(buf[20..24].try_into().ok()?) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let stored = u32::from_le_bytes(buf[FIXED + len..FIXED + len + 4].try_into().ok()?);
    if crc32fast::hash(&buf[..FIXED + len]) != stored {
        return None;
    }
    let record = serde_json::from_slice(&buf[FIXED..FIXED + len]).ok()?;
    Some((record, generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn record(capacity: u64) -> VolumeRecord {
        VolumeRecord {
            refused_since_ms: None,
            source: None,
            grow_filesystem: false,
            key_bound_to: None,
            backup: None,
            volume_id: "sv-00000000000000000000000000000000".into(),
            name: "pvc-1".into(),
            capacity_bytes: capacity,
            lifecycle: Lifecycle::Persistent,
            pool: "default".into(),
            fs_type: "ext4".into(),
            key_mode: KeyMode::None,
            wipe: WipeMode::Discard,
            provisioning: Provisioning::Thick,
            created_unix: 1,
            formatted: false,
            kms: None,
            on_revoke: OnRevoke::Lock,
            owner: None,
        }
    }

    #[test]
    fn newest_generation_wins_and_slots_alternate() {
        let mut f = Cursor::new(vec![0u8; 3 * SLOT_BYTES]);
        let g1 = write(&mut f, &record(1), 0).unwrap();
        let g2 = write(&mut f, &record(2), g1).unwrap();
        assert_eq!(read(&mut f).unwrap(), (record(2), g2));
        // Tear the newest slot: the previous record is still there.
        let newest = (g2 % 2) as usize * SLOT_BYTES;
        f.get_mut()[newest + 30] ^= 0xff;
        assert_eq!(read(&mut f).unwrap(), (record(1), g1));
        // The next write goes over the torn slot.
        let g3 = write(&mut f, &record(3), g1).unwrap();
        assert_eq!(read(&mut f).unwrap(), (record(3), g3));
    }

    #[test]
    fn erased_or_blank_is_no_header() {
        let mut f = Cursor::new(vec![0u8; 3 * SLOT_BYTES]);
        assert!(matches!(read(&mut f), Err(HeaderError::NoValidSlot)));
        write(&mut f, &record(1), 0).unwrap();
        erase(&mut f).unwrap();
        assert!(matches!(read(&mut f), Err(HeaderError::NoValidSlot)));
    }

    #[test]
    fn oversized_record_is_refused() {
        let mut r = record(1);
        r.name = "x".repeat(SLOT_BYTES);
        let mut f = Cursor::new(vec![0u8; 3 * SLOT_BYTES]);
        assert!(matches!(
            write(&mut f, &r, 0),
            Err(HeaderError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn corruption_never_yields_a_wrong_record(pos in 0usize..2 * SLOT_BYTES, byte in any::<u8>()) {
            let mut f = Cursor::new(vec![0u8; 3 * SLOT_BYTES]);
            let g1 = write(&mut f, &record(1), 0).unwrap();
            write(&mut f, &record(2), g1).unwrap();
            f.get_mut()[pos] = byte;
            match read(&mut f) {
                Ok((r, _)) => prop_assert!(r == record(1) || r == record(2)),
                Err(e) => prop_assert!(matches!(e, HeaderError::NoValidSlot)),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3 * SLOT_BYTES)) {
            let _ = read(&mut Cursor::new(bytes));
        }
    }
}
