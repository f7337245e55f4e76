//! /proc/self/mountinfo, parsed: the kernel's word on what is mounted where, read afresh for
//! every decision instead of trusting memory.

use std::path::{Path, PathBuf};

use super::SysError;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    /// The directory of the source filesystem that is mounted (`/` for a whole filesystem,
    /// `/data` for a bind mount of its data dir).
    pub(crate) root: PathBuf,
    pub(crate) mount_point: PathBuf,
    pub(crate) read_only: bool,
    pub(crate) fstype: String,
    pub(crate) source: String,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    pub(crate) fn read() -> Result<MountTable, SysError> {
        let path = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(path).map_err(|e| SysError::io("read", path, e))?;
        Self::parse(&text)
    }

    pub(crate) fn parse(text: &str) -> Result<MountTable, SysError> {
        let entries = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| parse_line(l).ok_or(SysError::Mountinfo { line: i + 1 }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MountTable { entries })
    }

    pub(crate) fn entries(&self) -> &[MountEntry] {
        &self.entries
    }

    /// The topmost mount at `path`, if `path` is a mount point.
    pub(crate) fn at(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }

    /// Every mount of the block device `source` (for example "/dev/loop3").
    pub(crate) fn of_source<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'a MountEntry> {
        self.entries.iter().filter(move |e| e.source == source)
    }
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ');
    let _id = pre.next()?;
    let _parent = pre.next()?;
    let (major, minor) = pre.next()?.split_once(':')?;
    let root = unescape(pre.next()?);
    let mount_point = unescape(pre.next()?);
    let options = pre.next()?;
    let mut post = post.split(' ');
    let fstype = post.next()?.to_string();
    let source = unescape(post.next()?);
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        read_only: options.split(',').any(|o| o == "ro"),
        fstype,
        source,
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let code = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok());
            if let Some(v) = code {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 7:3 / /var/lib/kubelet/plugins/stage rw,nosuid,nodev shared:50 - ext4 /dev/loop3 rw
98 22 7:3 /data /var/lib/kubelet/pods/a\\040b/vol ro,nosuid,nodev shared:50 - ext4 /dev/loop3 rw
";

    #[test]
    fn parses_bind_mounts_and_escapes() {
        let t = MountTable::parse(SAMPLE).unwrap();
        assert_eq!(t.entries().len(), 3);
        let bind = t.at(Path::new("/var/lib/kubelet/pods/a b/vol")).unwrap();
        assert_eq!(bind.root, Path::new("/data"));
        assert!(bind.read_only);
        assert_eq!((bind.major, bind.minor), (7, 3));
        assert_eq!(t.of_source("/dev/loop3").count(), 2);
    }

    #[test]
    fn rejects_garbage() {
        assert!(MountTable::parse("nonsense line").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = MountTable::parse(&s);
        }
    }
}
