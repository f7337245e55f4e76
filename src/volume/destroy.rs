//! Wipe and release: a deleted volume's file is renamed out of the namespace, its header's key
//! slot destroyed (or its allocated blocks zeroed), its blocks released (a discard on the
//! device) and the file unlinked; each step safe to repeat after a crash.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use super::header;
use super::params::{KeyMode, WipeMode};
use super::release;
use super::{Manager, Volume, VolumeError, crash, io_err};
use crate::sys::{self, LoopDevice, MountTable};

/// How long to wait for the kernel to let go of a loop device after its last unmount.
const LOOP_RELEASE_WAIT: Duration = Duration::from_secs(5);

impl Manager {
    /// FAILED_PRECONDITION when the volume is mounted anywhere on this node; otherwise frees a
    /// loop device left without a mount.
    pub(super) fn ensure_unused(&self, vol: &Volume) -> Result<(), VolumeError> {
        for l in self.loops.find_all(&vol.file.path)? {
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
    pub(super) fn release_loop(&self, vol: &Volume) -> Result<(), VolumeError> {
        let deadline = std::time::Instant::now() + LOOP_RELEASE_WAIT;
        loop {
            // A scan, not the index: every device over the file goes, however it got there.
            let Some(l) = self.loops.find_all(&vol.file.path)?.into_iter().next() else {
                return Ok(());
            };
            let table = MountTable::read()?;
            let dev = l.device_path().to_string_lossy().into_owned();
            if table.of_source(&dev).next().is_some() {
                return Ok(());
            }
            if let Some(handle) = LoopDevice::open_bound_to(l.number, l.backing)? {
                handle.detach()?;
                self.loops.forget(l.backing, l.number);
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
    pub(super) fn destroy(&self, vol: &Volume) -> Result<(), VolumeError> {
        let start = std::time::Instant::now();
        self.destroy_file(vol)?;
        self.publications_gone(&vol.id)?;
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
                None,
                vol.record.kms.as_ref(),
                "ok",
                start.elapsed(),
            );
        }
        Ok(())
    }

    /// Renames a volume's or snapshot's file out of its namespace, then wipes and removes it.
    pub(super) fn destroy_file(&self, vol: &Volume) -> Result<(), VolumeError> {
        let path = &vol.file.path;
        let disk = vol.file.disk();
        let deleting = disk.deleting_path(vol.id.as_str());
        std::fs::rename(path, &deleting).map_err(io_err("rename", path))?;
        sys::fsync_dir(&disk.dir)?;
        crash::point("delete.renamed");
        self.finish_destroy(&deleting)
    }

    /// Wipes and removes a file renamed for deletion: with `wipe=zero` its allocated blocks
    /// are overwritten, otherwise its header is erased; then every block is released (a
    /// discard on the device) and the file unlinked. Safe to repeat after a crash.
    pub(super) fn finish_destroy(&self, path: &Path) -> Result<(), VolumeError> {
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
