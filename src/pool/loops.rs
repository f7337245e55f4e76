//! Which loop device backs each volume file. The kernel keeps no index from a file to the
//! loop devices over it, so finding one means reading every bound device's sysfs entry: a
//! cost that grows with the node's volumes. This index learns the devices once, by that scan,
//! at the first lookup, and then from every attach this process makes; a lookup opens only
//! the one device it names and checks that it is still bound to the file (autoclear frees a
//! device at its last unmount, and the number may be reused for another file).
//!
//! What it cannot see is a device attached to a volume file by another process after the
//! scan: only this plugin attaches volume files, and a restart scans again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use crate::sys::{self, AttachedLoop, FileId, SysError};

#[derive(Default)]
pub(crate) struct LoopIndex {
    /// None until the first lookup has scanned the kernel's devices.
    by_file: Mutex<Option<HashMap<FileId, u32>>>,
}

impl LoopIndex {
    /// The loop device bound to the file at `backing`, if any; None when the file is gone.
    pub(crate) fn find(&self, backing: &Path) -> Result<Option<AttachedLoop>, SysError> {
        let Some(file) = FileId::of(backing)? else {
            return Ok(None);
        };
        let number = {
            let mut guard = self.by_file.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(scan()?);
            }
            guard.as_ref().and_then(|m| m.get(&file).copied())
        };
        let Some(number) = number else {
            return Ok(None);
        };
        match sys::attached_number(number)? {
            Some(found) if found.backing == file => Ok(Some(found)),
            _ => {
                self.forget(file, number);
                Ok(None)
            }
        }
    }

    /// Every loop device bound to the file at `backing`, by a scan of all of them (which also
    /// refreshes the index): for the paths that release a volume's devices, which must not
    /// miss one attached behind the plugin's back or a second one over the same file.
    pub(crate) fn find_all(&self, backing: &Path) -> Result<Vec<AttachedLoop>, SysError> {
        let Some(file) = FileId::of(backing)? else {
            return Ok(Vec::new());
        };
        let found: Vec<AttachedLoop> = sys::attached_loops()?
            .into_iter()
            .filter(|l| l.backing == file)
            .collect();
        let mut guard = self.by_file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = guard.as_mut() {
            match found.first() {
                Some(l) => map.insert(file, l.number),
                None => map.remove(&file),
            };
        }
        Ok(found)
    }

    /// Records a device this process has just bound to `backing`.
    pub(crate) fn attached(&self, backing: FileId, number: u32) {
        let mut guard = self.by_file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = guard.as_mut() {
            map.insert(backing, number);
        }
        // Not scanned yet: the scan at the first lookup will find it.
    }

    /// Drops `backing`'s entry if it still names `number`.
    pub(crate) fn forget(&self, backing: FileId, number: u32) {
        let mut guard = self.by_file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = guard.as_mut()
            && map.get(&backing) == Some(&number)
        {
            map.remove(&backing);
        }
    }
}

/// Every bound device by its backing file; of several over one file, the lowest number (the
/// one a scan would have found first).
fn scan() -> Result<HashMap<FileId, u32>, SysError> {
    let mut map = HashMap::new();
    for l in sys::attached_loops()? {
        map.entry(l.backing).or_insert(l.number);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::LoopDevice;

    fn volume_file(dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(8 << 20).expect("size");
        path
    }

    /// Detaches on drop, also when the test fails.
    struct Attached(Option<LoopDevice>);

    impl Drop for Attached {
        fn drop(&mut self) {
            if let Some(d) = self.0.take() {
                let _ = d.detach();
            }
        }
    }

    fn file_id(path: &Path) -> FileId {
        FileId::of(path).expect("stat").expect("exists")
    }

    /// A device bound before the first lookup is found by the scan; one bound afterwards is
    /// found only once recorded (the index, not a scan, answers); a detached device is not
    /// found, and neither is its number once reused for another file.
    #[test]
    fn finds_scanned_and_recorded_devices_and_drops_stale_ones() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (loop devices)"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = (
            volume_file(tmp.path(), "a.img"),
            volume_file(tmp.path(), "b.img"),
        );
        let before = Attached(Some(
            LoopDevice::attach(&a, 1 << 20, "sealvol:test").expect("attach a"),
        ));
        let index = LoopIndex::default();
        let found = index
            .find(&a)
            .expect("find a")
            .expect("a found by the scan");
        assert_eq!(Some(found.number), before.0.as_ref().map(|d| d.number()));
        assert!(index.find(&b).expect("find b").is_none());

        let _after = Attached(Some(
            LoopDevice::attach(&b, 1 << 20, "sealvol:test").expect("attach b"),
        ));
        let b_number = _after.0.as_ref().map(|d| d.number()).expect("device");
        assert!(
            index.find(&b).expect("find b").is_none(),
            "an unrecorded device is not looked for"
        );
        index.attached(file_id(&b), b_number);
        assert_eq!(
            index.find(&b).expect("find b").map(|l| l.number),
            Some(b_number)
        );

        // Detach a: its entry is stale. An entry naming a number that is now bound to another
        // file (c) must not lead to c's device.
        let mut before = before;
        before.0.take().expect("device").detach().expect("detach a");
        assert!(index.find(&a).expect("find a").is_none());
        let c = volume_file(tmp.path(), "c.img");
        let c_device = Attached(Some(
            LoopDevice::attach(&c, 1 << 20, "sealvol:test").expect("attach c"),
        ));
        let c_number = c_device.0.as_ref().map(|d| d.number()).expect("device");
        index.attached(file_id(&a), c_number);
        assert!(
            index.find(&a).expect("find a").is_none(),
            "a stale entry is checked against the kernel"
        );
        // A second device over b, which the index never learnt of: find_all sees both.
        let _b_twin = Attached(Some(
            LoopDevice::attach(&b, 1 << 20, "sealvol:test").expect("attach b again"),
        ));
        let all: Vec<u32> = index
            .find_all(&b)
            .expect("scan")
            .iter()
            .map(|l| l.number)
            .collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.contains(&b_number));
        assert!(
            index
                .find(&tmp.path().join("missing.img"))
                .expect("find missing")
                .is_none()
        );
    }
}
