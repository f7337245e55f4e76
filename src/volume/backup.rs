//! Snapshot backups as the volume manager drives them (the transfer itself is
//! `crate::backup`'s).
//!
//! A snapshot taken with a `backupURL` records the container in its header, with `uploaded`
//! false, and is reported not ready to use until the upload has finished and `uploaded` is
//! saved: a snapshot whose backup is half done is never reported ready. The upload runs in the
//! background, one per snapshot; a driver that dies meanwhile resumes it at start, and every
//! CreateSnapshot of the snapshot starts it again if it failed (and reports why). Restoring a
//! snapshot that is not on this node looks for its backup in the node's backup containers and
//! downloads it into the new volume, on whichever disk has room: a backed-up snapshot belongs
//! to no node.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::create::{CreateRequest, VolumeSummary};
use super::header::{self, HEADER_BYTES, VolumeRecord};
use super::id::VolumeId;
use super::params::{KeyMode, Lifecycle};
use super::snapshot::{SnapshotSummary, Temporary};
use super::{Manager, VolumeError, crash, invalid, io_err};
use crate::backup::{BackupError, BackupStore, Manifest, SnapshotFile};

/// Where a snapshot is backed up, in its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BackupRecord {
    /// The container, as `--backup-url` names it.
    pub(crate) url: String,
    /// The upload finished and was verified: the snapshot is ready to use.
    #[serde(default)]
    pub(crate) uploaded: bool,
}

/// The uploads of this process, by snapshot: running (or waiting for a turn), or the error that
/// stopped the last one; and the turns: at most `UPLOADS_AT_ONCE` transfer at a time, each
/// holding a few blocks in memory (a restart may find many pending).
pub(crate) struct Uploads {
    by_snapshot: Mutex<HashMap<VolumeId, Upload>>,
    turns: Arc<tokio::sync::Semaphore>,
}

const UPLOADS_AT_ONCE: usize = 2;

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            by_snapshot: Mutex::default(),
            turns: Arc::new(tokio::sync::Semaphore::new(UPLOADS_AT_ONCE)),
        }
    }
}

struct Upload {
    stop: Arc<AtomicBool>,
    running: bool,
    failed: Option<VolumeError>,
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, Upload>> {
        self.by_snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a turn to transfer; None when `stop` is set meanwhile.
    fn turn(&self, stop: &AtomicBool) -> Option<tokio::sync::OwnedSemaphorePermit> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Ok(permit) = Arc::clone(&self.turns).try_acquire_owned() {
                return Some(permit);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl From<BackupError> for VolumeError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Refused(m) => VolumeError::FailedPrecondition(m),
            BackupError::Unavailable(m) => VolumeError::Unavailable(m),
            BackupError::Corrupt(m) => VolumeError::Corrupt(m),
            BackupError::Gone(m) => VolumeError::NotFound(m),
            BackupError::Stopped => VolumeError::Aborted("the backup upload was stopped".into()),
            BackupError::Local(e) => VolumeError::Sys(e),
        }
    }
}

/// A copy of an error to keep and report again (the kept one stays for the next caller).
fn again(e: &VolumeError) -> VolumeError {
    match e {
        VolumeError::FailedPrecondition(m) => VolumeError::FailedPrecondition(m.clone()),
        VolumeError::Corrupt(m) => VolumeError::Corrupt(m.clone()),
        other => VolumeError::Unavailable(other.to_string()),
    }
}

impl Manager {
    fn backup_store(&self, what: &str) -> Result<&BackupStore, VolumeError> {
        self.backups.as_deref().ok_or_else(|| {
            VolumeError::FailedPrecondition(format!(
                "{what}: this node has no backup container (--backup-url)"
            ))
        })
    }

    /// The container a VolumeSnapshotClass's `backupURL` names, if this node may use it.
    pub(super) fn backup_url(&self, raw: &str) -> Result<String, VolumeError> {
        let store = self.backups.as_deref().ok_or_else(|| {
            invalid(
                "parameters.backupURL",
                "this node has no backup container: start it with --backup-url (the chart's backup.urls)",
            )
        })?;
        store
            .allowed(raw)
            .map_err(|e| invalid("parameters.backupURL", e))
    }

    /// Refuses a backup of a volume whose data would leave the node in the clear.
    pub(super) fn check_backup_source(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        if r.key_mode == KeyMode::None {
            return Err(invalid(
                "parameters.backupURL",
                format!(
                    "{} has keyMode none: its data is not encrypted, so it is not backed up (take a snapshot without backupURL)",
                    r.volume_id
                ),
            ));
        }
        Ok(())
    }

    /// Starts the upload of snapshot `id`'s backup unless one is running. When the last attempt
    /// failed, it is started again and its error returned, so the caller sees why the snapshot
    /// is still not ready.
    pub(crate) fn ensure_upload(self: &Arc<Self>, id: &VolumeId) -> Result<(), VolumeError> {
        let (stop, failed) = {
            let mut uploads = self.uploads.lock();
            let entry = uploads.entry(id.clone()).or_insert_with(|| Upload {
                stop: Arc::new(AtomicBool::new(false)),
                running: false,
                failed: None,
            });
            if entry.running {
                return Ok(());
            }
            entry.running = true;
            entry.stop = Arc::new(AtomicBool::new(false));
            (Arc::clone(&entry.stop), entry.failed.as_ref().map(again))
        };
        let manager = Arc::clone(self);
        let snapshot = id.clone();
        self.release.runtime.spawn_blocking(move || {
            let result = match manager.uploads.turn(&stop) {
                // A panic must not leave the entry running for good (deletes would wait on it).
                Some(_turn) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    manager.upload(&snapshot, &stop)
                }))
                .unwrap_or_else(|_| {
                    Err(VolumeError::Internal(
                        "the backup upload panicked (see the log)".into(),
                    ))
                }),
                None => Err(VolumeError::Aborted("stopped before its turn".into())),
            };
            let mut uploads = manager.uploads.lock();
            match result {
                Ok(()) | Err(VolumeError::Aborted(_)) => {
                    uploads.remove(&snapshot);
                }
                Err(e) => {
                    tracing::error!(snapshot.id = %snapshot, error = %e, "backup upload failed; the next CreateSnapshot of it (csi-snapshotter retries) or a restart tries again");
                    if let Some(u) = uploads.get_mut(&snapshot) {
                        u.running = false;
                        u.failed = Some(e);
                    }
                }
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts the uploads a previous run of the driver left unfinished; how many.
    pub(crate) fn resume_uploads(self: &Arc<Self>) -> usize {
        let mut started = 0;
        for (_, disk) in self.pools.disks() {
            for raw in disk.snapshot_ids().unwrap_or_default() {
                let Ok(id) = VolumeId::parse_snapshot(&raw) else {
                    continue;
                };
                let pending = matches!(
                    self.load_snapshot(&id),
                    Ok(Some(s)) if s.record.backup.as_ref().is_some_and(|b| !b.uploaded)
                );
                if pending {
                    // An error here is the last attempt's, and there was none in this process.
                    let _ = self.ensure_upload(&id);
                    started += 1;
                }
            }
        }
        started
    }

    /// Uploads snapshot `id`'s backup and records it complete. The data goes up without the
    /// snapshot's lock; the manifest (which makes the backup complete) and the mark in the
    /// header go under it, and only if the file at the snapshot's path is still the one
    /// uploaded and no delete asked the upload to stop: a snapshot deleted or taken again
    /// meanwhile never gets a complete backup of another file.
    fn upload(&self, id: &VolumeId, stop: &AtomicBool) -> Result<(), VolumeError> {
        let Some(snap) = self.load_snapshot(id)? else {
            return Ok(());
        };
        let Some(backup) = snap.record.backup.clone().filter(|b| !b.uploaded) else {
            return Ok(());
        };
        let store = self.backup_store(&format!(
            "snapshot {id} is to be backed up to {}",
            backup.url
        ))?;
        let started = Instant::now();
        let path = &snap.file.path;
        let file = std::fs::File::open(path).map_err(io_err("open", path))?;
        let uploading = file_identity(&file).map_err(io_err("stat", path))?;
        let source = SnapshotFile {
            file: &file,
            path,
            id: id.as_str(),
            source_volume_id: snap.record.source.as_deref().unwrap_or_default(),
            created_unix: snap.record.created_unix,
            size_bytes: snap.record.capacity_bytes,
        };
        let staged = || crash::point("backup.block_staged");
        let (manifest, done) = self.release.runtime.block_on(store.upload_data(
            &backup.url,
            &source,
            stop,
            &staged,
        ))?;
        let _guard = self.lock_waiting(id)?;
        let current = self.load_snapshot(id)?;
        let same = current.as_ref().is_some_and(|s| {
            std::fs::File::open(&s.file.path)
                .and_then(|f| file_identity(&f))
                .is_ok_and(|now| now == uploading)
        });
        if stop.load(Ordering::Relaxed) || !same {
            if current.is_none() {
                // Deleted during the upload: what it committed goes too.
                self.release
                    .runtime
                    .block_on(store.delete(&backup.url, id.as_str()))?;
            }
            return Err(VolumeError::Aborted(format!(
                "snapshot {id} was deleted or taken again during its upload"
            )));
        }
        self.release
            .runtime
            .block_on(store.put_manifest(&backup.url, &manifest))?;
        crash::point("backup.before_mark");
        let Some(mut snap) = current else {
            return Ok(());
        };
        if let Some(b) = snap.record.backup.as_mut() {
            b.uploaded = true;
        }
        self.save(&mut snap)?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            snapshot.id = %id,
            url = %backup.url,
            blocks = done.blocks,
            blocks_already_there = done.reused,
            bytes = done.data_bytes,
            seconds = secs,
            mib_per_second = done.data_bytes as f64 / (1 << 20) as f64 / secs.max(1e-3),
            "snapshot backed up"
        );
        Ok(())
    }

    /// The volume lock of `id`, waiting up to 30 s for a call that holds it.
    fn lock_waiting(&self, id: &VolumeId) -> Result<super::lock::VolumeGuard, VolumeError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.lock(id) {
                Err(VolumeError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Stops the upload of `id`, if one runs: ABORTED until it has stopped.
    pub(super) fn stop_upload(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let mut uploads = self.uploads.lock();
        if let Some(u) = uploads.get(id) {
            if u.running {
                u.stop.store(true, Ordering::Relaxed);
                return Err(VolumeError::Aborted(format!(
                    "the backup upload of {id} is stopping; retry"
                )));
            }
            uploads.remove(id);
        }
        Ok(())
    }

    /// Deletes the backup of `id` in `url`.
    pub(super) fn delete_backup(&self, id: &VolumeId, url: &str) -> Result<(), VolumeError> {
        let store = self.backup_store(&format!(
            "snapshot {id} has a backup in {url} that must go with it (add that container to --backup-url again, or delete its blobs {id}/ by hand and the snapshot file)"
        ))?;
        self.release
            .runtime
            .block_on(store.delete(url, id.as_str()))?;
        tracing::info!(snapshot.id = %id, url, "snapshot backup deleted");
        Ok(())
    }

    /// Deletes whatever backup of `id` the node's containers hold (a snapshot this node never
    /// held: one restored elsewhere, or pre-provisioned).
    pub(super) fn delete_foreign_backups(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let Some(store) = self.backups.as_deref() else {
            return Ok(());
        };
        for url in store.urls() {
            self.release
                .runtime
                .block_on(store.delete(&url, id.as_str()))?;
        }
        Ok(())
    }

    /// The container holding a complete backup of snapshot `id`, and its manifest.
    pub(super) fn find_backup(
        &self,
        id: &VolumeId,
    ) -> Result<Option<(String, Manifest)>, VolumeError> {
        let Some(store) = self.backups.as_deref() else {
            return Ok(None);
        };
        Ok(self.release.runtime.block_on(store.find(id.as_str()))?)
    }

    /// CreateVolume from a snapshot held in Blob storage: the volume is placed like a new one
    /// and the backup downloaded into it, checked block by block.
    pub(super) fn restore_from_backup(
        &self,
        req: &CreateRequest,
        id: &VolumeId,
        snapshot: &VolumeId,
        url: &str,
        manifest: &Manifest,
    ) -> Result<VolumeSummary, VolumeError> {
        let store = self.backup_store("restoring a backup")?;
        let pool = self.pools.get(req.params.pool.as_deref())?;
        let capacity = super::snapshot::restore_capacity(req, manifest.size_bytes, snapshot)?;
        if manifest.file_bytes > HEADER_BYTES + capacity {
            return Err(VolumeError::Corrupt(format!(
                "the backup of {snapshot} in {url} is a {}-byte file for a {}-byte volume",
                manifest.file_bytes, manifest.size_bytes
            )));
        }
        let (disk, tmp, guard, file) = {
            // The room is promised by the temporary file's length, as for any new volume.
            let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            let (disk, free) = pool.place(HEADER_BYTES + capacity)?;
            let disk = disk.ok_or_else(|| {
                VolumeError::ResourceExhausted(format!(
                    "pool {} cannot hold a {capacity}-byte volume restored from {snapshot} (free in the pool: {free} bytes)",
                    pool.name
                ))
            })?;
            let tmp = disk.creating_path(id.as_str());
            let guard = Temporary::new(&tmp);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            file.set_len(HEADER_BYTES + capacity)
                .map_err(io_err("size", &tmp))?;
            (disk.clone(), tmp, guard, file)
        };
        let started = Instant::now();
        // The first block holds the header (the file starts with it): checked before the rest
        // is fetched, so a StorageClass with another key costs one block, not the backup.
        let blocks = manifest.blocks.len() as u64;
        self.release
            .runtime
            .block_on(store.download(url, manifest, &file, &tmp, 0..1))?;
        let (source, _) = header::read(&mut &file).map_err(|e| {
            VolumeError::Corrupt(format!(
                "the backup of {snapshot} in {url} holds no readable header: {e}"
            ))
        })?;
        if source.volume_id != snapshot.as_str()
            || source.lifecycle != Lifecycle::Snapshot
            || source.capacity_bytes != manifest.size_bytes
            || source.key_mode == KeyMode::None
        {
            return Err(VolumeError::Corrupt(format!(
                "the backup of {snapshot} in {url} carries a header that does not match its manifest (of {}, {} bytes, keyMode {})",
                source.volume_id,
                source.capacity_bytes,
                source.key_mode.as_str()
            )));
        }
        self.check_same_key(req, &source, snapshot, "volume_content_source.snapshot")?;
        self.release
            .runtime
            .block_on(store.download(url, manifest, &file, &tmp, 1..blocks))?;
        drop(file);
        tracing::info!(volume.id = %id, snapshot.id = %snapshot, url, bytes = manifest.data_bytes(), seconds = started.elapsed().as_secs_f64(), "backup downloaded");
        self.finish_restore(
            req, id, snapshot, &source, &tmp, &disk, &pool.name, capacity, guard,
        )
    }

    /// A snapshot's summary from its backup's manifest: complete, so ready to use.
    pub(super) fn backup_summary(id: &VolumeId, m: &Manifest) -> SnapshotSummary {
        SnapshotSummary {
            id: id.clone(),
            source_volume_id: m.source_volume_id.clone(),
            size_bytes: m.size_bytes,
            created_unix: m.created_unix,
            ready_to_use: true,
        }
    }
}

/// A file's identity (device, inode): while the file is open its inode cannot be reused, so an
/// equal identity at the same path is the same file.
fn file_identity(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_take_turns_and_a_stop_ends_the_wait() {
        let uploads = Uploads::default();
        let go = AtomicBool::new(false);
        let held: Vec<_> = (0..UPLOADS_AT_ONCE)
            .map(|_| uploads.turn(&go).expect("a free turn"))
            .collect();
        assert!(Arc::clone(&uploads.turns).try_acquire_owned().is_err());
        let stopped = AtomicBool::new(true);
        assert!(uploads.turn(&stopped).is_none());
        drop(held);
        assert!(uploads.turn(&go).is_some());
    }
}
