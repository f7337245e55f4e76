//! The lifecycle of a volume, step by step. This is the one place that knows the order of
//! things: each public method is one CSI call, takes the volume's guard before any side
//! effect, reads the state it needs from the kernel and the header (never from memory), and
//! is idempotent: repeating a call that completed, or that was cut short by a crash, succeeds.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::header::{self, EventTarget, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::lock::{VolumeGuard, VolumeLocks};
use super::params::{
    AccessMode, Capability, CapacityRange, KeyMode, Lifecycle, MIN_CAPACITY, OnRevoke,
    VolumeParams, WipeMode,
};
use super::paths::check_under;
use super::release::{self, KeyRelease, PodAuth};
use super::{VolumeError, crash};
use crate::crypt;
use crate::pool::{Disk, Pools, VolumeFile};
use crate::sys::{
    self, AttachedLoop, FsUsage, LoopDevice, MountFlags, MountTable, SysError, Tools,
};

/// The topology segment key that pins a volume to the node whose disk holds it.
pub(crate) const TOPOLOGY_KEY: &str = "topology.sealvol.io/node";
const INLINE_DIR: &str = "inline";
/// How long to wait for the kernel to let go of a loop device after its last unmount.
const LOOP_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The node's settings the lifecycle depends on.
#[derive(Debug, Clone)]
pub(crate) struct NodeSettings {
    pub(crate) node_id: String,
    pub(crate) state_dir: PathBuf,
    /// Canonical; every target and staging path must be below it.
    pub(crate) kubelet_dir: PathBuf,
    /// Whether ext4 can be grown while mounted (CAP_SYS_RESOURCE); without it a volume is grown
    /// while staged but not published, by a brief unmount.
    pub(crate) online_expansion: bool,
    /// The audience of the pod tokens kubelet passes.
    pub(crate) token_audience: String,
    /// How old a publication's last authorization may be before a republish re-authorizes.
    pub(crate) reauthorize_interval: Duration,
    /// How long transient re-authorization failures are tolerated before the volume locks.
    pub(crate) revoke_grace: Duration,
}

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub(crate) struct CreateRequest {
    pub(crate) name: String,
    pub(crate) capacity: CapacityRange,
    pub(crate) params: VolumeParams,
    /// `accessibility_requirements.requisite`: when not empty, one entry must name this node.
    pub(crate) requisite_nodes: Vec<Option<String>>,
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

/// A validated NodePublishVolume.
#[derive(Debug, Clone)]
pub(crate) struct PublishRequest {
    pub(crate) id: VolumeId,
    pub(crate) target: String,
    pub(crate) staging: Option<String>,
    pub(crate) read_only: bool,
    pub(crate) capability: Capability,
    /// Set for a CSI inline ephemeral volume: its parameters and size.
    pub(crate) inline: Option<(VolumeParams, u64)>,
    /// The publishing pod's token and name, for an encrypted volume's key release.
    pub(crate) auth: PodAuth,
}

/// GetCapacity's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolCapacity {
    pub(crate) available_bytes: u64,
    pub(crate) maximum_volume_bytes: u64,
    pub(crate) minimum_volume_bytes: u64,
}

/// NodeGetVolumeStats' answer: usage when mounted, and the reason when abnormal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeStats {
    pub(crate) usage: Option<FsUsage>,
    pub(crate) abnormal: Option<String>,
}

/// What startup recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RecoveryReport {
    pub(crate) removed_partial_creates: usize,
    pub(crate) finished_deletes: usize,
    pub(crate) removed_orphan_mounts: usize,
    pub(crate) detached_orphan_loops: usize,
    pub(crate) kept_volumes_in_use: usize,
}

/// A loaded volume: where its file is and what its header says.
struct Volume {
    id: VolumeId,
    file: VolumeFile,
    record: VolumeRecord,
    generation: u64,
}

pub(crate) struct Manager {
    settings: NodeSettings,
    pools: Pools,
    tools: Tools,
    locks: VolumeLocks,
    /// Serialises placement, so two creates cannot both count the same free space.
    placement: Mutex<()>,
    release: KeyRelease,
    /// Per publication (volume, target): when it was last authorized. Memory only: after a
    /// restart every publication is due for re-authorization, the safe side.
    authorizations: Mutex<HashMap<(VolumeId, PathBuf), Authorization>>,
}

#[derive(Debug, Clone, Copy)]
struct Authorization {
    last_ok: std::time::Instant,
    /// Since when re-authorization has failed for a transient reason.
    failing_since: Option<std::time::Instant>,
}

impl Authorization {
    fn now() -> Authorization {
        Authorization {
            last_ok: std::time::Instant::now(),
            failing_since: None,
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> VolumeError {
    VolumeError::InvalidArgument {
        field,
        message: message.into(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |e| VolumeError::Sys(SysError::io(op, path, e))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Manager {
    pub(crate) fn new(
        settings: NodeSettings,
        pools: Pools,
        tools: Tools,
        release: KeyRelease,
    ) -> Manager {
        Manager {
            settings,
            pools,
            tools,
            locks: VolumeLocks::default(),
            placement: Mutex::new(()),
            release,
            authorizations: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub(crate) fn token_audience(&self) -> &str {
        &self.settings.token_audience
    }

    fn lock(&self, id: &VolumeId) -> Result<VolumeGuard, VolumeError> {
        self.locks.try_lock(id)
    }

    // ----- Controller --------------------------------------------------------------------

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

        let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let file_bytes = HEADER_BYTES + capacity;
        let (_, free, _) = pool.space()?;
        let disk = pool.place(file_bytes)?.ok_or_else(|| {
            VolumeError::ResourceExhausted(format!(
                "pool {} cannot hold {capacity} bytes: the largest free space on one of its disks is less (free in the pool: {free} bytes, counting space promised to existing volumes)",
                pool.name
            ))
        })?;
        let record = VolumeRecord {
            volume_id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            lifecycle: Lifecycle::Persistent,
            pool: pool.name.clone(),
            fs_type: "ext4".into(),
            key_mode: req.params.key_mode,
            wipe: req.params.wipe,
            created_unix: now_unix(),
            formatted: false,
            kms: req.params.kms.clone(),
            on_revoke: req.params.on_revoke,
            owner: req
                .params
                .pvc
                .as_ref()
                .map(|(namespace, name)| EventTarget {
                    kind: "PersistentVolumeClaim".into(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    uid: String::new(),
                }),
        };
        self.create_file(disk, &record)?;
        tracing::info!(volume.id = %id, volume.name = %req.name, pool = %pool.name, capacity, "volume created");
        Ok(summary(&id, &record))
    }

    fn check_compatible(
        &self,
        vol: Volume,
        req: &CreateRequest,
    ) -> Result<VolumeSummary, VolumeError> {
        let r = &vol.record;
        let pool_matches = req.params.pool.as_deref().is_none_or(|p| p == r.pool);
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
    fn create_file(&self, disk: &Disk, record: &VolumeRecord) -> Result<(), VolumeError> {
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

    /// Grows the volume's file (and header) to the requested capacity. Returns the capacity
    /// and whether the node must still grow the filesystem.
    #[allow(dead_code)] // no longer served (node-only expansion); removed in the split
    pub(crate) fn controller_expand(
        &self,
        id: &VolumeId,
        range: CapacityRange,
    ) -> Result<u64, VolumeError> {
        if range.required_bytes <= 0 {
            return Err(invalid(
                "capacity_range.required_bytes",
                "must be set to the new size",
            ));
        }
        let capacity = range.resolve()?;
        let _guard = self.lock(id)?;
        let mut vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        self.grow_file(&mut vol, capacity)?;
        Ok(vol.record.capacity_bytes)
    }

    /// Volumes in id order, `max_entries` at a time (0: all); the token is the last id
    /// returned.
    pub(crate) fn list_volumes(
        &self,
        starting_token: &str,
        max_entries: i32,
    ) -> Result<(Vec<VolumeSummary>, Option<String>), VolumeError> {
        if max_entries < 0 {
            return Err(invalid("max_entries", "must not be negative"));
        }
        let after = if starting_token.is_empty() {
            None
        } else {
            Some(VolumeId::parse(starting_token).map_err(|_| {
                VolumeError::BadStartingToken(starting_token.chars().take(80).collect())
            })?)
        };
        let mut ids = Vec::new();
        for (_, disk) in self.pools.disks() {
            for raw in disk.volume_ids()? {
                if let Ok(id) = VolumeId::parse(&raw)
                    && after.as_ref().is_none_or(|a| &id > a)
                {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        let limit = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries as usize
        };
        let mut out = Vec::new();
        let mut next = None;
        for id in ids {
            if out.len() == limit {
                next = out.last().map(|s: &VolumeSummary| s.id.to_string());
                break;
            }
            match self.load(&id) {
                Ok(Some(vol)) => out.push(summary(&vol.id, &vol.record)),
                Ok(None) => {}
                Err(e) => tracing::warn!(volume.id = %id, error = %e, "skipping unreadable volume"),
            }
        }
        Ok((out, next))
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

    // ----- Node --------------------------------------------------------------------------

    /// Attaches the volume's file to a loop device, creates ext4 the first time, and mounts it
    /// at the staging path.
    pub(crate) fn stage(
        &self,
        id: &VolumeId,
        staging: &str,
        capability: &Capability,
    ) -> Result<(), VolumeError> {
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(id)?;
        let mut vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        if vol.record.lifecycle == Lifecycle::Ephemeral {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {id} is a CSI inline volume; it is published without staging"
            )));
        }
        self.stage_at(&mut vol, &staging, capability.mount_flags)
    }

    fn stage_at(&self, vol: &mut Volume, at: &Path, flags: MountFlags) -> Result<(), VolumeError> {
        let table = MountTable::read()?;
        let attached = sys::find_loop_for(&vol.file.path)?;
        if let Some(m) = table.at(at) {
            if attached.as_ref().is_some_and(|l| is_fs_mount_of(m, l)) {
                // A crash may have come between the mount and the data directory.
                crypt::ensure_data_dir(at)?;
                tracing::debug!(volume.id = %vol.id, "already staged");
                return Ok(());
            }
            return Err(VolumeError::AlreadyExists(format!(
                "staging_target_path {} already holds another mount ({})",
                at.display(),
                m.source
            )));
        }
        if let Some(l) = &attached
            && let Some(other) = table.entries().iter().find(|m| is_fs_mount_of(m, l))
        {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is already staged at {}",
                vol.id,
                other.mount_point.display()
            )));
        }
        let device = match attached {
            Some(l) => LoopDevice::open_existing(l.number, &vol.file.path)?,
            None => None,
        };
        let device = match device {
            Some(d) => d,
            None => LoopDevice::attach(&vol.file.path, HEADER_BYTES)?,
        };
        crash::point("stage.attached");
        if !vol.record.formatted {
            crypt::format(&self.tools, &device.path())?;
            vol.record.formatted = true;
            self.save(vol)?;
            crash::point("stage.formatted");
        }
        std::fs::create_dir_all(at).map_err(io_err("mkdir", at))?;
        sys::mount_fs(&device.path(), at, "ext4", flags)?;
        crash::point("stage.mounted");
        if let Err(e) = crypt::ensure_data_dir(at) {
            let _ = sys::unmount(at, false);
            return Err(e.into());
        }
        tracing::info!(volume.id = %vol.id, staging.path = %at.display(), device = %device.path().display(), "volume staged");
        Ok(())
    }

    /// Unmounts the staging path and frees the loop device. Refused while the volume is still
    /// published somewhere on this node.
    pub(crate) fn unstage(&self, id: &VolumeId, staging: &str) -> Result<(), VolumeError> {
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(id)?;
        let vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        self.unstage_at(&vol, &staging)
    }

    fn unstage_at(&self, vol: &Volume, at: &Path) -> Result<(), VolumeError> {
        let table = MountTable::read()?;
        let Some(m) = table.at(at) else {
            tracing::debug!(volume.id = %vol.id, "already unstaged");
            return self.release_loop(vol);
        };
        let attached = sys::find_loop_for(&vol.file.path)?;
        let Some(l) = attached.filter(|l| is_fs_mount_of(m, l)) else {
            return Err(VolumeError::FailedPrecondition(format!(
                "{} holds a mount ({}) that is not volume {}",
                at.display(),
                m.source,
                vol.id
            )));
        };
        let published: Vec<String> = publications(&table, &l)
            .map(|p| p.mount_point.display().to_string())
            .collect();
        if !published.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is still published at {}; unpublish it first",
                vol.id,
                published.join(", ")
            )));
        }
        // Normally gone with the last publication; after a crash it may still be there.
        release::evict(&vol.id, &vol.record, at)?;
        sys::unmount(at, false)?;
        crash::point("unstage.unmounted");
        self.release_loop(vol)?;
        tracing::info!(volume.id = %vol.id, staging.path = %at.display(), "volume unstaged");
        Ok(())
    }

    /// Bind-mounts the volume's data directory at the target path (read-only if asked). For a
    /// CSI inline volume, first creates and stages the volume.
    pub(crate) fn publish(&self, req: &PublishRequest) -> Result<(), VolumeError> {
        let target = check_under(&req.target, &self.settings.kubelet_dir, "target_path")?;
        if let Some((params, size)) = &req.inline {
            return self.publish_inline(req, &target, params, *size);
        }
        let staging = req
            .staging
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                invalid(
                    "staging_target_path",
                    "is required: sealvol stages volumes before publishing them",
                )
            })?;
        let staging = check_under(staging, &self.settings.kubelet_dir, "staging_target_path")?;
        let _guard = self.lock(&req.id)?;
        let mut vol = self.load(&req.id)?.ok_or_else(|| not_found(&req.id))?;
        let table = MountTable::read()?;
        let staged = sys::find_loop_for(&vol.file.path)?
            .filter(|l| table.at(&staging).is_some_and(|m| is_fs_mount_of(m, l)));
        let Some(device) = staged else {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is not staged at {}",
                req.id,
                staging.display()
            )));
        };
        self.publish_staged(&mut vol, &device, &staging, &target, req)
    }

    /// The common end of a publish: an encrypted volume's key is released to this pod (or, on
    /// a republish of the same target, the pod's token is confirmed), then the bind mount.
    fn publish_staged(
        &self,
        vol: &mut Volume,
        device: &AttachedLoop,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let table = MountTable::read()?;
        let republish = table
            .at(target)
            .is_some_and(|m| is_data_mount_of(m, device));
        if vol.record.key_mode != KeyMode::None {
            if republish {
                self.reauthorize_if_due(vol, staging, target, req)?;
            } else {
                let before = vol.record.clone();
                let (id, file, generation) =
                    (vol.id.clone(), vol.file.path.clone(), vol.generation);
                let mut generation_after = generation;
                self.release
                    .unlock(&id, &mut vol.record, staging, &req.auth, |record| {
                        generation_after = write_header(&id, &file, record, generation)?;
                        Ok(())
                    })?;
                vol.generation = generation_after;
                if vol.record != before {
                    self.save(vol)?;
                }
            }
        }
        let bound = self.bind_at(vol, device, &table, staging, target, req);
        if bound.is_ok() && vol.record.key_mode != KeyMode::None && !republish {
            self.set_authorization(&vol.id, target, Authorization::now());
        }
        if bound.is_err() && vol.record.key_mode != KeyMode::None && !republish {
            // Nothing is published: the key goes again.
            let table = MountTable::read()?;
            if publications(&table, device).next().is_none() {
                release::evict(&vol.id, &vol.record, staging)?;
            }
        }
        bound
    }

    /// Continuous authorization, on kubelet's periodic republish of a published target: when
    /// the last authorization of this publication is older than `--reauthorize-interval` (or
    /// the volume is locked), a real Key Vault call with the pod's current token decides.
    /// Refused: the volume locks (its key leaves the kernel; with `onRevoke: lock-and-unmount`
    /// the target is unmounted too) and the call is PERMISSION_DENIED. Transient failure: the
    /// volume stays usable until failures have lasted `--revoke-grace`, then locks. Authorized
    /// again: a locked volume gets its key back, data intact.
    fn reauthorize_if_due(
        &self,
        vol: &Volume,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let now = std::time::Instant::now();
        let identifier = vol
            .record
            .kms
            .as_ref()
            .and_then(|k| k.key_identifier.clone());
        let locked = match &identifier {
            Some(i) => !crypt::key_present(staging, i)?,
            None => false,
        };
        let previous = self.authorization(&vol.id, target);
        let due = locked
            || previous.is_none_or(|a| {
                now.duration_since(a.last_ok) >= self.settings.reauthorize_interval
            });
        if !due {
            return self.release.confirm(&vol.id, &vol.record, &req.auth);
        }
        match self.release.reauthorize(&vol.id, &vol.record, &req.auth) {
            Ok(dek) => {
                if locked {
                    crypt::unlock(staging, dek.expose(), identifier.as_deref())?;
                    release::audit(
                        "unlock",
                        &vol.id,
                        Some(&req.auth),
                        vol.record.kms.as_ref(),
                        "ok",
                        now.elapsed(),
                    );
                    tracing::info!(volume.id = %vol.id, target.path = %target.display(), "authorized again: volume unlocked");
                }
                self.set_authorization(&vol.id, target, Authorization::now());
                Ok(())
            }
            Err(
                e @ (VolumeError::Unauthenticated(_)
                | VolumeError::PermissionDenied(_)
                | VolumeError::Corrupt(_)),
            ) => {
                self.lock_volume(vol, staging, target, &e, &req.auth)?;
                Err(VolumeError::PermissionDenied(format!(
                    "re-authorization refused, volume {} is locked: {e}",
                    vol.id
                )))
            }
            Err(VolumeError::Unavailable(reason)) => {
                let since = previous.and_then(|a| a.failing_since).unwrap_or(now);
                let last_ok = previous.map(|a| a.last_ok).unwrap_or(now);
                self.set_authorization(
                    &vol.id,
                    target,
                    Authorization {
                        last_ok,
                        failing_since: Some(since),
                    },
                );
                let failing_for = now.duration_since(since);
                if failing_for >= self.settings.revoke_grace && !locked {
                    let e = VolumeError::Unavailable(reason.clone());
                    self.lock_volume(vol, staging, target, &e, &req.auth)?;
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization has failed for {}s, longer than --revoke-grace: volume {} is locked ({reason})",
                        failing_for.as_secs(),
                        vol.id
                    )));
                }
                if locked {
                    return Err(VolumeError::Unavailable(format!(
                        "re-authorization failed ({reason}); volume {} stays locked until one succeeds",
                        vol.id
                    )));
                }
                Err(VolumeError::Unavailable(format!(
                    "re-authorization failed ({reason}); volume {} stays usable for {}s more",
                    vol.id,
                    self.settings
                        .revoke_grace
                        .saturating_sub(failing_for)
                        .as_secs()
                )))
            }
            Err(other) => Err(other),
        }
    }

    fn lock_volume(
        &self,
        vol: &Volume,
        staging: &Path,
        target: &Path,
        why: &VolumeError,
        auth: &PodAuth,
    ) -> Result<(), VolumeError> {
        let start = std::time::Instant::now();
        release::evict(&vol.id, &vol.record, staging)?;
        if vol.record.on_revoke == OnRevoke::LockAndUnmount {
            sys::unmount(target, true)?;
        }
        release::audit(
            "lock",
            &vol.id,
            Some(auth),
            vol.record.kms.as_ref(),
            "locked",
            start.elapsed(),
        );
        self.release.pod_event(
            auth,
            "VolumeLocked",
            &format!(
                "sealvol locked volume {}: its key left the node because re-authorization failed: {why}",
                vol.id
            ),
        );
        tracing::warn!(volume.id = %vol.id, target.path = %target.display(), reason = %why, on_revoke = ?vol.record.on_revoke, "volume locked: its key left the kernel");
        Ok(())
    }

    fn authorization(&self, id: &VolumeId, target: &Path) -> Option<Authorization> {
        let map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(&(id.clone(), target.to_path_buf())).copied()
    }

    fn set_authorization(&self, id: &VolumeId, target: &Path, a: Authorization) {
        let mut map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.insert((id.clone(), target.to_path_buf()), a);
    }

    fn forget_authorization(&self, id: &VolumeId, target: &Path) {
        let mut map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&(id.clone(), target.to_path_buf()));
    }

    fn publish_inline(
        &self,
        req: &PublishRequest,
        target: &Path,
        params: &VolumeParams,
        size: u64,
    ) -> Result<(), VolumeError> {
        let _guard = self.lock(&req.id)?;
        let (mut vol, created) = match self.load(&req.id)? {
            Some(vol) if vol.record.lifecycle == Lifecycle::Ephemeral => (vol, false),
            Some(_) => {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {} is a persistent volume; csi.storage.k8s.io/ephemeral=true is for inline volumes",
                    req.id
                )));
            }
            None => (self.create_inline(&req.id, params, size, &req.auth)?, true),
        };
        let staging = self.inline_staging(&vol.id);
        let result = self
            .stage_at(&mut vol, &staging, req.capability.mount_flags)
            .and_then(|()| {
                let device = sys::find_loop_for(&vol.file.path)?.ok_or_else(|| {
                    VolumeError::FailedPrecondition(format!(
                        "volume {} lost its loop device",
                        vol.id
                    ))
                })?;
                self.publish_staged(&mut vol, &device, &staging, target, req)
            });
        if let Err(e) = result {
            if created {
                // A refused first publish leaves nothing behind.
                if let Err(rollback) = self.teardown_inline(&vol) {
                    tracing::error!(volume.id = %vol.id, error = %rollback, "rollback of a failed inline publish failed; startup recovery will finish it");
                }
            }
            return Err(e);
        }
        Ok(())
    }

    fn create_inline(
        &self,
        id: &VolumeId,
        params: &VolumeParams,
        size: u64,
        auth: &PodAuth,
    ) -> Result<Volume, VolumeError> {
        let pool = self.pools.get(params.pool.as_deref())?;
        let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let disk = pool.place(HEADER_BYTES + size)?.ok_or_else(|| {
            VolumeError::ResourceExhausted(format!(
                "pool {} cannot hold an inline volume of {size} bytes",
                pool.name
            ))
        })?;
        let record = VolumeRecord {
            volume_id: id.to_string(),
            name: id.to_string(),
            capacity_bytes: size,
            lifecycle: Lifecycle::Ephemeral,
            pool: pool.name.clone(),
            fs_type: "ext4".into(),
            key_mode: params.key_mode,
            wipe: params.wipe,
            created_unix: now_unix(),
            formatted: false,
            kms: params.kms.clone(),
            on_revoke: params.on_revoke,
            owner: (!auth.pod_name.is_empty()).then(|| EventTarget {
                kind: "Pod".into(),
                namespace: auth.pod_namespace.clone(),
                name: auth.pod_name.clone(),
                uid: auth.pod_uid.clone(),
            }),
        };
        self.create_file(disk, &record)?;
        crash::point("inline.created");
        tracing::info!(volume.id = %id, pool = %pool.name, capacity = size, "inline volume created");
        self.load(id)?.ok_or_else(|| not_found(id))
    }

    fn inline_staging(&self, id: &VolumeId) -> PathBuf {
        self.settings.state_dir.join(INLINE_DIR).join(id.as_str())
    }

    fn bind_at(
        &self,
        vol: &Volume,
        device: &AttachedLoop,
        table: &MountTable,
        staging: &Path,
        target: &Path,
        req: &PublishRequest,
    ) -> Result<(), VolumeError> {
        let read_only = req.read_only || req.capability.access_mode.read_only();
        if let Some(m) = table.at(target) {
            if is_data_mount_of(m, device) {
                if m.read_only == read_only {
                    tracing::debug!(volume.id = %vol.id, "already published");
                    return Ok(());
                }
                if read_only {
                    // A crash between the bind and its read-only remount: finish it.
                    sys::remount_bind_readonly(target)?;
                    return Ok(());
                }
                return Err(VolumeError::AlreadyExists(format!(
                    "target_path {} is already published read-only",
                    target.display()
                )));
            }
            return Err(VolumeError::AlreadyExists(format!(
                "target_path {} already holds another mount ({})",
                target.display(),
                m.source
            )));
        }
        if req.capability.access_mode == AccessMode::SingleNodeSingleWriter
            && let Some(other) = publications(table, device).next()
        {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                vol.id,
                other.mount_point.display()
            )));
        }
        std::fs::create_dir_all(target).map_err(io_err("mkdir", target))?;
        sys::bind_mount(&staging.join(crypt::DATA_DIR), target)?;
        crash::point("publish.bound");
        if read_only && let Err(e) = sys::remount_bind_readonly(target) {
            let _ = sys::unmount(target, false);
            return Err(e.into());
        }
        tracing::info!(volume.id = %vol.id, target.path = %target.display(), read_only, "volume published");
        Ok(())
    }

    /// Unmounts the target path and removes it. For a CSI inline volume whose last
    /// publication this was, also unstages, deletes and wipes the volume.
    pub(crate) fn unpublish(&self, id: &VolumeId, target: &str) -> Result<(), VolumeError> {
        let target = check_under(target, &self.settings.kubelet_dir, "target_path")?;
        let _guard = self.lock(id)?;
        let vol = self.load(id)?;
        let table = MountTable::read()?;
        if let Some(m) = table.at(&target) {
            let Some(vol) = &vol else {
                return Err(VolumeError::NotFound(format!(
                    "volume {id} does not exist, and {} holds a mount of something else",
                    target.display()
                )));
            };
            let ours = sys::find_loop_for(&vol.file.path)?.is_some_and(|l| is_data_mount_of(m, &l));
            if !ours {
                return Err(VolumeError::FailedPrecondition(format!(
                    "target_path {} holds a mount ({}) that is not volume {id}",
                    target.display(),
                    m.source
                )));
            }
            sys::unmount(&target, false)?;
            crash::point("unpublish.unmounted");
            self.forget_authorization(id, &target);
            tracing::info!(volume.id = %id, target.path = %target.display(), "volume unpublished");
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target.path = %target.display(), error = %e, "could not remove the target directory")
            }
        }
        let Some(vol) = vol else { return Ok(()) };
        let table = MountTable::read()?;
        let device = sys::find_loop_for(&vol.file.path)?;
        let still_published = device
            .as_ref()
            .is_some_and(|l| publications(&table, l).next().is_some());
        if still_published {
            return Ok(());
        }
        if vol.record.lifecycle == Lifecycle::Ephemeral {
            self.teardown_inline(&vol)?;
            tracing::info!(volume.id = %id, wipe = vol.record.wipe.as_str(), "inline volume deleted and wiped");
        } else if let Some(fs) = device.and_then(|l| {
            table
                .entries()
                .iter()
                .find(|m| is_fs_mount_of(m, &l))
                .map(|m| m.mount_point.clone())
        }) {
            // The last publication is gone: so is the key.
            release::evict(&vol.id, &vol.record, &fs)?;
        }
        Ok(())
    }

    fn teardown_inline(&self, vol: &Volume) -> Result<(), VolumeError> {
        let staging = self.inline_staging(&vol.id);
        self.unstage_at(vol, &staging)?;
        match std::fs::remove_dir(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("rmdir", &staging)(e)),
        }
        self.destroy(vol)
    }

    /// Usage of the volume mounted at `path` (its staging or a target path), and whether it is
    /// healthy: abnormal when the loop device or the mount is gone.
    pub(crate) fn stats(&self, id: &VolumeId, path: &str) -> Result<VolumeStats, VolumeError> {
        let path = check_under(path, &self.settings.kubelet_dir, "volume_path")?;
        let vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        if !path.exists() {
            return Err(VolumeError::NotFound(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        let table = MountTable::read()?;
        let Some(device) = sys::find_loop_for(&vol.file.path)? else {
            return Ok(VolumeStats {
                usage: None,
                abnormal: Some(format!("volume {id} has no loop device: it is not staged")),
            });
        };
        match table.at(&path) {
            Some(m) if is_fs_mount_of(m, &device) || is_data_mount_of(m, &device) => {
                Ok(VolumeStats {
                    usage: Some(sys::statvfs(&path)?),
                    abnormal: None,
                })
            }
            Some(m) => Ok(VolumeStats {
                usage: None,
                abnormal: Some(format!(
                    "{} holds another mount ({})",
                    path.display(),
                    m.source
                )),
            }),
            None => Ok(VolumeStats {
                usage: None,
                abnormal: Some(format!("volume {id} is not mounted at {}", path.display())),
            }),
        }
    }

    /// Grows the file if the controller has not yet, then the loop device and ext4: online
    /// when the driver may (CAP_SYS_RESOURCE), otherwise offline, which needs the volume
    /// staged and not published (what the OFFLINE expansion capability promises kubelet).
    pub(crate) fn node_expand(
        &self,
        id: &VolumeId,
        path: &str,
        range: CapacityRange,
    ) -> Result<u64, VolumeError> {
        let path = check_under(path, &self.settings.kubelet_dir, "volume_path")?;
        let _guard = self.lock(id)?;
        let mut vol = self.load(id)?.ok_or_else(|| not_found(id))?;
        let table = MountTable::read()?;
        let device = sys::find_loop_for(&vol.file.path)?
            .filter(|l| {
                table
                    .at(&path)
                    .is_some_and(|m| is_fs_mount_of(m, l) || is_data_mount_of(m, l))
            })
            .ok_or_else(|| {
                VolumeError::NotFound(format!("volume {id} is not mounted at {}", path.display()))
            })?;
        let wanted = if range.required_bytes > 0 {
            range.resolve()?
        } else {
            vol.record.capacity_bytes
        };
        let staging = table
            .entries()
            .iter()
            .find(|m| is_fs_mount_of(m, &device))
            .map(|m| m.mount_point.clone())
            .ok_or_else(|| VolumeError::FailedPrecondition(format!("volume {id} is not staged")))?;
        let published: Vec<String> = publications(&table, &device)
            .map(|m| m.mount_point.display().to_string())
            .collect();
        if !self.settings.online_expansion && !published.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {id} is published at {}; this node cannot grow a mounted ext4 (the driver lacks CAP_SYS_RESOURCE), so it advertises offline expansion: the filesystem grows when the volume is staged without pods",
                published.join(", ")
            )));
        }
        self.grow_file(&mut vol, wanted)?;
        let handle =
            LoopDevice::open_existing(device.number, &vol.file.path)?.ok_or_else(|| {
                VolumeError::FailedPrecondition(format!("volume {id} lost its loop device"))
            })?;
        handle.refresh_capacity()?;
        if self.settings.online_expansion {
            crypt::grow(&self.tools, &handle.path())?;
        } else {
            // Holding the loop device open keeps it attached across the unmount.
            sys::unmount(&staging, false)?;
            crash::point("expand.unmounted");
            let grown = crypt::grow_offline(&self.tools, &handle.path());
            let mounted = sys::mount_fs(&handle.path(), &staging, "ext4", MountFlags::default());
            grown?;
            mounted?;
        }
        tracing::info!(volume.id = %id, capacity = vol.record.capacity_bytes, online = self.settings.online_expansion, "filesystem grown");
        Ok(vol.record.capacity_bytes)
    }

    fn grow_file(&self, vol: &mut Volume, capacity: u64) -> Result<(), VolumeError> {
        let path = vol.file.path.clone();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let current_len = file.metadata().map_err(io_err("stat", &path))?.len();
        let wanted_len = HEADER_BYTES + capacity.max(vol.record.capacity_bytes);
        if wanted_len > current_len {
            let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            let disk = Disk {
                dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                device: None,
            };
            let free = disk.space()?.promisable_bytes;
            if wanted_len - current_len > free {
                return Err(VolumeError::ResourceExhausted(format!(
                    "the disk of volume {} has {free} bytes free; growing to {capacity} bytes needs {}",
                    vol.id,
                    wanted_len - current_len
                )));
            }
            file.set_len(wanted_len).map_err(io_err("grow", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        if capacity > vol.record.capacity_bytes {
            vol.record.capacity_bytes = capacity;
            self.save(vol)?;
            tracing::info!(volume.id = %vol.id, capacity, "volume file grown");
        }
        Ok(())
    }

    /// Volumes by state and each pool's space, into the metrics gauges (at scrape time).
    pub(crate) fn refresh_gauges(&self) -> Result<(), VolumeError> {
        let loops = sys::attached_loops()?;
        let table = MountTable::read()?;
        let (mut created, mut staged, mut published) = (0, 0, 0);
        for (_, disk) in self.pools.disks() {
            for id in disk.volume_ids()? {
                // By identity: the path a loop device reports is its attacher's.
                let backing = sys::FileId::of(&disk.volume_path(&id))?;
                match loops.iter().find(|l| Some(l.backing) == backing) {
                    None => created += 1,
                    Some(l) if publications(&table, l).next().is_some() => published += 1,
                    Some(_) => staged += 1,
                }
            }
        }
        let m = crate::metrics::metrics();
        m.set_volumes("created", created);
        m.set_volumes("staged", staged);
        m.set_volumes("published", published);
        for pool in self.pools.all() {
            let (total, free, _) = pool.space()?;
            m.set_pool(&pool.name, total, free);
        }
        Ok(())
    }

    /// Readiness of the node's pools.
    pub(crate) fn probe(&self) -> Result<(), VolumeError> {
        self.pools.check().map_err(Into::into)
    }

    // ----- Recovery ----------------------------------------------------------------------

    /// Run once at start, before serving: finishes or undoes what a crash interrupted, keeps
    /// every mount and loop device of an existing volume, and removes those of nothing.
    ///
    /// Loop devices are matched to files by identity (device and inode), never by the path
    /// the kernel reports: that is the attacher's path, and after an upgrade the attacher was
    /// another container, in another mount namespace, now gone. A loop device is ours when its
    /// backing file is a file in one of our pool directories, or was unlinked, lives on a
    /// pool's filesystem and was last named like a volume file. Any other loop device on the
    /// same filesystem (another driver's, another node plugin's pool) is left alone.
    pub(crate) fn recover(&self) -> Result<RecoveryReport, VolumeError> {
        let mut report = RecoveryReport::default();
        for (_, disk) in self.pools.disks() {
            let (creating, deleting) = disk.unfinished()?;
            for path in creating {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                report.removed_partial_creates += 1;
            }
            for path in deleting {
                if let Some(backing) = sys::FileId::of(&path)? {
                    self.release_orphan_loops_of(backing, &path.to_string_lossy(), &mut report)?;
                }
                self.finish_destroy(&path)?;
                report.finished_deletes += 1;
            }
            sys::fsync_dir(&disk.dir)?;
        }
        // What is in our pools now, by identity.
        let mut volume_files = std::collections::HashSet::new();
        let mut other_files = std::collections::HashSet::new();
        let mut pool_filesystems = std::collections::HashSet::new();
        for (_, disk) in self.pools.disks() {
            let dir_meta = std::fs::metadata(&disk.dir).map_err(io_err("stat", &disk.dir))?;
            pool_filesystems.insert(sys::FileId::from_metadata(&dir_meta).dev);
            let entries = std::fs::read_dir(&disk.dir).map_err(io_err("read_dir", &disk.dir))?;
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let backing = sys::FileId::from_metadata(&meta);
                let name = entry.file_name().to_string_lossy().into_owned();
                if name
                    .strip_suffix(".img")
                    .is_some_and(|id| VolumeId::parse(id).is_ok())
                {
                    volume_files.insert(backing);
                } else {
                    other_files.insert(backing);
                }
            }
        }
        // Loop devices over files in our pools that are no longer volumes.
        for l in sys::attached_loops()? {
            if volume_files.contains(&l.backing) {
                if l.offset != HEADER_BYTES {
                    tracing::warn!(device = %l.device_path().display(), offset = l.offset, "a volume file is attached at an offset sealvol never uses");
                }
                report.kept_volumes_in_use += 1;
                continue;
            }
            let orphan = other_files.contains(&l.backing)
                || (l.backing_deleted()
                    && pool_filesystems.contains(&l.backing.dev)
                    && is_volume_file_name(l.backing_name()));
            if orphan {
                self.release_orphan_loops_of(l.backing, &l.backing_file, &mut report)?;
            }
        }
        // Inline staging directories of volumes that are gone.
        let inline_root = self.settings.state_dir.join(INLINE_DIR);
        if let Ok(entries) = std::fs::read_dir(&inline_root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let exists = VolumeId::parse(&name)
                    .ok()
                    .is_some_and(|id| self.pools.find_volume(id.as_str()).is_some());
                if !exists {
                    if sys::unmount(&entry.path(), true)? {
                        report.removed_orphan_mounts += 1;
                    }
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        Ok(report)
    }

    /// Unmounts everything mounted from loop devices over the file with identity `backing`
    /// (`what` names it in the log) and detaches them.
    fn release_orphan_loops_of(
        &self,
        backing: sys::FileId,
        what: &str,
        report: &mut RecoveryReport,
    ) -> Result<(), VolumeError> {
        let table = MountTable::read()?;
        for l in sys::attached_loops()? {
            if l.backing != backing {
                continue;
            }
            let dev = l.device_path().to_string_lossy().into_owned();
            // Bind mounts first, the filesystem mount last.
            let mut mounts: Vec<_> = table.of_source(&dev).collect();
            mounts.sort_by_key(|m| m.root == Path::new("/"));
            for m in mounts {
                if sys::unmount(&m.mount_point, true)? {
                    report.removed_orphan_mounts += 1;
                }
            }
            if let Some(handle) = LoopDevice::open_bound_to(l.number, backing)? {
                handle.detach()?;
            }
            report.detached_orphan_loops += 1;
            tracing::warn!(device = %dev, backing = %what, "released a loop device that belonged to no volume");
        }
        Ok(())
    }

    // ----- Shared steps ------------------------------------------------------------------

    fn load(&self, id: &VolumeId) -> Result<Option<Volume>, VolumeError> {
        let Some(file) = self.pools.find_volume(id.as_str()) else {
            return Ok(None);
        };
        let mut f = match File::open(&file.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &file.path)(e)),
        };
        let (record, generation) = header::read(&mut f).map_err(|source| VolumeError::Header {
            volume_id: id.to_string(),
            source,
        })?;
        if record.volume_id != id.as_str() {
            return Err(VolumeError::FailedPrecondition(format!(
                "the file of volume {id} carries the header of {}",
                record.volume_id
            )));
        }
        Ok(Some(Volume {
            id: id.clone(),
            file,
            record,
            generation,
        }))
    }

    fn save(&self, vol: &mut Volume) -> Result<(), VolumeError> {
        vol.generation = write_header(&vol.id, &vol.file.path, &vol.record, vol.generation)?;
        Ok(())
    }

    /// FAILED_PRECONDITION when the volume is mounted anywhere on this node; otherwise frees a
    /// loop device left without a mount.
    fn ensure_unused(&self, vol: &Volume) -> Result<(), VolumeError> {
        if let Some(l) = sys::find_loop_for(&vol.file.path)? {
            let table = MountTable::read()?;
            let dev = l.device_path().to_string_lossy().into_owned();
            let mounts: Vec<String> = table
                .of_source(&dev)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !mounts.is_empty() {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {} is staged or published on this node at {}",
                    vol.id,
                    mounts.join(", ")
                )));
            }
        }
        self.release_loop(vol)
    }

    /// Detaches the volume's loop device once nothing mounts it. The kernel's autoclear
    /// usually has already; this covers the window in which it is still running down.
    fn release_loop(&self, vol: &Volume) -> Result<(), VolumeError> {
        let deadline = std::time::Instant::now() + LOOP_RELEASE_WAIT;
        loop {
            let Some(l) = sys::find_loop_for(&vol.file.path)? else {
                return Ok(());
            };
            let table = MountTable::read()?;
            let dev = l.device_path().to_string_lossy().into_owned();
            if table.of_source(&dev).next().is_some() {
                return Ok(());
            }
            if let Some(handle) = LoopDevice::open_existing(l.number, &vol.file.path)? {
                handle.detach()?;
            }
            if std::time::Instant::now() > deadline {
                return Err(VolumeError::FailedPrecondition(format!(
                    "loop device {} of volume {} is still held by another process",
                    dev, vol.id
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Renames the file out of the volume namespace, then wipes and removes it.
    fn destroy(&self, vol: &Volume) -> Result<(), VolumeError> {
        let path = &vol.file.path;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let deleting = Disk {
            dir: dir.clone(),
            device: None,
        }
        .deleting_path(vol.id.as_str());
        std::fs::rename(path, &deleting).map_err(io_err("rename", path))?;
        sys::fsync_dir(&dir)?;
        crash::point("delete.renamed");
        let start = std::time::Instant::now();
        self.finish_destroy(&deleting)?;
        if let Some(owner) = &vol.record.owner {
            self.release.event(
                owner,
                "Normal",
                "VolumeWiped",
                &format!(
                    "sealvol deleted volume {}: {} and its blocks released",
                    vol.id,
                    if vol.record.key_mode == KeyMode::None {
                        "its header erased"
                    } else {
                        "its wrapped key destroyed"
                    }
                ),
            );
        }
        if vol.record.key_mode != KeyMode::None {
            release::audit(
                "wipe",
                &vol.id,
                None,
                vol.record.kms.as_ref(),
                "ok",
                start.elapsed(),
            );
        }
        Ok(())
    }

    /// Wipes and removes a file renamed for deletion: with `wipe=zero` its allocated blocks
    /// are overwritten, otherwise its header is erased; then every block is released (a
    /// discard on the device) and the file unlinked. Safe to repeat after a crash.
    fn finish_destroy(&self, path: &Path) -> Result<(), VolumeError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        match header::read(&mut file).map(|(r, _)| r.wipe) {
            Ok(WipeMode::Zero) => sys::zero_allocated_ranges(&mut file, path, 0)?,
            Ok(WipeMode::Discard) => {
                header::erase(&mut file).map_err(|source| VolumeError::Header {
                    volume_id: path.display().to_string(),
                    source,
                })?;
                file.sync_data().map_err(io_err("fsync", path))?;
            }
            // Already erased by an earlier attempt.
            Err(_) => {}
        }
        crash::point("delete.wiped");
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        sys::punch_hole(&file, path, 0, len)?;
        file.sync_all().map_err(io_err("fsync", path))?;
        drop(file);
        crash::point("delete.released");
        std::fs::remove_file(path).map_err(io_err("remove", path))?;
        if let Some(dir) = path.parent() {
            sys::fsync_dir(dir)?;
        }
        Ok(())
    }
}

/// Writes `record` as the next header generation and syncs it; returns the new generation.
fn write_header(
    id: &VolumeId,
    path: &Path,
    record: &VolumeRecord,
    previous: u64,
) -> Result<u64, VolumeError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let generation =
        header::write(&mut f, record, previous).map_err(|source| VolumeError::Header {
            volume_id: id.to_string(),
            source,
        })?;
    f.sync_data().map_err(io_err("fsync", path))?;
    Ok(generation)
}

/// Whether two volumes name the same KEK (the wrapped key and its identifier aside).
fn same_kek(a: Option<&crate::keys::KmsRecord>, b: Option<&crate::keys::KmsRecord>) -> bool {
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

fn summary(id: &VolumeId, r: &VolumeRecord) -> VolumeSummary {
    VolumeSummary {
        id: id.clone(),
        capacity_bytes: r.capacity_bytes,
        pool: r.pool.clone(),
        key_mode: r.key_mode,
        wipe: r.wipe,
    }
}

fn not_found(id: &VolumeId) -> VolumeError {
    VolumeError::NotFound(format!("volume {id} does not exist on this node"))
}

/// Whether `name` is, or was while a create or delete ran, the file name of a volume.
fn is_volume_file_name(name: &str) -> bool {
    [".img", ".img.creating", ".img.deleting"]
        .iter()
        .any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|id| VolumeId::parse(id).is_ok())
        })
}

/// Whether `m` is the whole filesystem of the volume on loop device `l` (its staging mount).
fn is_fs_mount_of(m: &sys::MountEntry, l: &AttachedLoop) -> bool {
    m.source == l.device_path().to_string_lossy() && m.root == Path::new("/")
}

/// Whether `m` is a bind mount of the data directory of the volume on loop device `l`.
fn is_data_mount_of(m: &sys::MountEntry, l: &AttachedLoop) -> bool {
    m.source == l.device_path().to_string_lossy() && m.root == Path::new("/").join(crypt::DATA_DIR)
}

/// The target-path publications of the volume on `l`.
fn publications<'a>(
    table: &'a MountTable,
    l: &'a AttachedLoop,
) -> impl Iterator<Item = &'a sys::MountEntry> + 'a {
    table.entries().iter().filter(|m| is_data_mount_of(m, l))
}

/// The pod-visible volume context CreateVolume returns.
pub(crate) fn volume_context(s: &VolumeSummary) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("pool".to_string(), s.pool.clone()),
        ("keyMode".to_string(), s.key_mode.as_str().to_string()),
        ("wipe".to_string(), s.wipe.as_str().to_string()),
    ])
}
