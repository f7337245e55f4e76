//! Start-up reconciliation: finish or undo what a crash interrupted, keep every mount and loop
//! device of an existing volume, release those of nothing; and the gauges read at scrape time.

use std::path::{Path, PathBuf};

use super::id::VolumeId;
use super::{INLINE_DIR, Manager, VolumeError, io_err, publications};
use crate::sys::{self, LoopDevice, MountTable};

/// What startup recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RecoveryReport {
    pub(crate) removed_partial_creates: usize,
    pub(crate) finished_deletes: usize,
    pub(crate) removed_orphan_mounts: usize,
    pub(crate) detached_orphan_loops: usize,
    pub(crate) kept_volumes_in_use: usize,
}

impl Manager {
    /// Run once at start, before serving: finishes or undoes what a crash interrupted, keeps
    /// every mount and loop device of an existing volume, and removes those of nothing.
    pub(crate) fn recover(&self) -> Result<RecoveryReport, VolumeError> {
        let mut report = RecoveryReport::default();
        for (_, disk) in self.pools.disks() {
            let (creating, deleting) = disk.unfinished()?;
            for path in creating {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                report.removed_partial_creates += 1;
            }
            for path in deleting {
                self.release_orphan_loops_of(&path, &mut report)?;
                self.finish_destroy(&path)?;
                report.finished_deletes += 1;
            }
            sys::fsync_dir(&disk.dir)?;
        }
        // Loop devices over files in our pools that are no longer volumes.
        let dirs: Vec<&Path> = self.pools.disks().map(|(_, d)| d.dir.as_path()).collect();
        for l in sys::attached_loops()? {
            let backing = PathBuf::from(l.backing_file.trim_end_matches(" (deleted)"));
            if !dirs.iter().any(|d| backing.parent() == Some(*d)) {
                continue;
            }
            let is_volume = !l.backing_deleted()
                && backing.extension().is_some_and(|e| e == "img")
                && backing.exists();
            if is_volume {
                report.kept_volumes_in_use += 1;
            } else {
                self.release_orphan_loops_of(&backing, &mut report)?;
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

    /// Unmounts everything mounted from loop devices over `backing` and detaches them.
    pub(super) fn release_orphan_loops_of(
        &self,
        backing: &Path,
        report: &mut RecoveryReport,
    ) -> Result<(), VolumeError> {
        let wanted = backing.to_string_lossy();
        let table = MountTable::read()?;
        for l in sys::attached_loops()? {
            if l.backing_file.trim_end_matches(" (deleted)") != wanted {
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
            if let Some(handle) =
                LoopDevice::open_existing(l.number, Path::new(l.backing_file.as_str()))?
            {
                handle.detach()?;
            }
            report.detached_orphan_loops += 1;
            tracing::warn!(device = %dev, backing = %wanted, "released a loop device that belonged to no volume");
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
                let path = disk.volume_path(&id).to_string_lossy().into_owned();
                match loops.iter().find(|l| l.backing_file == path) {
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
}
