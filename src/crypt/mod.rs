//! The data path of a volume: the filesystem on its loop device and the directory the pod
//! sees. Today that is plain ext4 created with the `encrypt` feature, so that an fscrypt v2
//! policy can be set on `data/` when the key path lands; a dm-crypt backend for block volumes
//! would be a sibling of `ext4`.

mod ext4;

pub(crate) use ext4::{DATA_DIR, ensure_data_dir, format, grow, grow_offline};
