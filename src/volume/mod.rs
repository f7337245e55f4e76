//! The lifecycle of a volume: create, stage, publish, unpublish, unstage, delete, expand,
//! stats, and the recovery that makes every step safe to repeat after a crash.

mod crash;
mod error;
mod header;
mod id;
mod lock;
mod manager;
mod params;
mod paths;
mod release;

pub(crate) use error::VolumeError;
pub(crate) use id::VolumeId;
pub(crate) use manager::{
    CreateRequest, Manager, NodeSettings, PublishRequest, TOPOLOGY_KEY, VolumeSummary,
    volume_context,
};
pub(crate) use params::{
    AccessMode, Capability, CapacityRange, VolumeParams, check_fs_type, parse_mount_flags,
};
pub(crate) use release::{KeyRelease, PodAuth};

/// The fscrypt key identifier recorded in the header of the volume file at `path`, if any.
pub(crate) fn recorded_key_identifier(path: &std::path::Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let (record, _) = header::read(&mut f).ok()?;
    record.kms?.key_identifier
}
