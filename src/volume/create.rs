//! The controller side of a volume's life: CreateVolume (a sparse file with its header, placed
//! on a pool disk with room for it), DeleteVolume, ListVolumes, GetCapacity and
//! ValidateVolumeCapabilities. Every call is idempotent: a compatible existing volume is
//! success, an incompatible one ALREADY_EXISTS.

use std::collections::BTreeMap;
use std::fs::OpenOptions;

use super::header::{self, EventTarget, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::params::{
    CapacityRange, KeyMode, Lifecycle, MIN_CAPACITY, Provisioning, VolumeParams, WipeMode,
};
use super::{
    Manager, TOPOLOGY_KEY, Volume, VolumeError, crash, invalid, io_err, not_found, now_unix,
};
use crate::pool::Disk;
use crate::sys;

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub(crate) struct CreateRequest {
    pub(crate) name: String,
    pub(crate) capacity: CapacityRange,
    pub(crate) params: VolumeParams,
    /// `accessibility_requirements.requisite`: when not empty, one entry must name this node.
    pub(crate) requisite_nodes: Vec<Option<String>>,
    /// `volume_content_source`: a snapshot to restore or a volume to clone.
    pub(crate) source: Option<super::snapshot::ContentSource>,
}

/// What the CO learns about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeSummary {
    pub(crate) id: VolumeId,
    pub(crate) capacity_bytes: u64,
    pub(crate) pool: String,
    pub(crate) key_mode: KeyMode,
    pub(crate) wipe: WipeMode,
}

/// GetCapacity's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolCapacity {
    pub(crate) available_bytes: u64,
    pub(crate) maximum_volume_bytes: u64,
    pub(crate) minimum_volume_bytes: u64,
}

impl Manager {
    /// Creates the volume named `req.name`, or returns it if it exists with compatible
    /// settings (ALREADY_EXISTS otherwise). The volume is a sparse file with a header; it
    /// takes no space until written.
    pub(crate) fn create_volume(&self, req: &CreateRequest) -> Result<VolumeSummary, VolumeError> {
        super::params::check_name(&req.name)?;
        if !req.requisite_nodes.is_empty()
            && !req
                .requisite_nodes
                .iter()
                .any(|n| n.as_deref() == Some(self.settings.node_id.as_str()))
        {
            return Err(VolumeError::ResourceExhausted(format!(
                "accessibility_requirements.requisite does not include this node ({TOPOLOGY_KEY}={}); sealvol volumes live on the node that creates them",
                self.settings.node_id
            )));
        }
        self.settings.policy.check(&req.params, "parameters")?;
        let capacity = req.capacity.resolve()?;
        let pool = self.pools.get(req.params.pool.as_deref())?;
        let id = VolumeId::for_name(&req.name);
        let _guard = self.lock(&id)?;
        if let Some(leftover) = self.pools.find_deleting(id.as_str()) {
            self.finish_destroy(&leftover)?;
        }
        if let Some(vol) = self.load(&id)? {
            return self.check_compatible(vol, req);
        }
        if let Some(source) = &req.source {
            return self.create_volume_from(req, &id, source);
        }

        let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let file_bytes = HEADER_BYTES + capacity;
        let (disk, free) = pool.place(file_bytes)?;
        let disk = disk.ok_or_else(|| {
            VolumeError::ResourceExhausted(format!(
                "pool {} cannot hold {capacity} bytes: the largest free space on one of its disks is less (free in the pool: {free} bytes, counting space promised to existing volumes)",
                pool.name
            ))
        })?;
        let record = VolumeRecord {
            refused_since_ms: None,
            source: None,
            grow_filesystem: false,
            key_bound_to: None,
            backup: None,
            volume_id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            lifecycle: Lifecycle::Persistent,
            pool: pool.name.clone(),
            fs_type: "ext4".into(),
            key_mode: req.params.key_mode,
            wipe: req.params.wipe,
            provisioning: req.params.provisioning,
            created_unix: now_unix(),
            formatted: false,
            kms: req.params.kms.clone(),
            on_revoke: req.params.on_revoke,
            owner: owner_of(req),
        };
        self.create_file(disk, &record)?;
        tracing::info!(volume.id = %id, volume.name = %req.name, pool = %pool.name, capacity, "volume created");
        Ok(summary(&id, &record))
    }

    pub(super) fn check_compatible(
        &self,
        vol: Volume,
        req: &CreateRequest,
    ) -> Result<VolumeSummary, VolumeError> {
        let r = &vol.record;
        let pool_matches = req.params.pool.as_deref().is_none_or(|p| p == r.pool);
        let wanted_source = req.source.as_ref().map(|s| match s {
            super::snapshot::ContentSource::Snapshot(id)
            | super::snapshot::ContentSource::Volume(id) => id.to_string(),
        });
        if wanted_source != r.source {
            return Err(VolumeError::AlreadyExists(format!(
                "volume {:?} exists as {}, made from {}: not from {}",
                req.name,
                vol.id,
                r.source.as_deref().unwrap_or("nothing"),
                wanted_source.as_deref().unwrap_or("nothing")
            )));
        }
        if r.name != req.name
            || r.lifecycle != Lifecycle::Persistent
            || !req.capacity.admits(r.capacity_bytes)
            || !pool_matches
            || r.key_mode != req.params.key_mode
            || r.wipe != req.params.wipe
            || !same_kek(r.kms.as_ref(), req.params.kms.as_ref())
        {
            return Err(VolumeError::AlreadyExists(format!(
                "volume {:?} exists as {} with {} bytes in pool {}, keyMode {}, wipe {}: not compatible with this request",
                req.name,
                vol.id,
                r.capacity_bytes,
                r.pool,
                r.key_mode.as_str(),
                r.wipe.as_str()
            )));
        }
        tracing::debug!(volume.id = %vol.id, "volume already exists");
        Ok(summary(&vol.id, r))
    }

    /// Writes the file under a temporary name and renames it into place, so a crash leaves
    /// either no volume or a complete one (and a `.creating` file that recovery removes).
    pub(super) fn create_file(
        &self,
        disk: &Disk,
        record: &VolumeRecord,
    ) -> Result<(), VolumeError> {
        let tmp = disk.creating_path(&record.volume_id);
        let path = disk.volume_path(&record.volume_id);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.set_len(HEADER_BYTES + record.capacity_bytes)
            .map_err(io_err("size", &tmp))?;
        if record.provisioning == Provisioning::Thick
            && let Err(e) = sys::reserve(&file, &tmp, 0, HEADER_BYTES + record.capacity_bytes)
        {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Err(reserve_error(e, record.capacity_bytes));
        }
        header::write(&mut file, record, 0).map_err(|source| VolumeError::Header {
            volume_id: record.volume_id.clone(),
            source,
        })?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        crash::point("create.before_rename");
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        sys::fsync_dir(&disk.dir)?;
        Ok(())
    }

    /// Deletes the volume and wipes it: the header's key slot is destroyed and the file's
    /// blocks are released (overwritten first with `wipe=zero`). A volume that does not exist
    /// is already deleted. A volume still staged or published here is FAILED_PRECONDITION.
    pub(crate) fn delete_volume(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let _guard = self.lock(id)?;
        if let Some(leftover) = self.pools.find_deleting(id.as_str()) {
            self.finish_destroy(&leftover)?;
        }
        let Some(vol) = self.load(id)? else {
            tracing::debug!(volume.id = %id, "volume already deleted");
            return Ok(());
        };
        self.ensure_unused(&vol)?;
        self.destroy(&vol)?;
        tracing::info!(volume.id = %id, wipe = vol.record.wipe.as_str(), "volume deleted and wiped");
        Ok(())
    }

    /// Volumes in id order, `max_entries` at a time (0: all); the token is the last id
    /// returned.
    pub(crate) fn list_volumes(
        &self,
        starting_token: &str,
        max_entries: i32,
    ) -> Result<(Vec<VolumeSummary>, Option<String>), VolumeError> {
        let mut names = Vec::new();
        for (_, disk) in self.pools.disks() {
            names.extend(disk.volume_ids()?);
        }
        page(
            names,
            VolumeId::parse,
            starting_token,
            max_entries,
            |id| match self.load(id) {
                Ok(vol) => vol.map(|v| summary(&v.id, &v.record)),
                Err(e) => {
                    tracing::warn!(volume.id = %id, error = %e, "skipping unreadable volume");
                    None
                }
            },
        )
    }

    /// Free space of one pool (the default when `pool` is None).
    pub(crate) fn capacity(&self, pool: Option<&str>) -> Result<PoolCapacity, VolumeError> {
        let pool = self.pools.get(pool)?;
        let (_, free, largest) = pool.space()?;
        Ok(PoolCapacity {
            available_bytes: free,
            maximum_volume_bytes: largest.saturating_sub(HEADER_BYTES),
            minimum_volume_bytes: MIN_CAPACITY,
        })
    }

    /// Confirms that the volume exists; capabilities are validated by the caller's parse.
    pub(crate) fn validate(&self, id: &VolumeId) -> Result<(), VolumeError> {
        self.load(id)?.map(|_| ()).ok_or_else(|| not_found(id))
    }
}

/// Whether two volumes name the same KEK (the wrapped key and its identifier aside).
pub(super) fn same_kek(
    a: Option<&crate::keys::KmsRecord>,
    b: Option<&crate::keys::KmsRecord>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.vault_url == b.vault_url
                && a.key_name == b.key_name
                && a.key_version == b.key_version
                && a.secret_name == b.secret_name
                && a.algorithm == b.algorithm
                && a.client_id == b.client_id
                && a.tenant_id == b.tenant_id
        }
        _ => false,
    }
}

/// One page of a listing (ListVolumes, ListSnapshots): the file names that `parse` takes as
/// ids, in id order, after `starting_token`, `max_entries` at a time (0: all); `entry` makes
/// one entry, None to skip it (gone, unreadable, filtered out). The next token is the last id
/// returned, given only when an entry is left after it.
pub(super) fn page<T>(
    names: Vec<String>,
    parse: fn(&str) -> Result<VolumeId, String>,
    starting_token: &str,
    max_entries: i32,
    mut entry: impl FnMut(&VolumeId) -> Option<T>,
) -> Result<(Vec<T>, Option<String>), VolumeError> {
    if max_entries < 0 {
        return Err(invalid("max_entries", "must not be negative"));
    }
    let after = if starting_token.is_empty() {
        None
    } else {
        Some(parse(starting_token).map_err(|_| {
            VolumeError::BadStartingToken(starting_token.chars().take(80).collect())
        })?)
    };
    let mut ids: Vec<VolumeId> = names
        .iter()
        .filter_map(|n| parse(n).ok())
        .filter(|id| after.as_ref().is_none_or(|a| id > a))
        .collect();
    ids.sort();
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let mut out: Vec<(VolumeId, T)> = Vec::new();
    let mut next = None;
    for id in ids {
        let Some(e) = entry(&id) else { continue };
        if out.len() == limit {
            next = out.last().map(|(last, _)| last.to_string());
            break;
        }
        out.push((id, e));
    }
    Ok((out.into_iter().map(|(_, e)| e).collect(), next))
}

/// The claim events about a new volume go to (external-provisioner's --extra-create-metadata).
pub(super) fn owner_of(req: &CreateRequest) -> Option<EventTarget> {
    req.params
        .pvc
        .as_ref()
        .map(|(namespace, name)| EventTarget {
            kind: "PersistentVolumeClaim".into(),
            namespace: namespace.clone(),
            name: name.clone(),
            uid: String::new(),
        })
}

pub(super) fn summary(id: &VolumeId, r: &VolumeRecord) -> VolumeSummary {
    VolumeSummary {
        id: id.clone(),
        capacity_bytes: r.capacity_bytes,
        pool: r.pool.clone(),
        key_mode: r.key_mode,
        wipe: r.wipe,
    }
}

/// The pod-visible volume context CreateVolume returns.
pub(crate) fn volume_context(s: &VolumeSummary) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("pool".to_string(), s.pool.clone()),
        ("keyMode".to_string(), s.key_mode.as_str().to_string()),
        ("wipe".to_string(), s.wipe.as_str().to_string()),
    ])
}

/// Why a thick volume's blocks could not be reserved, as the caller should hear it.
pub(super) fn reserve_error(e: sys::SysError, bytes: u64) -> VolumeError {
    match &e {
        sys::SysError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            VolumeError::ResourceExhausted(format!(
                "the pool's filesystem cannot hold {bytes} more bytes: something other than sealvol has used its space ({e})"
            ))
        }
        sys::SysError::Io { source, .. } if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            VolumeError::FailedPrecondition(format!(
                "the pool's filesystem cannot reserve blocks ({e}); use provisioning: thin there"
            ))
        }
        _ => e.into(),
    }
}
