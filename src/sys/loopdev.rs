//! Loop devices: attach a backing file atomically, find the device that backs a file, grow,
//! detach.
//!
//! A loop device is known by the identity of its backing file (device number and inode, from
//! `LOOP_GET_STATUS64`), never by the path the kernel reports: that path is resolved in the
//! mount namespace of whoever attached the device, so once the container that attached it is
//! gone the kernel reports a path relative to a detached mount (`/sv-….img` instead of
//! `/var/lib/sealvol-pool/sv-….img`). The reported path is kept for messages only.
//!
//! Attaching uses `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE` (one ioctl that binds the file and
//! sets offset and flags) and retries on `EBUSY`, so two attachers racing for the same free
//! device cannot end up sharing it. Devices are attached with `LO_FLAGS_AUTOCLEAR`: the kernel
//! detaches the device when its last user goes away, so a process that dies between attach
//! and mount leaks nothing, and unmounting the filesystem frees the device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::{SysError, retry_eintr};

const LOOP_CONTROL: &str = "/dev/loop-control";
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const ATTACH_ATTEMPTS: u32 = 64;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

/// An open loop device bound to a backing file. Holding it keeps an autoclear device bound.
pub(crate) struct LoopDevice {
    number: u32,
    file: File,
}

/// The identity of a file: its filesystem's device number (as `stat(2)` reports `st_dev`) and
/// its inode number. Unlike a path it means the same in every mount namespace, and an inode
/// held open by a loop device is not reused while it is held, even after it was unlinked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl FileId {
    /// The identity of `path` (following symlinks); None when it does not exist.
    pub(crate) fn of(path: &Path) -> Result<Option<FileId>, SysError> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(FileId::from_metadata(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SysError::io("stat", path, e)),
        }
    }

    pub(crate) fn from_metadata(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// One bound loop device and what it is bound to.
#[derive(Debug, Clone)]
pub(crate) struct AttachedLoop {
    pub(crate) number: u32,
    /// The backing file's identity (`LOOP_GET_STATUS64`): what matching is done by.
    pub(crate) backing: FileId,
    /// Where in the backing file the device starts.
    pub(crate) offset: u64,
    /// The backing file's path as the kernel reports it (sysfs `backing_file`), for messages
    /// only: it is resolved in the attacher's mount namespace, and the kernel appends
    /// " (deleted)" once the file is unlinked.
    pub(crate) backing_file: String,
    /// The label its attacher gave it (`lo_file_name`; see `LoopDevice::attach`); empty when
    /// none, or when `losetup` put a path there.
    pub(crate) label: String,
    /// The loop device's own block device number: the `st_dev` of a filesystem on it.
    pub(crate) dev: u64,
}

impl AttachedLoop {
    pub(crate) fn device_path(&self) -> PathBuf {
        device_path(self.number)
    }

    /// Whether the backing file has been unlinked (it lives on while the device holds it).
    pub(crate) fn backing_deleted(&self) -> bool {
        self.backing_file.ends_with(" (deleted)")
    }

    /// The last component of the reported path (without " (deleted)"). Renames show here, and
    /// unlike the directories above it the name does not depend on the mount namespace.
    pub(crate) fn backing_name(&self) -> &str {
        reported_name(&self.backing_file)
    }
}

fn reported_name(reported: &str) -> &str {
    let path = reported.strip_suffix(" (deleted)").unwrap_or(reported);
    path.rsplit('/').next().unwrap_or(path)
}

pub(crate) fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

impl LoopDevice {
    /// Binds `backing` to a free loop device, starting `offset` bytes into the file, with a
    /// 4 KiB logical block size and direct I/O when the backing filesystem supports it.
    /// `label` (at most 63 bytes) is stored as the device's `lo_file_name`, which the kernel
    /// keeps verbatim and returns in `LOOP_GET_STATUS64`: it says who attached the device even
    /// after the backing file is unlinked and the attacher's mount namespace is gone.
    pub(crate) fn attach(backing: &Path, offset: u64, label: &str) -> Result<LoopDevice, SysError> {
        if label.len() >= LO_NAME_SIZE {
            return Err(SysError::errno(
                "LOOP_CONFIGURE",
                backing,
                Errno::ENAMETOOLONG,
            ));
        }
        let backing_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .map_err(|e| SysError::io("open backing file", backing, e))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(LOOP_CONTROL)
            .map_err(|e| SysError::io("open", LOOP_CONTROL, e))?;
        let mut direct_io = true;
        let mut attempt = 0;
        while attempt < ATTACH_ATTEMPTS {
            attempt += 1;
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; the fd is an open loop-control.
            let number = retry_eintr(|| unsafe { loop_ctl_get_free(control.as_raw_fd()) })
                .map_err(|e| SysError::errno("LOOP_CTL_GET_FREE", LOOP_CONTROL, e))?;
            let number = u32::try_from(number)
                .map_err(|_| SysError::errno("LOOP_CTL_GET_FREE", LOOP_CONTROL, Errno::ERANGE))?;
            let path = device_path(number);
            ensure_device_node(number)?;
            let device = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                // Another attacher took it and it went away again: ask for the next one.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => continue,
                Err(e) => return Err(SysError::io("open", path, e)),
            };
            let config = loop_config_for(&backing_file, offset, direct_io, label);
            // SAFETY: `config` is a fully initialised `struct loop_config` that outlives the
            // call; the kernel only reads it.
            match retry_eintr(|| unsafe { loop_configure(device.as_raw_fd(), &config) }) {
                Ok(_) => {
                    return Ok(LoopDevice {
                        number,
                        file: device,
                    });
                }
                Err(Errno::EBUSY) => continue,
                Err(Errno::EINVAL) if direct_io => {
                    // The backing filesystem cannot do O_DIRECT at this alignment.
                    direct_io = false;
                    attempt -= 1;
                    continue;
                }
                Err(e) => return Err(SysError::errno("LOOP_CONFIGURE", path, e)),
            }
        }
        Err(SysError::NoFreeLoop {
            attempts: ATTACH_ATTEMPTS,
        })
    }

    /// Opens loop device `number` if, once open, it is bound to the file at `expected_backing`
    /// (compared by identity, not by the path the kernel reports); None when it is not, or when
    /// that file does not exist. Checking after opening matters: an autoclear device can be
    /// freed and reused between a lookup and the open.
    pub(crate) fn open_existing(
        number: u32,
        expected_backing: &Path,
    ) -> Result<Option<LoopDevice>, SysError> {
        match FileId::of(expected_backing)? {
            Some(id) => Self::open_bound_to(number, id),
            None => Ok(None),
        }
    }

    /// Opens loop device `number` if, once open, it is bound to the file with identity
    /// `backing` (which may be unlinked already); None otherwise.
    pub(crate) fn open_bound_to(
        number: u32,
        backing: FileId,
    ) -> Result<Option<LoopDevice>, SysError> {
        let Some(file) = open_device(number, true)? else {
            return Ok(None);
        };
        match status(&file, number)? {
            Some(s) if s.backing == backing => Ok(Some(LoopDevice { number, file })),
            _ => Ok(None),
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        device_path(self.number)
    }

    pub(crate) fn number(&self) -> u32 {
        self.number
    }

    /// Re-reads the backing file's size after it has grown (`LOOP_SET_CAPACITY`).
    pub(crate) fn refresh_capacity(&self) -> Result<(), SysError> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is an open loop device.
        retry_eintr(|| unsafe { loop_set_capacity(self.file.as_raw_fd()) })
            .map(|_| ())
            .map_err(|e| SysError::errno("LOOP_SET_CAPACITY", self.path(), e))
    }

    /// Unbinds the backing file. `ENXIO` (already unbound) counts as done.
    pub(crate) fn detach(self) -> Result<(), SysError> {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is an open loop device.
        match retry_eintr(|| unsafe { loop_clr_fd(self.file.as_raw_fd()) }) {
            Ok(_) | Err(Errno::ENXIO) => Ok(()),
            Err(e) => Err(SysError::errno("LOOP_CLR_FD", self.path(), e)),
        }
    }
}

fn loop_config_for(backing: &File, offset: u64, direct_io: bool, label: &str) -> LoopConfig {
    let mut file_name = [0u8; LO_NAME_SIZE];
    file_name[..label.len()].copy_from_slice(label.as_bytes());
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 4096,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: offset,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    }
}

/// Creates /dev/loopN when no udev did (containers, minimal hosts).
fn ensure_device_node(number: u32) -> Result<(), SysError> {
    let path = device_path(number);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_block_device() => return Ok(()),
        Ok(_) => {
            return Err(SysError::io(
                "check device node",
                path,
                std::io::Error::other("exists and is not a block device"),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SysError::io("stat", path, e)),
    }
    let sys_dev = format!("/sys/block/loop{number}/dev");
    let dev = std::fs::read_to_string(&sys_dev).map_err(|e| SysError::io("read", &sys_dev, e))?;
    let (major, minor) = dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| SysError::io("parse", &sys_dev, std::io::Error::other(dev.clone())))?;
    match nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        nix::sys::stat::makedev(major, minor),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(SysError::errno("mknod", path, e)),
    }
}

/// Opens /dev/loopN; None when the device does not exist or is going away.
fn open_device(number: u32, write: bool) -> Result<Option<File>, SysError> {
    let path = device_path(number);
    match OpenOptions::new().read(true).write(write).open(&path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENOENT)) => Ok(None),
        Err(e) => Err(SysError::io("open", path, e)),
    }
}

/// What `LOOP_GET_STATUS64` says of a bound device.
struct Status {
    backing: FileId,
    offset: u64,
    label: String,
}

/// The backing file's identity, offset and label of an open loop device; None when unbound.
fn status(device: &File, number: u32) -> Result<Option<Status>, SysError> {
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into the buffer, which is
    // valid for writes of that size for the duration of the call; the fd is an open loop
    // device.
    match retry_eintr(|| unsafe { loop_get_status64(device.as_raw_fd(), info.as_mut_ptr()) }) {
        Ok(_) => {}
        // Not bound (ENXIO), or being torn down.
        Err(Errno::ENXIO) | Err(Errno::ENODEV) => return Ok(None),
        Err(e) => return Err(SysError::errno("LOOP_GET_STATUS64", device_path(number), e)),
    }
    // SAFETY: zero-initialised and then filled by the kernel; every field is a plain integer
    // or byte array, for which any bit pattern is valid.
    let info = unsafe { info.assume_init() };
    let name_len = info
        .lo_file_name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(LO_NAME_SIZE);
    Ok(Some(Status {
        backing: FileId {
            dev: dev_from_kernel(info.lo_device),
            ino: info.lo_inode,
        },
        offset: info.lo_offset,
        label: String::from_utf8_lossy(&info.lo_file_name[..name_len]).into_owned(),
    }))
}

/// `lo_device` is the kernel's `huge_encode_dev` (= `new_encode_dev`) form; `st_dev` is
/// glibc's `makedev` form. They differ for large minor numbers (tmpfs, overlayfs).
fn dev_from_kernel(encoded: u64) -> u64 {
    let major = (encoded & 0xfff00) >> 8;
    let minor = (encoded & 0xff) | ((encoded >> 12) & 0xfff00);
    libc::makedev(major as libc::c_uint, minor as libc::c_uint)
}

/// What sysfs reports as the backing file of loop device `number`; None when unbound.
fn reported_backing(number: u32) -> Result<Option<String>, SysError> {
    let path = PathBuf::from(format!("/sys/block/loop{number}/loop/backing_file"));
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
        // ENODEV/ENXIO: the device is being torn down right now, which is "not attached".
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO)) =>
        {
            Ok(None)
        }
        Err(e) => Err(SysError::io("read", path, e)),
    }
}

/// The loop devices sysfs says are bound, with their reported backing paths.
fn bound_numbers() -> Result<Vec<(u32, String)>, SysError> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir("/sys/block").map_err(|e| SysError::io("read_dir", "/sys/block", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(reported) = reported_backing(number)? {
            out.push((number, reported));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// Reads the identity of loop device `number`, which sysfs reported bound to `reported`.
fn read_attached(number: u32, reported: String) -> Result<Option<AttachedLoop>, SysError> {
    let Some(device) = open_device(number, false)? else {
        return Ok(None);
    };
    // fstat of the fd already open: no sysfs read for the device number.
    let dev = device
        .metadata()
        .map_err(|e| SysError::io("fstat", device_path(number), e))?
        .rdev();
    Ok(status(&device, number)?.map(|s| AttachedLoop {
        number,
        backing: s.backing,
        offset: s.offset,
        backing_file: reported,
        label: s.label,
        dev,
    }))
}

/// Every bound loop device, with its backing file's identity. Each device is opened briefly
/// for `LOOP_GET_STATUS64`; one that is unbound meanwhile is left out.
pub(crate) fn attached_loops() -> Result<Vec<AttachedLoop>, SysError> {
    let mut out = Vec::new();
    for (number, reported) in bound_numbers()? {
        if let Some(att) = read_attached(number, reported)? {
            out.push(att);
        }
    }
    Ok(out)
}

/// The loop device whose block device number is `dev` (the `st_dev` of a filesystem mounted
/// from it), if it is a bound loop device: found through `/sys/dev/block/MAJOR:MINOR`, at a
/// cost independent of how many loop devices the node has.
pub(crate) fn attached_with_dev(dev: u64) -> Result<Option<AttachedLoop>, SysError> {
    let link = format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SysError::io("readlink", &link, e)),
    };
    let Some(number) = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("loop"))
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return Ok(None);
    };
    attached_number(number)
}

/// Loop device `number` and what it is bound to; None when it is not bound.
pub(crate) fn attached_number(number: u32) -> Result<Option<AttachedLoop>, SysError> {
    match reported_backing(number)? {
        Some(reported) => read_attached(number, reported),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_device_numbers_decode_like_stat() {
        // new_encode_dev(major 8, minor 1) and (major 0, minor 0x1a5): the minor's high bits
        // move above the major.
        assert_eq!(dev_from_kernel(0x801), libc::makedev(8, 1));
        let encoded = (0x1a5 & 0xff) | ((0x1a5 & !0xff) << 12);
        assert_eq!(dev_from_kernel(encoded), libc::makedev(0, 0x1a5));
        let encoded = 0x12 | (259 << 8) | ((0x3400 & !0xff) << 12);
        assert_eq!(dev_from_kernel(encoded), libc::makedev(259, 0x3412));
    }

    #[test]
    fn reported_names_ignore_directories_and_deletion() {
        assert_eq!(reported_name("/var/lib/pool/sv-a.img"), "sv-a.img");
        assert_eq!(reported_name("/sv-a.img (deleted)"), "sv-a.img");
        assert_eq!(reported_name("sv-a.img"), "sv-a.img");
    }

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn sparse_file(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).expect("backing file");
        f.set_len(16 << 20).expect("size");
        path
    }

    /// A device attached through another path (a bind mount in a private mount namespace
    /// that is gone by now) reports the file's identity, and open_existing accepts it.
    #[test]
    fn found_by_identity_across_mount_namespaces() {
        assert!(root(), "this test needs root (loop devices, mounts)");
        let tmp = tempfile::tempdir().expect("tempdir");
        let pool = tmp.path().join("pool");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&pool).expect("mkdir");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        let file = sparse_file(&pool, "sv-identity.img");
        let script = format!(
            "mount --bind {} {} && losetup --find --show --offset 1048576 {}/sv-identity.img",
            pool.display(),
            elsewhere.display(),
            elsewhere.display()
        );
        let out = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let number: u32 = device
            .strip_prefix("/dev/loop")
            .and_then(|n| n.parse().ok())
            .expect("a loop device");
        let detach = Detach(number);
        let found = attached_number(number).expect("lookup").expect("bound");
        assert_eq!(found.number, number);
        assert_eq!(found.offset, 1 << 20);
        assert_eq!(Some(found.backing), FileId::of(&file).expect("stat"));
        assert!(
            !found
                .backing_file
                .starts_with(&pool.to_string_lossy().into_owned()),
            "the kernel reports the other namespace's path: {}",
            found.backing_file
        );
        assert!(
            attached_loops()
                .expect("list")
                .iter()
                .any(|l| l.number == number)
        );
        assert!(
            LoopDevice::open_existing(number, &file)
                .expect("open")
                .is_some()
        );
        let other = sparse_file(&pool, "sv-other.img");
        assert!(
            LoopDevice::open_existing(number, &other)
                .expect("open")
                .is_none()
        );
        drop(detach);
    }

    /// Detaches a device on drop, also when the test fails.
    struct Detach(u32);

    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &device_path(self.0).to_string_lossy()])
                .status();
        }
    }

    /// The device this process attaches reports the file's identity, the offset and the
    /// label, which outlives the file's name.
    #[test]
    fn attach_reports_identity_offset_and_label() {
        assert!(root(), "this test needs root (loop devices, mounts)");
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = sparse_file(tmp.path(), "sv-attach.img");
        let too_long = "x".repeat(LO_NAME_SIZE);
        assert!(LoopDevice::attach(&file, 1 << 20, &too_long).is_err());
        let label = format!("sealvol:{}", "0123456789abcdef");
        let device = LoopDevice::attach(&file, 1 << 20, &label).expect("attach");
        let found = attached_number(device.number)
            .expect("lookup")
            .expect("bound");
        assert_eq!(found.number, device.number);
        assert_eq!(found.offset, 1 << 20);
        assert_eq!(found.label, label);
        assert_eq!(
            found.backing,
            FileId::of(&file).expect("stat").expect("exists")
        );
        std::fs::remove_file(&file).expect("unlink");
        let unlinked = attached_loops()
            .expect("list")
            .into_iter()
            .find(|l| l.number == device.number)
            .expect("still bound");
        assert!(unlinked.backing_deleted());
        assert_eq!(unlinked.label, label);
        assert_eq!(unlinked.backing, found.backing);
        device.detach().expect("detach");
        assert!(
            attached_loops()
                .expect("list")
                .iter()
                .all(|l| l.backing != found.backing)
        );
    }
}
