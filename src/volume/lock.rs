//! Per-volume guards: one operation on a volume at a time. A second caller is refused at
//! once (gRPC ABORTED, and the CO retries) instead of queueing behind a slow mkfs.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::VolumeError;
use super::id::VolumeId;

#[derive(Debug, Default, Clone)]
pub(crate) struct VolumeLocks {
    held: Arc<Mutex<HashSet<VolumeId>>>,
}

/// Releases its volume when dropped.
#[derive(Debug)]
pub(crate) struct VolumeGuard {
    held: Arc<Mutex<HashSet<VolumeId>>>,
    id: VolumeId,
}

impl VolumeLocks {
    pub(crate) fn try_lock(&self, id: &VolumeId) -> Result<VolumeGuard, VolumeError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.insert(id.clone()) {
            return Err(VolumeError::Busy(id.to_string()));
        }
        Ok(VolumeGuard {
            held: Arc::clone(&self.held),
            id: id.clone(),
        })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_drop() {
        let locks = VolumeLocks::default();
        let id = VolumeId::for_name("a");
        let guard = locks.try_lock(&id).unwrap();
        assert!(matches!(locks.try_lock(&id), Err(VolumeError::Busy(_))));
        assert!(locks.try_lock(&VolumeId::for_name("b")).is_ok());
        drop(guard);
        assert!(locks.try_lock(&id).is_ok());
    }
}
