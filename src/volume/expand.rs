//! Expansion: the volume's file grows (with the room checked on its disk), then the loop
//! device and ext4; online with CAP_SYS_RESOURCE, otherwise while staged and unpublished.

use std::fs::OpenOptions;

use super::header::HEADER_BYTES;
use super::id::VolumeId;
use super::params::{CapacityRange, Provisioning};
use super::paths::check_under;
use super::{
    Manager, Volume, VolumeError, crash, io_err, is_data_mount_of, is_fs_mount_of, not_found,
    publications,
};
use crate::crypt;
use crate::sys::{self, LoopDevice, MountFlags, MountTable};

impl Manager {
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
        let device = self
            .loops
            .find(&vol.file.path)?
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

    pub(super) fn grow_file(&self, vol: &mut Volume, capacity: u64) -> Result<(), VolumeError> {
        let path = vol.file.path.clone();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let current_len = file.metadata().map_err(io_err("stat", &path))?.len();
        let wanted_len = HEADER_BYTES + capacity.max(vol.record.capacity_bytes);
        if wanted_len > current_len {
            let _placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            let free = vol.file.disk().space()?.promisable_bytes;
            if wanted_len - current_len > free {
                return Err(VolumeError::ResourceExhausted(format!(
                    "the disk of volume {} has {free} bytes free; growing to {capacity} bytes needs {}",
                    vol.id,
                    wanted_len - current_len
                )));
            }
            if vol.record.provisioning == Provisioning::Thick {
                sys::reserve(&file, &path, current_len, wanted_len - current_len)
                    .map_err(|e| super::create::reserve_error(e, wanted_len - current_len))?;
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
}
