//! fscrypt ioctls (linux/fscrypt.h): add and remove a filesystem master key, read its status,
//! set and read a directory's v2 policy. The raw key is copied into the ioctl buffer and
//! zeroized there right after the call.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use zeroize::Zeroize;

use super::{SysError, retry_eintr};

pub(crate) const KEY_IDENTIFIER_SIZE: usize = 16;
const KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
const MAX_KEY_SIZE: usize = 64;
const POLICY_V2: u8 = 2;
const MODE_AES_256_XTS: u8 = 1;
const MODE_AES_256_CTS: u8 = 4;
const POLICY_FLAGS_PAD_32: u8 = 0x03;
const REMOVAL_FILES_BUSY: u32 = 0x1;

#[repr(C)]
#[derive(Default)]
struct KeySpecifier {
    kind: u32,
    reserved: u32,
    identifier: [u8; 32],
}

#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpecifier,
    raw_size: u32,
    key_id: u32,
    reserved: [u32; 8],
    // The kernel's `raw[]` flexible array, sized for the largest key.
    raw: [u8; MAX_KEY_SIZE],
}

#[repr(C)]
#[derive(Default)]
struct RemoveKeyArg {
    key_spec: KeySpecifier,
    removal_status_flags: u32,
    reserved: [u32; 5],
}

#[repr(C)]
#[derive(Default)]
struct GetKeyStatusArg {
    key_spec: KeySpecifier,
    reserved: [u32; 6],
    status: u32,
    status_flags: u32,
    user_count: u32,
    out_reserved: [u32; 13],
}

#[repr(C)]
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct PolicyV2 {
    version: u8,
    contents_mode: u8,
    filenames_mode: u8,
    flags: u8,
    reserved: [u8; 4],
    master_key_identifier: [u8; KEY_IDENTIFIER_SIZE],
}

#[repr(C)]
#[derive(Default)]
struct GetPolicyExArg {
    policy_size: u64,
    policy: PolicyV2,
}

// The request numbers encode the sizes of the kernel's structs (without the flexible array).
nix::ioctl_readwrite_bad!(
    ioc_add_key,
    nix::request_code_readwrite!(b'f', 23, 80),
    AddKeyArg
);
nix::ioctl_readwrite_bad!(
    ioc_remove_key_all_users,
    nix::request_code_readwrite!(b'f', 25, 64),
    RemoveKeyArg
);
nix::ioctl_readwrite_bad!(
    ioc_get_key_status,
    nix::request_code_readwrite!(b'f', 26, 128),
    GetKeyStatusArg
);
// FS_IOC_SET_ENCRYPTION_POLICY is _IOR('f', 19, struct fscrypt_policy_v1), whatever the version.
nix::ioctl_write_ptr_bad!(
    ioc_set_policy,
    nix::request_code_read!(b'f', 19, 12),
    PolicyV2
);
nix::ioctl_readwrite_bad!(
    ioc_get_policy_ex,
    nix::request_code_readwrite!(b'f', 22, 9),
    GetPolicyExArg
);

fn open_dir(path: &Path) -> Result<File, SysError> {
    File::open(path).map_err(|e| SysError::io("open", path, e))
}

/// Adds a master key to the filesystem mounted at (or containing) `fs_path`; returns the
/// identifier the kernel derived from it.
pub(crate) fn add_key(fs_path: &Path, key: &[u8]) -> Result<[u8; KEY_IDENTIFIER_SIZE], SysError> {
    if key.len() > MAX_KEY_SIZE {
        return Err(SysError::errno(
            "FS_IOC_ADD_ENCRYPTION_KEY",
            fs_path,
            Errno::EINVAL,
        ));
    }
    let dir = open_dir(fs_path)?;
    let mut arg = AddKeyArg {
        key_spec: KeySpecifier {
            kind: KEY_SPEC_TYPE_IDENTIFIER,
            ..KeySpecifier::default()
        },
        raw_size: key.len() as u32,
        key_id: 0,
        reserved: [0; 8],
        raw: [0; MAX_KEY_SIZE],
    };
    arg.raw[..key.len()].copy_from_slice(key);
    // SAFETY: `arg` is a valid fscrypt_add_key_arg followed by `raw_size` key bytes, and lives
    // across the call; the kernel writes only the identifier back into it.
    let result = retry_eintr(|| unsafe { ioc_add_key(dir.as_raw_fd(), &mut arg) });
    arg.raw.zeroize();
    result.map_err(|e| SysError::errno("FS_IOC_ADD_ENCRYPTION_KEY", fs_path, e))?;
    let mut id = [0u8; KEY_IDENTIFIER_SIZE];
    id.copy_from_slice(&arg.key_spec.identifier[..KEY_IDENTIFIER_SIZE]);
    Ok(id)
}

/// What removing a key achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The key is gone; nothing can be opened any more.
    Removed,
    /// The key is gone from the keyring but files still in use keep theirs until closed.
    FilesBusy,
    /// There was no such key.
    Absent,
}

/// Removes the key with `identifier` from the filesystem, for all users.
pub(crate) fn remove_key(
    fs_path: &Path,
    identifier: &[u8; KEY_IDENTIFIER_SIZE],
) -> Result<Removal, SysError> {
    let dir = open_dir(fs_path)?;
    let mut arg = RemoveKeyArg {
        key_spec: spec(identifier),
        ..RemoveKeyArg::default()
    };
    // SAFETY: `arg` is a valid fscrypt_remove_key_arg that lives across the call.
    match retry_eintr(|| unsafe { ioc_remove_key_all_users(dir.as_raw_fd(), &mut arg) }) {
        Ok(_) if arg.removal_status_flags & REMOVAL_FILES_BUSY != 0 => Ok(Removal::FilesBusy),
        Ok(_) => Ok(Removal::Removed),
        Err(Errno::ENOKEY) => Ok(Removal::Absent),
        Err(e) => Err(SysError::errno(
            "FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS",
            fs_path,
            e,
        )),
    }
}

/// The kernel's status of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Absent,
    Present,
    IncompletelyRemoved,
}

pub(crate) fn key_status(
    fs_path: &Path,
    identifier: &[u8; KEY_IDENTIFIER_SIZE],
) -> Result<KeyStatus, SysError> {
    let dir = open_dir(fs_path)?;
    let mut arg = GetKeyStatusArg {
        key_spec: spec(identifier),
        ..GetKeyStatusArg::default()
    };
    // SAFETY: `arg` is a valid fscrypt_get_key_status_arg that lives across the call.
    retry_eintr(|| unsafe { ioc_get_key_status(dir.as_raw_fd(), &mut arg) })
        .map_err(|e| SysError::errno("FS_IOC_GET_ENCRYPTION_KEY_STATUS", fs_path, e))?;
    Ok(match arg.status {
        2 => KeyStatus::Present,
        3 => KeyStatus::IncompletelyRemoved,
        _ => KeyStatus::Absent,
    })
}

fn spec(identifier: &[u8; KEY_IDENTIFIER_SIZE]) -> KeySpecifier {
    let mut s = KeySpecifier {
        kind: KEY_SPEC_TYPE_IDENTIFIER,
        ..KeySpecifier::default()
    };
    s.identifier[..KEY_IDENTIFIER_SIZE].copy_from_slice(identifier);
    s
}

/// Sets the v2 policy sealvol uses (AES-256-XTS contents, AES-256-CTS names, 32-byte name
/// padding) on the empty directory `dir`.
pub(crate) fn set_policy(
    dir: &Path,
    identifier: &[u8; KEY_IDENTIFIER_SIZE],
) -> Result<(), SysError> {
    let f = open_dir(dir)?;
    let policy = PolicyV2 {
        version: POLICY_V2,
        contents_mode: MODE_AES_256_XTS,
        filenames_mode: MODE_AES_256_CTS,
        flags: POLICY_FLAGS_PAD_32,
        reserved: [0; 4],
        master_key_identifier: *identifier,
    };
    // SAFETY: `policy` is a valid fscrypt_policy_v2 that outlives the call; the kernel reads it.
    retry_eintr(|| unsafe { ioc_set_policy(f.as_raw_fd(), &policy) })
        .map(|_| ())
        .map_err(|e| SysError::errno("FS_IOC_SET_ENCRYPTION_POLICY", dir, e))
}

/// The master key identifier of `dir`'s policy, or None when it has none.
pub(crate) fn policy_identifier(dir: &Path) -> Result<Option<[u8; KEY_IDENTIFIER_SIZE]>, SysError> {
    let f = open_dir(dir)?;
    let mut arg = GetPolicyExArg {
        policy_size: std::mem::size_of::<PolicyV2>() as u64,
        ..GetPolicyExArg::default()
    };
    // SAFETY: `arg` is a valid fscrypt_get_policy_ex_arg with room for a v2 policy.
    match retry_eintr(|| unsafe { ioc_get_policy_ex(f.as_raw_fd(), &mut arg) }) {
        Ok(_) if arg.policy.version == POLICY_V2 => Ok(Some(arg.policy.master_key_identifier)),
        Ok(_) => Err(SysError::errno(
            "FS_IOC_GET_ENCRYPTION_POLICY_EX",
            dir,
            Errno::EPROTO,
        )),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(SysError::errno("FS_IOC_GET_ENCRYPTION_POLICY_EX", dir, e)),
    }
}

/// Marks this process non-dumpable: no core dump, no ptrace by unprivileged users, so key
/// material in memory stays out of files.
pub(crate) fn forbid_core_dumps() -> Result<(), SysError> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| SysError::errno("PR_SET_DUMPABLE", "/proc/self", e))
}
