//! How a snapshot file is laid out in Blob storage: the manifest, and the cutting of the file's
//! written extents into blocks.
//!
//! The `data` blob is the concatenation of the snapshot file's written extents (holes and a
//! thick volume's reservation are not uploaded), cut into equal blocks; the manifest lists the
//! extents, so the file can be put back together sparse, and each block's SHA-256, so every
//! byte downloaded is checked. A block's id is its index and its SHA-256: a staged block whose
//! id matches is known to hold exactly those bytes (Put Block is all or nothing), which is what
//! lets an interrupted upload resume without uploading them again.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's format; a reader refuses others.
pub(crate) const MANIFEST_FORMAT: u32 = 1;
/// The smallest block; larger files get larger blocks, so no blob needs more than `MAX_BLOCKS`.
pub(crate) const MIN_BLOCK_BYTES: u64 = 4 << 20;
/// Azure's limit on the blocks of one block blob.
pub(crate) const MAX_BLOCKS: u64 = 50_000;
/// The largest volume a manifest may describe (the largest capacity CreateVolume accepts).
const MAX_SIZE_BYTES: u64 = 1 << 60;

/// What a backup holds, uploaded last: its presence in the container is what makes the backup
/// complete. Holds no key: the wrapped DEK is in the snapshot's header, inside the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub(crate) format: u32,
    pub(crate) snapshot_id: String,
    pub(crate) source_volume_id: String,
    pub(crate) created_unix: u64,
    /// The capacity of a volume restored from it, at least.
    pub(crate) size_bytes: u64,
    /// The snapshot file's length (its header and its filesystem).
    pub(crate) file_bytes: u64,
    pub(crate) block_bytes: u64,
    /// The file's written ranges (offset, length), in order; the data blob is their
    /// concatenation.
    pub(crate) extents: Vec<(u64, u64)>,
    /// Each block's SHA-256, in hex; every block is `block_bytes` long but the last.
    pub(crate) blocks: Vec<String>,
}

impl Manifest {
    /// The bytes the data blob holds.
    pub(crate) fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(_, len)| len).sum()
    }

    /// Checks what a reader relies on before it uses a number from the wire: the format, a
    /// bounded size, extents in order inside the file, the block size the writer picks for
    /// that much data (which bounds the memory a block takes), and one digest per block.
    pub(crate) fn check(&self, snapshot_id: &str) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} (this driver reads {MANIFEST_FORMAT})",
                self.format
            ));
        }
        if self.snapshot_id != snapshot_id {
            return Err(format!(
                "the manifest names snapshot {}, not {snapshot_id}",
                self.snapshot_id
            ));
        }
        if self.size_bytes == 0 || self.size_bytes > MAX_SIZE_BYTES {
            return Err(format!("size {} is out of range", self.size_bytes));
        }
        let mut end = 0u64;
        for &(offset, len) in &self.extents {
            let stop = offset.checked_add(len).ok_or("an extent overflows")?;
            if offset < end || len == 0 || stop > self.file_bytes {
                return Err(format!(
                    "extent ({offset}, {len}) is out of order or outside the {}-byte file",
                    self.file_bytes
                ));
            }
            end = stop;
        }
        if self.block_bytes != block_bytes_for(self.data_bytes()) {
            return Err(format!(
                "block size {} is not the one for {} bytes of data ({})",
                self.block_bytes,
                self.data_bytes(),
                block_bytes_for(self.data_bytes())
            ));
        }
        let want = self.data_bytes().div_ceil(self.block_bytes);
        if self.blocks.len() as u64 != want {
            return Err(format!(
                "{} block digests for {} bytes of data in {}-byte blocks",
                self.blocks.len(),
                self.data_bytes(),
                self.block_bytes
            ));
        }
        Ok(())
    }
}

/// The block size for `data_bytes` of data: `MIN_BLOCK_BYTES`, or more (whole MiB) when that
/// would make more than `MAX_BLOCKS` blocks.
pub(crate) fn block_bytes_for(data_bytes: u64) -> u64 {
    let needed = data_bytes.div_ceil(MAX_BLOCKS).div_ceil(1 << 20) << 20;
    needed.max(MIN_BLOCK_BYTES)
}

/// The file ranges (offset, length) that block `index` is made of.
pub(crate) fn block_segments(
    extents: &[(u64, u64)],
    block_bytes: u64,
    index: u64,
) -> Vec<(u64, u64)> {
    let start = index * block_bytes;
    let end = start + block_bytes;
    let mut out = Vec::new();
    let mut at = 0u64; // position in the data stream
    for &(offset, len) in extents {
        let (from, to) = (at.max(start), (at + len).min(end));
        if from < to {
            out.push((offset + (from - at), to - from));
        }
        at += len;
        if at >= end {
            break;
        }
    }
    out
}

/// A block's id: its index (8 bytes, big-endian) and its SHA-256; every id of a blob has the
/// same length, as Azure requires.
pub(crate) fn block_id(index: u64, sha256: &[u8; 32]) -> Vec<u8> {
    let mut id = index.to_be_bytes().to_vec();
    id.extend_from_slice(sha256);
    id
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_size_grows_past_the_block_limit() {
        assert_eq!(block_bytes_for(0), MIN_BLOCK_BYTES);
        assert_eq!(block_bytes_for(100 << 30), 4 << 20);
        let huge = 1u64 << 40; // 1 TiB: 4 MiB blocks would be 262144 of them
        let b = block_bytes_for(huge);
        assert!(huge.div_ceil(b) <= MAX_BLOCKS);
        assert_eq!(b % (1 << 20), 0);
    }

    #[test]
    fn a_block_spans_extents() {
        let extents = [(0, 3), (10, 4), (20, 5)];
        assert_eq!(block_segments(&extents, 4, 0), vec![(0, 3), (10, 1)]);
        assert_eq!(block_segments(&extents, 4, 1), vec![(11, 3), (20, 1)]);
        assert_eq!(block_segments(&extents, 4, 2), vec![(21, 4)]);
        assert!(block_segments(&extents, 4, 3).is_empty());
    }

    proptest! {
        /// The blocks cover the extents exactly once, in order.
        #[test]
        fn blocks_cover_the_data_once(
            lens in proptest::collection::vec((0u64..50, 1u64..40), 0..12),
            block in 1u64..30,
        ) {
            let mut extents = Vec::new();
            let mut at = 0;
            for (gap, len) in lens {
                at += gap;
                extents.push((at, len));
                at += len;
            }
            let total: u64 = extents.iter().map(|e| e.1).sum();
            let mut covered = Vec::new();
            for i in 0..total.div_ceil(block) {
                let segs = block_segments(&extents, block, i);
                let bytes: u64 = segs.iter().map(|s| s.1).sum();
                prop_assert!(bytes == block || i + 1 == total.div_ceil(block));
                for (o, l) in segs {
                    covered.extend(o..o + l);
                }
            }
            let want: Vec<u64> = extents.iter().flat_map(|&(o, l)| o..o + l).collect();
            prop_assert_eq!(covered, want);
        }

        /// A manifest as the writer makes it passes; one number changed does not.
        #[test]
        fn manifests_are_checked(
            lens in proptest::collection::vec((0u64..1 << 24, 1u64..1 << 24), 1..8),
            tail in 0u64..1 << 20,
            change in 0usize..5,
        ) {
            let mut extents = Vec::new();
            let mut at = 0;
            for (gap, len) in lens {
                at += gap;
                extents.push((at, len));
                at += len;
            }
            let data: u64 = extents.iter().map(|e| e.1).sum();
            let block_bytes = block_bytes_for(data);
            let valid = Manifest {
                format: MANIFEST_FORMAT,
                snapshot_id: "ss-x".into(),
                source_volume_id: String::new(),
                created_unix: 0,
                size_bytes: at + tail + 1,
                file_bytes: at + tail,
                block_bytes,
                extents,
                blocks: vec![String::new(); data.div_ceil(block_bytes) as usize],
            };
            prop_assert!(valid.check("ss-x").is_ok());
            let mut bad = valid.clone();
            match change {
                0 => bad.block_bytes = 4000 << 20,
                1 => bad.file_bytes = at - 1,
                2 => bad.blocks.push(String::new()),
                3 => bad.extents.push((0, 1)),
                _ => bad.size_bytes = u64::MAX,
            }
            prop_assert!(bad.check("ss-x").is_err(), "change {} passed", change);
        }
    }

    #[test]
    fn a_manifest_of_another_snapshot_or_format_is_refused() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            snapshot_id: "ss-a".into(),
            source_volume_id: String::new(),
            created_unix: 0,
            size_bytes: 10,
            file_bytes: 10,
            block_bytes: MIN_BLOCK_BYTES,
            extents: vec![(0, 10)],
            blocks: vec![String::new(); 1],
        };
        assert!(m.check("ss-a").is_ok());
        assert!(m.check("ss-b").is_err());
        assert!(
            Manifest {
                format: 2,
                ..m.clone()
            }
            .check("ss-a")
            .is_err()
        );
        assert!(
            Manifest {
                blocks: vec![String::new(); 2],
                ..m.clone()
            }
            .check("ss-a")
            .is_err()
        );
        assert!(
            Manifest {
                block_bytes: 4000 << 20,
                ..m
            }
            .check("ss-a")
            .is_err()
        );
    }
}
