//! The data path of a volume: ext4 on its loop device, created with the `encrypt` feature, and
//! fscrypt v2 on its `data/` directory, which is what pods see. A dm-crypt backend for block
//! volumes would be a sibling of these modules.

mod ext4;
mod fscrypt;

pub(crate) use ext4::{DATA_DIR, ensure_data_dir, format, grow, grow_offline};
pub(crate) use fscrypt::{CryptError, evict, identifier_for, key_present, unlock};
