//! The external programs sealvol runs (e2fsprogs and util-linux), found once at start by
//! absolute path, with their exit statuses read precisely.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::SysError;

const SEARCH_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Absolute paths of the programs, checked to exist when the driver starts.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    mkfs_ext4: PathBuf,
    resize2fs: PathBuf,
    e2fsck: PathBuf,
    blkid: PathBuf,
    wipefs: PathBuf,
}

/// What blkid's low-level probe found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlkidProbe {
    /// blkid positively reported no signature (its exit status 2).
    Empty,
    /// The probe's KEY=VALUE pairs (TYPE, LABEL, UUID, PTTYPE, ...).
    Found(BTreeMap<String, String>),
}

fn locate(name: &'static str) -> Result<PathBuf, SysError> {
    SEARCH_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or(SysError::MissingProgram(name))
}

impl Tools {
    pub(crate) fn locate() -> Result<Tools, SysError> {
        Ok(Tools {
            mkfs_ext4: locate("mkfs.ext4")?,
            resize2fs: locate("resize2fs")?,
            e2fsck: locate("e2fsck")?,
            blkid: locate("blkid")?,
            wipefs: locate("wipefs")?,
        })
    }

    /// Creates an ext4 filesystem for one volume on a freshly created sparse file's loop
    /// device: with the `encrypt` feature for fscrypt, no reserved blocks, and no zeroing or
    /// discard of storage that is known to read as zeros.
    pub(crate) fn mkfs_volume(&self, device: &Path) -> Result<(), SysError> {
        run(Command::new(&self.mkfs_ext4)
            .args(["-q", "-F", "-O", "encrypt", "-m", "0", "-b", "4096"])
            .args(["-E", "nodiscard,assume_storage_prezeroed=1"])
            .arg(device))
        .map(|_| ())
    }

    /// Creates the ext4 filesystem of a disk pool, labelled so sealvol knows it later.
    pub(crate) fn mkfs_pool_disk(&self, device: &Path, label: &str) -> Result<(), SysError> {
        run(Command::new(&self.mkfs_ext4)
            .args(["-q", "-F", "-m", "0", "-L", label])
            .arg(device))
        .map(|_| ())
    }

    /// Grows the (mounted) ext4 filesystem on `device` to the size of the device.
    pub(crate) fn resize2fs(&self, device: &Path) -> Result<(), SysError> {
        run(Command::new(&self.resize2fs).arg(device)).map(|_| ())
    }

    /// Checks an unmounted ext4 filesystem and repairs what is safe to repair without asking
    /// (`e2fsck -f -p`); exit status 1 means "errors corrected" and is success.
    pub(crate) fn fsck(&self, device: &Path) -> Result<(), SysError> {
        let mut cmd = Command::new(&self.e2fsck);
        cmd.args(["-f", "-p"]).arg(device);
        let out = cmd
            .output()
            .map_err(|e| SysError::io("run", &self.e2fsck, e))?;
        match out.status.code() {
            Some(0) | Some(1) => Ok(()),
            _ => Err(command_error(&cmd, &out)),
        }
    }

    /// Erases every filesystem and partition-table signature on `device`.
    pub(crate) fn wipefs(&self, device: &Path) -> Result<(), SysError> {
        run(Command::new(&self.wipefs).arg("-a").arg(device)).map(|_| ())
    }

    /// Probes `device` for filesystem and partition signatures (`blkid -p`). Any outcome
    /// other than "found" or "positively nothing" is an error: a device is never treated as
    /// blank because a probe failed.
    pub(crate) fn probe(&self, device: &Path) -> Result<BlkidProbe, SysError> {
        let mut cmd = Command::new(&self.blkid);
        cmd.args(["-p", "-o", "export"]).arg(device);
        let out = cmd
            .output()
            .map_err(|e| SysError::io("run", &self.blkid, e))?;
        match out.status.code() {
            Some(0) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let pairs = text
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Ok(BlkidProbe::Found(pairs))
            }
            Some(2) => Ok(BlkidProbe::Empty),
            _ => Err(command_error(&cmd, &out)),
        }
    }
}

fn run(cmd: &mut Command) -> Result<std::process::Output, SysError> {
    let out = cmd
        .output()
        .map_err(|e| SysError::io("run", cmd.get_program(), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_error(cmd, &out))
    }
}

fn command_error(cmd: &Command, out: &std::process::Output) -> SysError {
    SysError::Command {
        program: cmd.get_program().to_string_lossy().into_owned(),
        args: cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}
