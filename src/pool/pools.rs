//! Pools and their disks. A disk is a directory on a mounted filesystem; a volume is one
//! sparse file `<volume-id>.img` in it and lives wholly on that disk. The file system is the
//! database: nothing about which volumes exist is kept anywhere else.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::PoolError;
use super::device;
use crate::sys::{self, SysError, Tools};

const VOLUME_SUFFIX: &str = ".img";
const CREATING_SUFFIX: &str = ".img.creating";
const DELETING_SUFFIX: &str = ".img.deleting";
/// A snapshot: a sparse copy of a volume file, with a header of its own.
const SNAPSHOT_SUFFIX: &str = ".snap";
const SNAPSHOT_CREATING_SUFFIX: &str = ".snap.creating";

/// A `--pool` flag, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PoolSpec {
    Dir { name: String, dir: PathBuf },
    Devices { name: String, devices: Vec<PathBuf> },
}

impl PoolSpec {
    pub(crate) fn name(&self) -> &str {
        match self {
            PoolSpec::Dir { name, .. } | PoolSpec::Devices { name, .. } => name,
        }
    }
}

impl FromStr for PoolSpec {
    type Err = PoolError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| PoolError::Spec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (name, target) = spec.split_once('=').ok_or_else(|| err("missing '='"))?;
        if !valid_pool_name(name) {
            return Err(err(
                "the name must be 1-32 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
            ));
        }
        let absolute = |p: &str| -> Result<PathBuf, PoolError> {
            let path = PathBuf::from(p);
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(err("paths must be absolute and must not contain '..'"));
            }
            Ok(path)
        };
        match target.strip_prefix("device:") {
            Some(list) => {
                let devices = list
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(absolute)
                    .collect::<Result<Vec<_>, _>>()?;
                if devices.is_empty() {
                    return Err(err("device: needs at least one device"));
                }
                Ok(PoolSpec::Devices {
                    name: name.to_string(),
                    devices,
                })
            }
            None => Ok(PoolSpec::Dir {
                name: name.to_string(),
                dir: absolute(target)?,
            }),
        }
    }
}

pub(crate) fn valid_pool_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// One directory that holds volume files; `device` is set when sealvol formatted and mounted
/// the disk itself.
#[derive(Debug, Clone)]
pub(crate) struct Disk {
    pub(crate) dir: PathBuf,
    pub(crate) device: Option<PathBuf>,
}

/// Space on one disk, as the scheduler should see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DiskSpace {
    pub(crate) total_bytes: u64,
    /// Free space minus what existing sparse volumes were promised and have not yet used.
    pub(crate) promisable_bytes: u64,
}

/// A volume's backing file and where it lives.
#[derive(Debug, Clone)]
pub(crate) struct VolumeFile {
    pub(crate) path: PathBuf,
}

impl VolumeFile {
    /// The disk directory the file lies in, for its space and its sibling paths.
    pub(crate) fn disk(&self) -> Disk {
        Disk {
            dir: self
                .path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
            device: None,
        }
    }
}

impl Disk {
    pub(crate) fn volume_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{VOLUME_SUFFIX}"))
    }

    pub(crate) fn creating_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{CREATING_SUFFIX}"))
    }

    pub(crate) fn deleting_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{DELETING_SUFFIX}"))
    }

    pub(crate) fn snapshot_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{SNAPSHOT_SUFFIX}"))
    }

    pub(crate) fn snapshot_creating_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{SNAPSHOT_CREATING_SUFFIX}"))
    }

    /// Ids of the complete snapshots on this disk.
    pub(crate) fn snapshot_ids(&self) -> Result<Vec<String>, SysError> {
        Ok(self
            .names()?
            .into_iter()
            .filter_map(|n| n.strip_suffix(SNAPSHOT_SUFFIX).map(str::to_string))
            .collect())
    }

    /// Ids of the complete volumes on this disk.
    pub(crate) fn volume_ids(&self) -> Result<Vec<String>, SysError> {
        Ok(self
            .names()?
            .into_iter()
            .filter_map(|n| n.strip_suffix(VOLUME_SUFFIX).map(str::to_string))
            .collect())
    }

    /// Files left by a create or a delete that did not finish: (creating, deleting).
    pub(crate) fn unfinished(&self) -> Result<(Vec<PathBuf>, Vec<PathBuf>), SysError> {
        let names = self.names()?;
        let pick = |suffix: &str| {
            names
                .iter()
                .filter(|n| n.ends_with(suffix))
                .map(|n| self.dir.join(n))
                .collect::<Vec<_>>()
        };
        let mut creating = pick(CREATING_SUFFIX);
        creating.extend(pick(SNAPSHOT_CREATING_SUFFIX));
        Ok((creating, pick(DELETING_SUFFIX)))
    }

    fn names(&self) -> Result<Vec<String>, SysError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| SysError::io("read_dir", &self.dir, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    /// Space left to promise: the filesystem's free space less the unallocated part of every
    /// volume file (and unfinished create) already on it, so that sparse files never
    /// overcommit the disk.
    pub(crate) fn space(&self) -> Result<DiskSpace, SysError> {
        let usage = sys::statvfs(&self.dir)?;
        let mut promised_unallocated = 0u64;
        for name in self.names()? {
            if !(name.ends_with(VOLUME_SUFFIX) || name.ends_with(CREATING_SUFFIX)) {
                continue;
            }
            let path = self.dir.join(&name);
            match std::fs::metadata(&path) {
                Ok(meta) => {
                    promised_unallocated += meta.len().saturating_sub(sys::allocated_bytes(&meta));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SysError::io("stat", path, e)),
            }
        }
        Ok(DiskSpace {
            total_bytes: usage.total_bytes,
            promisable_bytes: usage.available_bytes.saturating_sub(promised_unallocated),
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub(crate) name: String,
    pub(crate) disks: Vec<Disk>,
}

impl Pool {
    /// The disk with the most promisable space, if it can hold `bytes`, and the pool's
    /// promisable space summed (for the message when none can): one pass over the disks.
    pub(crate) fn place(&self, bytes: u64) -> Result<(Option<&Disk>, u64), SysError> {
        let mut best: Option<(&Disk, u64)> = None;
        let mut free_sum = 0;
        for disk in &self.disks {
            let free = disk.space()?.promisable_bytes;
            free_sum += free;
            if best.is_none_or(|(_, b)| free > b) {
                best = Some((disk, free));
            }
        }
        let disk = best.filter(|(_, free)| *free >= bytes).map(|(d, _)| d);
        Ok((disk, free_sum))
    }

    /// Total size, promisable space summed, and the largest promisable space on one disk
    /// (the largest volume that can be created now).
    pub(crate) fn space(&self) -> Result<(u64, u64, u64), SysError> {
        let mut total = 0;
        let mut free = 0;
        let mut largest = 0;
        for disk in &self.disks {
            let s = disk.space()?;
            total += s.total_bytes;
            free += s.promisable_bytes;
            largest = largest.max(s.promisable_bytes);
        }
        Ok((total, free, largest))
    }
}

/// Every pool of this node; the first one is the default.
#[derive(Debug, Clone)]
pub(crate) struct Pools {
    pools: Vec<Pool>,
}

impl Pools {
    /// Checks directory pools and formats (when blank) and mounts device pools under
    /// `<state_dir>/pools/<name>/`. `take_over` allows formatting a disk that carries an
    /// unknown signature.
    pub(crate) fn open(
        specs: &[PoolSpec],
        state_dir: &Path,
        tools: &Tools,
        take_over: bool,
    ) -> Result<Pools, PoolError> {
        let mut pools: Vec<Pool> = Vec::new();
        for spec in specs {
            if pools.iter().any(|p| p.name == spec.name()) {
                return Err(PoolError::Spec {
                    spec: spec.name().to_string(),
                    reason: "pool named twice".into(),
                });
            }
            let disks = match spec {
                PoolSpec::Dir { name, dir } => {
                    check_dir(name, dir)?;
                    vec![Disk {
                        dir: dir.clone(),
                        device: None,
                    }]
                }
                PoolSpec::Devices { name, devices } => devices
                    .iter()
                    .map(|d| device::open_disk(name, d, state_dir, tools, take_over))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            pools.push(Pool {
                name: spec.name().to_string(),
                disks,
            });
        }
        if pools.is_empty() {
            return Err(PoolError::Spec {
                spec: String::new(),
                reason: "at least one --pool is required".into(),
            });
        }
        Ok(Pools { pools })
    }

    pub(crate) fn all(&self) -> &[Pool] {
        &self.pools
    }

    /// The named pool, or the default (first) one.
    pub(crate) fn get(&self, name: Option<&str>) -> Result<&Pool, PoolError> {
        match name {
            None => Ok(&self.pools[0]),
            Some(n) => self
                .pools
                .iter()
                .find(|p| p.name == n)
                .ok_or_else(|| PoolError::Unknown {
                    name: n.to_string(),
                    known: self.names(),
                }),
        }
    }

    pub(crate) fn names(&self) -> String {
        self.pools
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn disks(&self) -> impl Iterator<Item = (&Pool, &Disk)> {
        self.pools
            .iter()
            .flat_map(|p| p.disks.iter().map(move |d| (p, d)))
    }

    /// Where volume `id` lives, if it exists.
    pub(crate) fn find_volume(&self, id: &str) -> Option<VolumeFile> {
        self.disks().find_map(|(_, disk)| {
            let path = disk.volume_path(id);
            path.exists().then_some(VolumeFile { path })
        })
    }

    /// Where snapshot `id` lives, if it exists.
    pub(crate) fn find_snapshot(&self, id: &str) -> Option<VolumeFile> {
        self.disks().find_map(|(_, disk)| {
            let path = disk.snapshot_path(id);
            path.exists().then_some(VolumeFile { path })
        })
    }

    /// The file of a delete of `id` that did not finish, if any.
    pub(crate) fn find_deleting(&self, id: &str) -> Option<PathBuf> {
        self.disks()
            .map(|(_, disk)| disk.deleting_path(id))
            .find(|p| p.exists())
    }

    /// Readiness: every disk directory answers statvfs, and every disk sealvol mounted is
    /// still mounted there.
    pub(crate) fn check(&self) -> Result<(), PoolError> {
        let table = sys::MountTable::read()?;
        for (pool, disk) in self.disks() {
            sys::statvfs(&disk.dir)?;
            if let Some(device) = &disk.device
                && table.at(&disk.dir).is_none()
            {
                return Err(PoolError::Disk {
                    pool: pool.name.clone(),
                    device: device.clone(),
                    reason: format!("no longer mounted at {}", disk.dir.display()),
                });
            }
        }
        Ok(())
    }
}

fn check_dir(pool: &str, dir: &Path) -> Result<(), PoolError> {
    let err = |reason: String| PoolError::Dir {
        pool: pool.to_string(),
        dir: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    sys::statvfs(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dir_and_device_pools() {
        assert_eq!(
            "fast=/mnt/sealvol".parse::<PoolSpec>().unwrap(),
            PoolSpec::Dir {
                name: "fast".into(),
                dir: "/mnt/sealvol".into()
            }
        );
        assert_eq!(
            "nvme=device:/dev/nvme0n1,/dev/nvme1n1"
                .parse::<PoolSpec>()
                .unwrap(),
            PoolSpec::Devices {
                name: "nvme".into(),
                devices: vec!["/dev/nvme0n1".into(), "/dev/nvme1n1".into()]
            }
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "noequals",
            "=/mnt",
            "Bad=/mnt",
            "a=relative/dir",
            "a=/mnt/../etc",
            "a=device:",
            "-a=/mnt",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} was accepted");
        }
    }
}
