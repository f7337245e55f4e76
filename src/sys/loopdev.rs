//! Loop devices: attach a backing file atomically, find the device that backs a file, grow,
//! detach.
//!
//! Attaching uses `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE` (one ioctl that binds the file and
//! sets offset and flags) and retries on `EBUSY`, so two attachers racing for the same free
//! device cannot end up sharing it. Devices are attached with `LO_FLAGS_AUTOCLEAR`: the kernel
//! detaches the device when its last user goes away, so a process that dies between attach
//! and mount leaks nothing, and unmounting the filesystem frees the device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
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

/// An open loop device bound to a backing file. Holding it keeps an autoclear device bound.
pub(crate) struct LoopDevice {
    number: u32,
    file: File,
}

/// What sysfs says about one bound loop device.
#[derive(Debug, Clone)]
pub(crate) struct AttachedLoop {
    pub(crate) number: u32,
    /// The backing file's path; the kernel appends " (deleted)" once it is unlinked.
    pub(crate) backing_file: String,
}

impl AttachedLoop {
    pub(crate) fn device_path(&self) -> PathBuf {
        device_path(self.number)
    }

    pub(crate) fn backing_deleted(&self) -> bool {
        self.backing_file.ends_with(" (deleted)")
    }
}

pub(crate) fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

impl LoopDevice {
    /// Binds `backing` to a free loop device, starting `offset` bytes into the file, with a
    /// 4 KiB logical block size and direct I/O when the backing filesystem supports it.
    pub(crate) fn attach(backing: &Path, offset: u64) -> Result<LoopDevice, SysError> {
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
            let config = loop_config_for(&backing_file, offset, direct_io);
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

    /// Opens loop device `number` and checks, after opening, that it still backs
    /// `expected_backing`: an autoclear device can be freed and reused between the sysfs read
    /// and the open.
    pub(crate) fn open_existing(
        number: u32,
        expected_backing: &Path,
    ) -> Result<Option<LoopDevice>, SysError> {
        let path = device_path(number);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENOENT)) => {
                return Ok(None);
            }
            Err(e) => return Err(SysError::io("open", path, e)),
        };
        match read_attached(number)? {
            Some(att) if att.backing_file == expected_backing.to_string_lossy() => {
                Ok(Some(LoopDevice { number, file }))
            }
            _ => Ok(None),
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        device_path(self.number)
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

fn loop_config_for(backing: &File, offset: u64, direct_io: bool) -> LoopConfig {
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
            lo_file_name: [0; LO_NAME_SIZE],
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

fn read_attached(number: u32) -> Result<Option<AttachedLoop>, SysError> {
    let dir = PathBuf::from(format!("/sys/block/loop{number}/loop"));
    let backing = match std::fs::read_to_string(dir.join("backing_file")) {
        Ok(s) => s.trim_end_matches('\n').to_string(),
        // ENODEV/ENXIO: the device is being torn down right now, which is "not attached".
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO)) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(SysError::io("read", dir.join("backing_file"), e)),
    };
    Ok(Some(AttachedLoop {
        number,
        backing_file: backing,
    }))
}

/// Every bound loop device, read from sysfs.
pub(crate) fn attached_loops() -> Result<Vec<AttachedLoop>, SysError> {
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
        if let Some(att) = read_attached(number)? {
            out.push(att);
        }
    }
    Ok(out)
}

/// The loop device that currently backs `backing`, if any.
pub(crate) fn find_loop_for(backing: &Path) -> Result<Option<AttachedLoop>, SysError> {
    let wanted = backing.to_string_lossy();
    Ok(attached_loops()?
        .into_iter()
        .find(|l| l.backing_file == wanted))
}
