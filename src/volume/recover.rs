//! Start-up reconciliation: finish or undo what a crash interrupted, keep every mount and loop
//! device of an existing volume, release those of nothing; and the gauges read at scrape time.

use std::path::Path;

use super::header::HEADER_BYTES;
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
    /// Filesystems a snapshot froze and the driver died before thawing.
    pub(crate) thawed_filesystems: usize,
}

impl Manager {
    /// Run once at start, before serving: finishes or undoes what a crash interrupted, keeps
    /// every mount and loop device of an existing volume, and removes those of nothing.
    ///
    /// Loop devices are matched to files by identity (device and inode), never by the path
    /// the kernel reports: that is the attacher's path, and after an upgrade the attacher was
    /// another container, in another mount namespace, now gone. Which plugin attached a device
    /// is in its label (`Manager::loop_label`). An orphan of ours is a device we attached
    /// whose backing file is a non-volume file in one of our pool directories, or was
    /// unlinked, lives on a pool's filesystem and was last named like a volume file. Devices
    /// another node plugin attached are left alone, even over the same filesystem.
    pub(crate) fn recover(&self) -> Result<RecoveryReport, VolumeError> {
        // First: a filesystem a snapshot left frozen blocks every writer until thawed.
        let mut report = RecoveryReport {
            thawed_filesystems: self.thaw_recorded_freezes()?,
            ..RecoveryReport::default()
        };
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
            // A device another plugin attached is never ours, whatever its file; one with no
            // label was attached by a sealvol from before labels (or by hand, without one).
            let ours = self.attached_by_us(&l) || l.label.is_empty();
            let orphan = ours
                && (other_files.contains(&l.backing)
                    || (l.backing_deleted()
                        && pool_filesystems.contains(&l.backing.dev)
                        && is_volume_file_name(l.backing_name())));
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
    pub(super) fn release_orphan_loops_of(
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
                self.loops.forget(backing, l.number);
            }
            report.detached_orphan_loops += 1;
            tracing::warn!(device = %dev, backing = %what, "released a loop device that belonged to no volume");
        }
        Ok(())
    }

    /// Volumes by state and each pool's space, into the metrics gauges (at scrape time).
    pub(crate) fn refresh_gauges(&self) -> Result<(), VolumeError> {
        let loops = sys::attached_loops()?;
        let table = MountTable::read()?;
        let (mut created, mut staged, mut published, mut abnormal) = (0, 0, 0, 0);
        let mut by_kek = std::collections::BTreeMap::new();
        let mut pool_files = std::collections::HashSet::new();
        for (_, disk) in self.pools.disks() {
            for id in disk.volume_ids()? {
                // By identity: the path a loop device reports is its attacher's.
                let Some(backing) = sys::FileId::of(&disk.volume_path(&id))? else {
                    continue;
                };
                pool_files.insert(backing);
                let vol = VolumeId::parse(&id)
                    .ok()
                    .and_then(|id| self.load(&id).ok().flatten());
                if let Some(kms) = vol.as_ref().and_then(|v| v.record.kms.as_ref())
                    && let Some(wrapped) = &kms.wrapped
                {
                    let vault = url::Url::parse(&kms.vault_url)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_string))
                        .unwrap_or_default();
                    let kek = format!("{vault}/{}", kms.kek_name());
                    *by_kek
                        .entry((kek, wrapped.kek_version.clone()))
                        .or_insert(0) += 1;
                }
                let device = loops.iter().find(|l| l.backing == backing);
                if let (Some(l), Some(vol)) = (device, &vol)
                    && self
                        .health(vol, l, Path::new("/"), false)
                        .ok()
                        .flatten()
                        .is_some()
                {
                    abnormal += 1;
                }
                match device {
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
        m.set_volumes_by_kek(&by_kek);
        // Loop devices of ours whose file the pools no longer hold (removed, or the pool
        // unmounted under them) are volumes too, and the worst kind.
        abnormal += loops
            .iter()
            .filter(|l| self.attached_by_us(l) && !pool_files.contains(&l.backing))
            .count() as i64;
        m.volumes_abnormal.set(abnormal);
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

/// Whether `name` is, or was while a create or delete ran, the file name of a volume.
fn is_volume_file_name(name: &str) -> bool {
    [".img", ".img.creating", ".img.deleting"]
        .iter()
        .any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|id| VolumeId::parse(id).is_ok())
        })
}
