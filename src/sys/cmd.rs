//! The external programs sealvol runs (e2fsprogs and util-linux), found once at start by
//! absolute path, with their exit statuses read precisely.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::SysError;

/// Searched after the directories in `$PATH` (absolute entries only; the image sets PATH).
const SEARCH_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Absolute paths of the programs, checked when the driver starts to exist and to run.
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

/// How a program shows at start that it runs: the arguments, and what its output must say.
struct Check {
    args: &'static [&'static str],
    /// Whether the program must exit 0; else 0 or 1 (resize2fs has no version flag: it prints
    /// its version and usage and exits 1 when called without arguments).
    success: bool,
}

/// A version flag, exit 0.
const VERSION: Check = Check {
    args: &["-V"],
    success: true,
};
/// No arguments: version and usage, exit 1 (resize2fs).
const USAGE: Check = Check {
    args: &[],
    success: false,
};

/// The directories searched, in order: `$PATH`'s absolute entries, then `SEARCH_DIRS`.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .filter(|d| d.is_absolute())
                .collect()
        })
        .unwrap_or_default();
    for d in SEARCH_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    dirs
}

/// The first executable file `name` in `dirs`, run once as `check` says to make sure it
/// works (it exits by itself with 0, or 1 where `check` allows it); errors name the program
/// and what is wrong.
fn locate_in(name: &'static str, check: &Check, dirs: &[PathBuf]) -> Result<PathBuf, SysError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dirs
        .iter()
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| SysError::MissingProgram {
            name,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })?;
    let failed = |reason: String| SysError::BrokenProgram {
        path: path.clone(),
        check: std::iter::once(name)
            .chain(check.args.iter().copied())
            .collect::<Vec<_>>()
            .join(" "),
        reason,
    };
    let mut attempts = 0;
    let out = loop {
        attempts += 1;
        match Command::new(&path)
            .args(check.args)
            .stdin(std::process::Stdio::null())
            .output()
        {
            // A file just written may still be open for writing in a child another thread
            // is forking: wait for its exec.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other.map_err(|e| failed(e.to_string()))?,
        }
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first_line = said.lines().next().unwrap_or_default().trim().to_string();
    let ok = match out.status.code() {
        Some(0) => true,
        Some(1) => !check.success,
        // 126/127: the loader or the shell could not run it; None: killed by a signal.
        _ => false,
    };
    if !ok {
        return Err(failed(format!("{}: {first_line}", out.status)));
    }
    Ok(path)
}

impl Tools {
    /// Finds every program the driver runs and checks that each one runs. Errors name the
    /// program: `MissingProgram` (not found, with the directories searched) or
    /// `BrokenProgram` (found but it fails to run, e.g. a missing shared library).
    pub(crate) fn locate() -> Result<Tools, SysError> {
        let dirs = search_dirs();
        Ok(Tools {
            mkfs_ext4: locate_in("mkfs.ext4", &VERSION, &dirs)?,
            resize2fs: locate_in("resize2fs", &USAGE, &dirs)?,
            e2fsck: locate_in("e2fsck", &VERSION, &dirs)?,
            blkid: locate_in("blkid", &VERSION, &dirs)?,
            wipefs: locate_in("wipefs", &VERSION, &dirs)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    const V: Check = VERSION;

    #[test]
    fn finds_a_working_program_in_the_first_directory_that_has_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        script(
            b.path(),
            "mkfs.ext4",
            "echo 'mke2fs 1.47.0 (5-Feb-2023)' >&2",
            0o755,
        );
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(
            locate_in("mkfs.ext4", &V, &dirs).unwrap(),
            b.path().join("mkfs.ext4")
        );
    }

    #[test]
    fn a_missing_program_is_named_with_the_directories_searched() {
        let a = tempfile::tempdir().unwrap();
        // Not executable: does not count.
        script(a.path(), "wipefs", "echo wipefs", 0o644);
        let err = locate_in("wipefs", &V, &[a.path().to_path_buf()]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(
            err,
            SysError::MissingProgram { name: "wipefs", .. }
        ));
        assert!(
            text.contains("wipefs") && text.contains(&a.path().display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn a_program_that_does_not_run_is_named_with_the_reason() {
        let a = tempfile::tempdir().unwrap();
        script(
            a.path(),
            "blkid",
            "echo 'blkid: error while loading shared libraries: libblkid.so.1' >&2; exit 127",
            0o755,
        );
        let text = locate_in("blkid", &V, &[a.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("blkid -V") && text.contains("libblkid.so.1"),
            "{text}"
        );
        // Killed by a signal, or a different program under the name: refused too.
        script(a.path(), "e2fsck", "kill -9 $$", 0o755);
        assert!(locate_in("e2fsck", &V, &[a.path().to_path_buf()]).is_err());
        script(
            a.path(),
            "resize2fs",
            "echo 'resize2fs: not found'; exit 127",
            0o755,
        );
        let text = locate_in("resize2fs", &USAGE, &[a.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("resize2fs") && text.contains("not found"),
            "{text}"
        );
    }

    /// This machine's (and the image's) real programs pass their checks.
    #[test]
    fn the_installed_programs_pass() {
        Tools::locate().unwrap();
    }
}
