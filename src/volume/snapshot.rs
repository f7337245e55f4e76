//! Snapshots, restores and clones, all on the node that holds the volume.
//!
//! A snapshot is a copy of the volume's file beside it (`<id>.snap`): the ciphertext of an
//! encrypted volume, and a header of its own that carries the volume's wrapped DEK and KEK
//! reference, never an unwrapped key, so taking one needs no token. The copy is a reflink where
//! the pool's filesystem has them, else only the ranges that hold data. A volume staged here is
//! frozen (FIFREEZE) around the copy, so the copy is crash-consistent; the freeze is recorded in
//! the state directory before it starts, so recovery thaws it if the driver dies meanwhile, and
//! a copy that outlasts `--snapshot-freeze-limit` is abandoned and the volume thawed rather than
//! writers stalled. A restore or clone copies the same way into a new volume file that keeps the
//! source's wrapped DEK: its first publish needs an identity Key Vault authorizes, like any
//! volume's. Files are written under a temporary name and renamed into place, so a crash leaves
//! no half snapshot or volume (recovery removes the temporary ones).

use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::create::{CreateRequest, VolumeSummary, summary};
use super::header::{self, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::params::{Lifecycle, MIN_CAPACITY, Provisioning};
use super::{
    Manager, Volume, VolumeError, crash, invalid, io_err, is_fs_mount_of, not_found, now_unix,
};
use crate::pool::Disk;
use crate::sys::{self, Copied, MountTable};

/// Freezes in progress, one file per volume naming the mount point (for recovery).
const FREEZES_DIR: &str = "freezes";

/// What the CO learns about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotSummary {
    pub(crate) id: VolumeId,
    pub(crate) source_volume_id: String,
    /// The size of a volume restored from it, at least.
    pub(crate) size_bytes: u64,
    pub(crate) created_unix: u64,
    /// False while its backup is uploading: it may not be restored from yet.
    pub(crate) ready_to_use: bool,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ContentSource {
    Snapshot(VolumeId),
    Volume(VolumeId),
}

fn snapshot_summary(id: &VolumeId, r: &VolumeRecord) -> SnapshotSummary {
    SnapshotSummary {
        id: id.clone(),
        source_volume_id: r.source.clone().unwrap_or_default(),
        size_bytes: r.capacity_bytes,
        created_unix: r.created_unix,
        ready_to_use: r.backup.as_ref().is_none_or(|b| b.uploaded),
    }
}

impl Manager {
    pub(super) fn load_snapshot(&self, id: &VolumeId) -> Result<Option<Volume>, VolumeError> {
        let Some(file) = self.pools.find_snapshot(id.as_str()) else {
            return Ok(None);
        };
        let snap = super::manager::read_volume_file(id, file, "snapshot")?;
        if let Some(s) = &snap
            && s.record.lifecycle != Lifecycle::Snapshot
        {
            return Err(VolumeError::FailedPrecondition(format!(
                "the file of snapshot {id} carries the header of a volume"
            )));
        }
        Ok(snap)
    }

    /// Takes snapshot `name` of volume `source`, to be backed up to the container `backup_url`
    /// when one is named, or returns it if it exists (ALREADY_EXISTS if it is of another volume
    /// or goes to another container).
    pub(crate) fn create_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        backup_url: Option<&str>,
    ) -> Result<SnapshotSummary, VolumeError> {
        super::params::check_name(name)?;
        let backup_url = backup_url.map(|u| self.backup_url(u)).transpose()?;
        let id = VolumeId::snapshot_for_name(name);
        let _snapshot_guard = self.lock(&id)?;
        if let Some(leftover) = self.pools.find_deleting(id.as_str()) {
            self.finish_destroy(&leftover)?;
        }
        if let Some(existing) = self.load_snapshot(&id)? {
            let existing_url = existing.record.backup.as_ref().map(|b| b.url.as_str());
            if existing.record.source.as_deref() != Some(source.as_str()) {
                return Err(VolumeError::AlreadyExists(format!(
                    "snapshot {name:?} exists as {id}, of volume {}, not {source}",
                    existing.record.source.as_deref().unwrap_or("?")
                )));
            }
            if existing_url != backup_url.as_deref() {
                return Err(VolumeError::AlreadyExists(format!(
                    "snapshot {name:?} exists as {id}, backed up to {}, not {}",
                    existing_url.unwrap_or("nothing"),
                    backup_url.as_deref().unwrap_or("nothing")
                )));
            }
            return Ok(snapshot_summary(&id, &existing.record));
        }
        let _volume_guard = self.lock(source)?;
        let vol = self.load(source)?.ok_or_else(|| not_found(source))?;
        if vol.record.lifecycle != Lifecycle::Persistent {
            return Err(invalid(
                "source_volume_id",
                format!(
                    "{source} is an inline volume; only volumes made by CreateVolume have snapshots"
                ),
            ));
        }
        if backup_url.is_some() {
            self.check_backup_source(&vol.record)?;
        }
        let disk = vol.file.disk();
        {
            // What the copy will take: the volume's written data, at most.
            let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            let meta = std::fs::metadata(&vol.file.path).map_err(io_err("stat", &vol.file.path))?;
            let data = sys::allocated_bytes(&meta);
            let free = disk.space()?.promisable_bytes;
            if data > free {
                return Err(VolumeError::ResourceExhausted(format!(
                    "the disk of volume {source} has {free} bytes to promise; a snapshot of it may take {data}"
                )));
            }
        }
        let tmp = disk.snapshot_creating_path(id.as_str());
        // A leftover of an attempt that failed before its cleanup: start afresh.
        let _ = std::fs::remove_file(&tmp);
        let guard = Temporary::new(&tmp);
        self.copy_from_volume(&vol, &tmp, may_reflink(&vol.record, None))?;
        let wrapped = vol.record.kms.as_ref().is_some_and(|k| k.wrapped.is_some());
        let record = VolumeRecord {
            volume_id: id.to_string(),
            name: name.to_string(),
            lifecycle: Lifecycle::Snapshot,
            created_unix: now_unix(),
            owner: None,
            refused_since_ms: None,
            source: Some(source.to_string()),
            key_bound_to: wrapped.then(|| {
                vol.record
                    .key_bound_to
                    .clone()
                    .unwrap_or_else(|| source.to_string())
            }),
            backup: backup_url.map(|url| super::backup::BackupRecord {
                url,
                uploaded: false,
            }),
            ..vol.record.clone()
        };
        finish_file(&tmp, &disk.snapshot_path(id.as_str()), &record, &disk)?;
        guard.placed();
        tracing::info!(snapshot.id = %id, volume.id = %source, "snapshot taken");
        Ok(snapshot_summary(&id, &record))
    }

    /// Copies `vol`'s file to `to`, frozen if it is staged here; a reflink only when `reflink`
    /// allows it (see `may_reflink`).
    fn copy_from_volume(&self, vol: &Volume, to: &Path, reflink: bool) -> Result<(), VolumeError> {
        let mount = match self.loops.find(&vol.file.path)? {
            Some(l) => MountTable::read()?
                .entries()
                .iter()
                .find(|m| is_fs_mount_of(m, &l))
                .map(|m| m.mount_point.clone()),
            None => None,
        };
        let Some(mount) = mount else {
            return copy_into(&vol.file.path, to, None, reflink);
        };
        let record = self.record_freeze(&vol.id, &mount)?;
        if let Err(e) = sys::freeze(&mount) {
            // Not frozen (or frozen by someone else): recovery must not thaw it.
            let _ = std::fs::remove_file(&record);
            return Err(e.into());
        }
        let frozen = Frozen {
            mount: &mount,
            record: &record,
        };
        crash::point("snapshot.frozen");
        let deadline = Instant::now() + self.settings.snapshot_freeze_limit;
        let copied = copy_into(&vol.file.path, to, Some(deadline), reflink);
        let thawed = frozen.thaw();
        match (copied, thawed) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(copy), Err(thaw)) => Err(VolumeError::Internal(format!(
                "{copy}; and thawing {} failed too: {thaw} (the next start thaws it)",
                mount.display()
            ))),
        }
    }

    fn record_freeze(&self, id: &VolumeId, mount: &Path) -> Result<PathBuf, VolumeError> {
        let dir = self.settings.state_dir.join(FREEZES_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        let path = dir.join(id.as_str());
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err("create", &dir))?;
        std::io::Write::write_all(&mut tmp, mount.as_os_str().as_encoded_bytes())
            .map_err(io_err("write", &path))?;
        tmp.as_file().sync_all().map_err(io_err("fsync", &path))?;
        tmp.persist(&path)
            .map_err(|e| io_err("rename", &path)(e.error))?;
        sys::fsync_dir(&dir)?;
        Ok(path)
    }

    /// Thaws every filesystem a snapshot froze and did not thaw (the driver died during the
    /// copy); returns how many. Runs before anything else at start.
    pub(super) fn thaw_recorded_freezes(&self) -> Result<usize, VolumeError> {
        let dir = self.settings.state_dir.join(FREEZES_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut thawed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
            let mount = PathBuf::from(std::ffi::OsString::from_vec(bytes));
            if mount.exists() {
                if let Err(e) = sys::thaw(&mount) {
                    // Kept for the next start; the node serves meanwhile.
                    tracing::error!(mount = %mount.display(), error = %e, "could not thaw a filesystem a snapshot left frozen: its writers wait until it is thawed (fsfreeze -u)");
                    continue;
                }
                thawed += 1;
                tracing::warn!(mount = %mount.display(), "thawed a filesystem a snapshot left frozen");
            }
            // Else unmounted since (a reboot): nothing is frozen.
            std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        Ok(thawed)
    }

    /// Deletes and wipes a snapshot like a volume; one that does not exist (or an id that is
    /// not a snapshot's) is already deleted.
    pub(crate) fn delete_snapshot(&self, raw_id: &str) -> Result<(), VolumeError> {
        let Ok(id) = VolumeId::parse_snapshot(raw_id) else {
            return Ok(());
        };
        let _guard = self.lock(&id)?;
        if let Some(leftover) = self.pools.find_deleting(id.as_str()) {
            self.finish_destroy(&leftover)?;
        }
        let Some(snap) = self.load_snapshot(&id)? else {
            return self.delete_foreign_backups(&id);
        };
        if let Some(backup) = &snap.record.backup {
            self.stop_upload(&id)?;
            self.delete_backup(&id, &backup.url)?;
        }
        self.destroy_file(&snap)?;
        tracing::info!(snapshot.id = %id, "snapshot deleted and wiped");
        Ok(())
    }

    pub(crate) fn get_snapshot(&self, raw_id: &str) -> Result<SnapshotSummary, VolumeError> {
        let id = VolumeId::parse_snapshot(raw_id).map_err(VolumeError::NotFound)?;
        if let Some(snap) = self.load_snapshot(&id)? {
            return Ok(snapshot_summary(&id, &snap.record));
        }
        match self.find_backup(&id)? {
            Some((_, m)) => Ok(Self::backup_summary(&id, &m)),
            None => Err(VolumeError::NotFound(format!(
                "snapshot {id} does not exist"
            ))),
        }
    }

    /// Snapshots in id order, filtered by id or source volume, `max_entries` at a time (0:
    /// all); the token is the last id returned.
    pub(crate) fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        starting_token: &str,
        max_entries: i32,
    ) -> Result<(Vec<SnapshotSummary>, Option<String>), VolumeError> {
        let mut names = Vec::new();
        for (_, disk) in self.pools.disks() {
            names.extend(
                disk.snapshot_ids()?
                    .into_iter()
                    .filter(|n| snapshot_id.is_empty() || snapshot_id == n),
            );
        }
        if names.is_empty()
            && let Ok(id) = VolumeId::parse_snapshot(snapshot_id)
            && let Some((_, m)) = self.find_backup(&id)?
        {
            // Not on this node, but in one of its backup containers.
            let s = Self::backup_summary(&id, &m);
            let wanted = source_volume_id.is_empty() || s.source_volume_id == source_volume_id;
            return Ok((if wanted { vec![s] } else { Vec::new() }, None));
        }
        super::create::page(
            names,
            VolumeId::parse_snapshot,
            starting_token,
            max_entries,
            |id| {
                let snap = match self.load_snapshot(id) {
                    Ok(s) => snapshot_summary(id, &s?.record),
                    Err(e) => {
                        tracing::warn!(snapshot.id = %id, error = %e, "skipping unreadable snapshot");
                        return None;
                    }
                };
                (source_volume_id.is_empty() || snap.source_volume_id == source_volume_id)
                    .then_some(snap)
            },
        )
    }

    /// CreateVolume with a content source: a new volume, on the source's disk, holding the
    /// snapshot's or volume's filesystem and its wrapped DEK. The StorageClass must name the
    /// source's key mode and KEK (INVALID_ARGUMENT otherwise); the capacity may be larger than
    /// the source's, and the filesystem then grows at the first stage.
    pub(super) fn create_volume_from(
        &self,
        req: &CreateRequest,
        id: &VolumeId,
        from: &ContentSource,
    ) -> Result<VolumeSummary, VolumeError> {
        let (source_id, source, _guard, field) = match from {
            ContentSource::Snapshot(s) => {
                let guard = self.lock(s)?;
                let Some(snap) = self.load_snapshot(s)? else {
                    return match self.find_backup(s)? {
                        Some((url, manifest)) => {
                            self.restore_from_backup(req, id, s, &url, &manifest)
                        }
                        None => Err(VolumeError::NotFound(format!(
                            "snapshot {s} does not exist (not on this node, nor in its backup containers)"
                        ))),
                    };
                };
                (s, snap, guard, "volume_content_source.snapshot")
            }
            ContentSource::Volume(v) => {
                let guard = self.lock(v)?;
                let vol = self.load(v)?.ok_or_else(|| not_found(v))?;
                if vol.record.lifecycle != Lifecycle::Persistent {
                    return Err(invalid(
                        "volume_content_source.volume",
                        format!(
                            "{v} is an inline volume; only volumes made by CreateVolume can be cloned"
                        ),
                    ));
                }
                (v, vol, guard, "volume_content_source.volume")
            }
        };
        let r = &source.record;
        self.check_same_key(req, r, source_id, field)?;
        if let Some(pool) = &req.params.pool
            && pool != &r.pool
        {
            return Err(invalid(
                "parameters.pool",
                format!(
                    "{source_id} is in pool {}; a volume made from it is placed beside it",
                    r.pool
                ),
            ));
        }
        let capacity = restore_capacity(req, r.capacity_bytes, source_id)?;
        let disk = source.file.disk();
        let tmp = disk.creating_path(id.as_str());
        let guard = Temporary::new(&tmp);
        {
            // The room is promised under the placement lock, by the temporary file's length
            // (a `.img.creating` file counts as promised); the copy runs without the lock.
            let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            let free = disk.space()?.promisable_bytes;
            if HEADER_BYTES + capacity > free {
                return Err(VolumeError::ResourceExhausted(format!(
                    "the disk of {source_id} has {free} bytes to promise; a volume of {capacity} bytes made from it needs them beside it"
                )));
            }
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            file.set_len(HEADER_BYTES + capacity)
                .map_err(io_err("size", &tmp))?;
        }
        let reflink = may_reflink(r, Some(req.params.provisioning));
        match from {
            ContentSource::Snapshot(_) => copy_into(&source.file.path, &tmp, None, reflink)?,
            ContentSource::Volume(_) => self.copy_from_volume(&source, &tmp, reflink)?,
        }
        self.finish_restore(req, id, source_id, r, &tmp, &disk, &r.pool, capacity, guard)
    }

    /// A new volume made from `source_id` (whose record is `r`) must name its key mode and KEK.
    pub(super) fn check_same_key(
        &self,
        req: &CreateRequest,
        r: &VolumeRecord,
        source_id: &VolumeId,
        field: &str,
    ) -> Result<(), VolumeError> {
        if req.params.key_mode != r.key_mode
            || !super::create::same_kek(r.kms.as_ref(), req.params.kms.as_ref())
        {
            return Err(invalid(
                "parameters",
                format!(
                    "{source_id} has keyMode {} and its own Key Vault key; a volume made from it keeps them (and its wrapped DEK): use a StorageClass with the same keyMode, vault and key ({field})",
                    r.key_mode.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Turns the copy of `source_id` at `tmp` (its record `r`) into volume `id` of `capacity`
    /// bytes in `pool`: sized, reserved when thick, given its own header, renamed into place.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_restore(
        &self,
        req: &CreateRequest,
        id: &VolumeId,
        source_id: &VolumeId,
        r: &VolumeRecord,
        tmp: &Path,
        disk: &Disk,
        pool: &str,
        capacity: u64,
        guard: Temporary,
    ) -> Result<VolumeSummary, VolumeError> {
        let file = OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(io_err("open", tmp))?;
        file.set_len(HEADER_BYTES + capacity)
            .map_err(io_err("size", tmp))?;
        if req.params.provisioning == Provisioning::Thick {
            sys::reserve(&file, tmp, 0, HEADER_BYTES + capacity)
                .map_err(|e| super::create::reserve_error(e, capacity))?;
        }
        drop(file);
        let wrapped = r.kms.as_ref().is_some_and(|k| k.wrapped.is_some());
        let record = VolumeRecord {
            volume_id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            lifecycle: Lifecycle::Persistent,
            wipe: req.params.wipe,
            provisioning: req.params.provisioning,
            created_unix: now_unix(),
            on_revoke: req.params.on_revoke,
            owner: super::create::owner_of(req),
            refused_since_ms: None,
            source: Some(source_id.to_string()),
            grow_filesystem: r.formatted && (r.grow_filesystem || capacity > r.capacity_bytes),
            key_bound_to: wrapped.then(|| {
                r.key_bound_to
                    .clone()
                    .unwrap_or_else(|| r.volume_id.clone())
            }),
            pool: pool.to_string(),
            backup: None,
            ..r.clone()
        };
        finish_file(tmp, &disk.volume_path(id.as_str()), &record, disk)?;
        guard.placed();
        tracing::info!(volume.id = %id, source = %source_id, capacity, "volume made from {}", if r.lifecycle == Lifecycle::Snapshot { "a snapshot" } else { "a clone" });
        Ok(summary(id, &record))
    }
}

/// The capacity of a volume made from a source of `source_bytes`: what the request asks, at
/// least the source's (OUT_OF_RANGE when the request's limit is smaller).
pub(super) fn restore_capacity(
    req: &CreateRequest,
    source_bytes: u64,
    source_id: &VolumeId,
) -> Result<u64, VolumeError> {
    let capacity = req.capacity.resolve()?.max(source_bytes).max(MIN_CAPACITY);
    if !req.capacity.admits(capacity) {
        return Err(VolumeError::OutOfRange(format!(
            "{source_id} holds {source_bytes} bytes; capacity_range allows no volume that large"
        )));
    }
    Ok(capacity)
}

/// Whether a copy of `source` (into a volume provisioned `target`, or a snapshot) may share
/// its blocks: only between thin files. A thick volume's blocks shared with a copy would need
/// new space when rewritten, which its reservation promised they would not; and a thick copy
/// must own every block it reserves.
fn may_reflink(source: &VolumeRecord, target: Option<Provisioning>) -> bool {
    source.provisioning == Provisioning::Thin && target.is_none_or(|t| t == Provisioning::Thin)
}

/// A filesystem this process froze: thawed when dropped (also on a panic), and its record
/// removed once thawed; a thaw that fails leaves the record for the next start.
struct Frozen<'a> {
    mount: &'a Path,
    record: &'a Path,
}

impl Frozen<'_> {
    fn thaw(self) -> Result<(), VolumeError> {
        let result = sys::thaw(self.mount);
        if result.is_ok() {
            let _ = std::fs::remove_file(self.record);
        }
        std::mem::forget(self);
        result.map_err(VolumeError::from)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if sys::thaw(self.mount).is_ok() {
            let _ = std::fs::remove_file(self.record);
        }
    }
}

/// A temporary file removed when dropped, unless it was renamed into place.
pub(super) struct Temporary(Option<PathBuf>);

impl Temporary {
    pub(super) fn new(path: &Path) -> Temporary {
        Temporary(Some(path.to_path_buf()))
    }

    fn placed(mut self) {
        self.0 = None;
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Copies the file at `from` into a new file at `to` (replacing a leftover), abandoning it when
/// `deadline` passes first.
fn copy_into(
    from: &Path,
    to: &Path,
    deadline: Option<Instant>,
    reflink: bool,
) -> Result<(), VolumeError> {
    let source = File::open(from).map_err(io_err("open", from))?;
    // Not truncated: a restore's temporary file already holds the promised length.
    let target = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
        .map_err(io_err("create", to))?;
    let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86400));
    match sys::copy_file(&source, &target, from, deadline, reflink)? {
        Copied::TimedOut => {
            drop(target);
            Err(VolumeError::Aborted(format!(
                "copying {} did not finish within --snapshot-freeze-limit while its filesystem was frozen; it was thawed and the copy abandoned (retry when it is less busy, or raise the limit)",
                from.display()
            )))
        }
        Copied::Reflinked | Copied::Sparse(_) => Ok(()),
    }
}

/// Gives the copy at `tmp` a header of its own (both slots of the source's erased first, so
/// no older generation of them can win), syncs it and renames it to `path`.
fn finish_file(
    tmp: &Path,
    path: &Path,
    record: &VolumeRecord,
    disk: &Disk,
) -> Result<(), VolumeError> {
    let header_err = |source| VolumeError::Header {
        volume_id: record.volume_id.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp)
        .map_err(io_err("open", tmp))?;
    header::erase(&mut file).map_err(header_err)?;
    header::write(&mut file, record, 0).map_err(header_err)?;
    file.sync_all().map_err(io_err("fsync", tmp))?;
    drop(file);
    crash::point("snapshot.before_rename");
    std::fs::rename(tmp, path).map_err(io_err("rename", tmp))?;
    sys::fsync_dir(&disk.dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_thin_files_share_blocks() {
        let mut record: VolumeRecord = serde_json::from_value(serde_json::json!({
            "volume_id": "sv-00000000000000000000000000000000", "name": "n", "capacity_bytes": 1,
            "lifecycle": "persistent", "pool": "p", "fs_type": "ext4", "key_mode": "none",
            "wipe": "discard", "provisioning": "thin", "created_unix": 0, "formatted": true
        }))
        .expect("a record");
        assert!(may_reflink(&record, None));
        assert!(may_reflink(&record, Some(Provisioning::Thin)));
        assert!(!may_reflink(&record, Some(Provisioning::Thick)));
        record.provisioning = Provisioning::Thick;
        assert!(!may_reflink(&record, None));
        assert!(!may_reflink(&record, Some(Provisioning::Thin)));
    }
}
