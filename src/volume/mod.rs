//! The lifecycle of a volume: create, stage, publish, unpublish, unstage, delete, expand,
//! stats, and the recovery that makes every step safe to repeat after a crash.

mod authorization;
mod backup;
mod crash;
mod create;
mod destroy;
mod error;
mod expand;
mod header;
mod id;
mod inline;
mod lock;
mod manager;
mod params;
mod paths;
mod policy;
mod publish;
mod recover;
mod release;
mod snapshot;
mod stage;

pub(crate) use create::{CreateRequest, VolumeSummary, volume_context};
pub(crate) use error::VolumeError;
pub(crate) use id::VolumeId;
use manager::{
    EXT4_ROOT_INO, INLINE_DIR, MountedHere, Volume, invalid, io_err, is_data_mount_of,
    is_fs_mount_of, mounted_here, not_found, now_unix, publications, staged_at, with_header_saves,
};
pub(crate) use manager::{Manager, NodeSettings, TOPOLOGY_KEY, loop_owner};
pub(crate) use params::parse_size;
pub(crate) use params::{
    AccessMode, Capability, CapacityRange, VolumeParams, check_fs_type, parse_mount_flags,
};
pub(crate) use policy::{NodePolicy, default_vault_hosts, parse_host_rules, parse_key_modes};
pub(crate) use publish::PublishRequest;
pub(crate) use release::{KeyRelease, PodAuth};
pub(crate) use snapshot::{ContentSource, SnapshotSummary};

/// The fscrypt key identifier recorded in the header of the volume file at `path`, if any.
pub(crate) fn recorded_key_identifier(path: &std::path::Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let (record, _) = header::read(&mut f).ok()?;
    record.kms?.key_identifier
}
