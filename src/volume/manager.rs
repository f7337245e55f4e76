//! The Manager: what the lifecycle owns (the node's settings, pools, per-volume guards, key
//! release) and the steps every concern shares: loading and saving a volume's header, and
//! recognising its mounts. Each CSI call is one method, in the file of its concern.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::VolumeError;
use super::authorization::Authorizations;
use super::header::{self, VolumeRecord};
use super::id::VolumeId;
use super::lock::{VolumeGuard, VolumeLocks};
use super::release::KeyRelease;
use crate::crypt;
use crate::pool::{LoopIndex, Pools, VolumeFile};
use crate::sys::{self, AttachedLoop, MountTable, SysError, Tools};

/// The topology segment key that pins a volume to the node whose disk holds it.
pub(crate) const TOPOLOGY_KEY: &str = "topology.sealvol.io/node";
pub(super) const INLINE_DIR: &str = "inline";

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
    /// What volumes this node serves.
    pub(crate) policy: super::NodePolicy,
    /// How long an inline volume whose first publish failed is kept for kubelet's retries.
    pub(crate) refused_inline_ttl: Duration,
    /// This node plugin's tag in the labels of the loop devices it attaches (`loop_owner`).
    pub(crate) loop_owner: String,
    /// The longest a snapshot may keep a volume's filesystem frozen.
    pub(crate) snapshot_freeze_limit: Duration,
}

/// A loaded volume: where its file is and what its header says.
pub(super) struct Volume {
    pub(super) id: VolumeId,
    pub(super) file: VolumeFile,
    pub(super) record: VolumeRecord,
    pub(super) generation: u64,
}

pub(crate) struct Manager {
    pub(super) settings: NodeSettings,
    pub(super) pools: Pools,
    pub(super) tools: Tools,
    pub(super) locks: VolumeLocks,
    /// Serialises placement, so two creates cannot both count the same free space.
    pub(super) placement: Mutex<()>,
    pub(super) release: KeyRelease,
    /// Per live publication: its pod, when it was last authorized, whether it is refused.
    pub(super) authorizations: Authorizations,
    /// The volumes last found abnormal, so a damage is evented once, when it is found.
    pub(super) abnormal: Mutex<std::collections::HashSet<VolumeId>>,
    /// Which loop device backs each volume file, so a lookup opens one device, not all.
    pub(super) loops: LoopIndex,
    /// The backup containers (`--backup-url`) and the driver's identity; None: no backups.
    pub(super) backups: Option<std::sync::Arc<crate::backup::BackupStore>>,
    pub(super) uploads: super::backup::Uploads,
}

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> VolumeError {
    VolumeError::InvalidArgument {
        field,
        message: message.into(),
    }
}

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |e| VolumeError::Sys(SysError::io(op, path, e))
}

/// The file in the state directory that holds `loop_owner`.
const LOOP_OWNER_FILE: &str = "loop-owner";

/// This node plugin's owner tag: random, made at the first start and kept in the state
/// directory, so it outlives restarts and upgrades. Every loop device the plugin attaches is
/// labelled with it, which is how recovery tells its own devices over deleted files from
/// those of another plugin whose pool shares the filesystem (the kernel keeps no path that
/// would tell).
pub(crate) fn loop_owner(state_dir: &Path) -> Result<String, VolumeError> {
    let path = state_dir.join(LOOP_OWNER_FILE);
    let valid = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match std::fs::read_to_string(&path) {
        Ok(s) if valid(s.trim()) => return Ok(s.trim().to_string()),
        Ok(s) => {
            return Err(VolumeError::FailedPrecondition(format!(
                "{} holds {:?}, not 16 hexadecimal digits; remove it only when no loop device of this node is in use",
                path.display(),
                s.chars().take(40).collect::<String>()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &path)(e)),
    }
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| VolumeError::Internal("the OS RNG failed".into()))?;
    let owner: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut tmp =
        tempfile::NamedTempFile::new_in(state_dir).map_err(io_err("create", state_dir))?;
    std::io::Write::write_all(&mut tmp, owner.as_bytes()).map_err(io_err("write", &path))?;
    tmp.as_file().sync_all().map_err(io_err("fsync", &path))?;
    tmp.persist_noclobber(&path)
        .map_err(|e| io_err("create", &path)(e.error))?;
    sys::fsync_dir(state_dir)?;
    Ok(owner)
}

pub(super) fn now_unix() -> u64 {
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
        backups: Option<crate::backup::BackupStore>,
    ) -> Manager {
        let authorizations = Authorizations::new(&settings.state_dir);
        Manager {
            settings,
            pools,
            tools,
            locks: VolumeLocks::default(),
            placement: Mutex::new(()),
            release,
            authorizations,
            abnormal: Mutex::new(std::collections::HashSet::new()),
            loops: LoopIndex::default(),
            backups: backups.map(std::sync::Arc::new),
            uploads: Default::default(),
        }
    }

    /// The label of every loop device this node plugin attaches (the volume is known by the
    /// backing file's identity; inline volume ids would not fit the kernel's 64 bytes).
    pub(super) fn loop_label(&self) -> String {
        format!("sealvol:{}", self.settings.loop_owner)
    }

    /// Whether loop device `l` was attached by this node plugin (now or before a restart).
    pub(super) fn attached_by_us(&self, l: &AttachedLoop) -> bool {
        l.label == self.loop_label()
    }

    /// Whether a pool of this node holds volume `id`. Only a definite "no such file" counts as
    /// not held: a disk that cannot be read is not evidence that its volumes are gone, and an
    /// id that is not a sealvol volume id (from an API object) is never looked up.
    pub(crate) fn holds_volume(&self, id: &str) -> bool {
        let Ok(id) = VolumeId::parse(id) else {
            return true;
        };
        self.pools.disks().any(|(_, disk)| {
            match std::fs::symlink_metadata(disk.volume_path(id.as_str())) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            }
        })
    }

    /// What the pools say about volumes that are missing from them: whether they are empty,
    /// and whether a missing file may mean something else than a lost volume. A directory pool
    /// on the state directory's own filesystem may be the mount point of a disk not mounted
    /// yet (kubelet's DirectoryOrCreate makes it on the root disk): its volumes would be on
    /// that disk, not gone.
    pub(crate) fn pool_evidence(&self) -> crate::cluster::PoolEvidence {
        let device_of = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .ok()
        };
        let state = device_of(&self.settings.state_dir);
        let doubt = self.pools.disks().find_map(|(pool, disk)| {
            let same = disk.device.is_none() && device_of(&disk.dir) == state;
            same.then(|| {
                format!(
                    "pool {}'s directory {} is on the same filesystem as the state directory {}: if its disk is not mounted yet, its volumes are there, not gone",
                    pool.name,
                    disk.dir.display(),
                    self.settings.state_dir.display()
                )
            })
        });
        crate::cluster::PoolEvidence {
            pools: self.pools.names(),
            empty: self
                .pools
                .disks()
                .all(|(_, disk)| disk.volume_ids().is_ok_and(|ids| ids.is_empty())),
            doubt,
        }
    }

    /// The Kubernetes API client, when the node has one.
    pub(crate) fn kube_api(&self) -> Option<std::sync::Arc<crate::identity::KubeApi>> {
        self.release.kube.clone()
    }

    pub(crate) fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub(crate) fn token_audience(&self) -> &str {
        &self.settings.token_audience
    }

    pub(super) fn lock(&self, id: &VolumeId) -> Result<VolumeGuard, VolumeError> {
        self.locks.try_lock(id)
    }

    pub(super) fn load(&self, id: &VolumeId) -> Result<Option<Volume>, VolumeError> {
        match self.pools.find_volume(id.as_str()) {
            Some(file) => read_volume_file(id, file, "volume"),
            None => Ok(None),
        }
    }

    pub(super) fn save(&self, vol: &mut Volume) -> Result<(), VolumeError> {
        vol.generation = write_header(&vol.id, &vol.file.path, &vol.record, vol.generation)?;
        Ok(())
    }
}

/// The volume (or snapshot: `what`) in `file`, by its header, which must name `id`; None when
/// the file is gone.
pub(super) fn read_volume_file(
    id: &VolumeId,
    file: VolumeFile,
    what: &str,
) -> Result<Option<Volume>, VolumeError> {
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
            "the file of {what} {id} carries the header of {}",
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

/// Runs `f` with the volume's record and a `save` that writes a record as the next header
/// generation, for calls that change the record and persist it themselves (key release,
/// re-wrap); `vol.generation` follows every write, so a later save never reuses a slot.
pub(super) fn with_header_saves<T>(
    vol: &mut Volume,
    f: impl FnOnce(&mut VolumeRecord, &dyn Fn(&VolumeRecord) -> Result<(), VolumeError>) -> T,
) -> T {
    let Volume {
        id,
        file,
        record,
        generation,
    } = vol;
    let current = std::cell::Cell::new(*generation);
    let save = |r: &VolumeRecord| -> Result<(), VolumeError> {
        current.set(write_header(id, &file.path, r, current.get())?);
        Ok(())
    };
    let out = f(record, &save);
    *generation = current.get();
    out
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

pub(super) fn not_found(id: &VolumeId) -> VolumeError {
    VolumeError::NotFound(format!("volume {id} does not exist on this node"))
}

/// What is mounted at a path, as it concerns the volume on one loop device. Found with statx
/// alone: kubelet republishes every volume every minute or two, and that must not cost more
/// on a node with thousands of other mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MountedHere {
    Nothing,
    /// The volume's whole filesystem (a staging mount).
    Filesystem,
    /// A bind mount of a directory of the volume's filesystem (sealvol binds only `data/`).
    Data,
    /// Another filesystem.
    Other,
}

/// ext4's root directory inode: what a whole-filesystem mount shows at its mount point.
pub(super) const EXT4_ROOT_INO: u64 = 2;

/// What is mounted at `path`, against the loop device numbered `loop_dev`.
pub(super) fn mounted_here(path: &Path, loop_dev: u64) -> Result<MountedHere, VolumeError> {
    Ok(match sys::mount_root_at(path)? {
        None => MountedHere::Nothing,
        Some(m) if m.dev != loop_dev => MountedHere::Other,
        Some(m) if m.ino == EXT4_ROOT_INO => MountedHere::Filesystem,
        Some(_) => MountedHere::Data,
    })
}

/// The loop device of the volume whose file is `file` when its filesystem is mounted at
/// `staging`: from statx of the path and the device by number, whatever else is mounted.
pub(super) fn staged_at(file: &Path, staging: &Path) -> Result<Option<AttachedLoop>, VolumeError> {
    let Some(m) = sys::mount_root_at(staging)? else {
        return Ok(None);
    };
    if m.ino != EXT4_ROOT_INO {
        return Ok(None);
    }
    let Some(l) = sys::attached_with_dev(m.dev)? else {
        return Ok(None);
    };
    Ok((Some(l.backing) == sys::FileId::of(file)?).then_some(l))
}

/// Whether `m` is the whole filesystem of the volume on loop device `l` (its staging mount).
pub(super) fn is_fs_mount_of(m: &sys::MountEntry, l: &AttachedLoop) -> bool {
    m.source == l.device_path().to_string_lossy() && m.root == Path::new("/")
}

/// Whether `m` is a bind mount of the data directory of the volume on loop device `l`.
pub(super) fn is_data_mount_of(m: &sys::MountEntry, l: &AttachedLoop) -> bool {
    m.source == l.device_path().to_string_lossy() && m.root == Path::new("/").join(crypt::DATA_DIR)
}

/// The target-path publications of the volume on `l`.
pub(super) fn publications<'a>(
    table: &'a MountTable,
    l: &'a AttachedLoop,
) -> impl Iterator<Item = &'a sys::MountEntry> + 'a {
    table.entries().iter().filter(|m| is_data_mount_of(m, l))
}
