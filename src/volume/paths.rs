//! Target and staging paths from requests: absolute, canonical, and inside the kubelet
//! directory, also after resolving symlinks in the part that exists. A path that fails is
//! refused before anything is created or mounted.

use std::path::{Path, PathBuf};

use super::VolumeError;

const MAX_PATH_BYTES: usize = 4096;

/// Checks that `raw` names a path strictly below `root` (itself canonical).
pub(crate) fn check_under(
    raw: &str,
    root: &Path,
    field: &'static str,
) -> Result<PathBuf, VolumeError> {
    let invalid = |message: String| VolumeError::InvalidArgument { field, message };
    if raw.is_empty() {
        return Err(invalid("is required".into()));
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(invalid(format!("is longer than {MAX_PATH_BYTES} bytes")));
    }
    if raw.contains('\0') {
        return Err(invalid("contains a NUL byte".into()));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(invalid(format!("{raw:?} is not an absolute path")));
    }
    // Checked on the raw text: Path::components() silently drops inner "." and "//".
    if raw[1..]
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(invalid(format!(
            "{raw:?} is not canonical (it has '.', '..' or an empty segment)"
        )));
    }
    let normal: PathBuf = path.components().collect();
    if !normal.starts_with(root) || normal == root {
        return Err(invalid(format!(
            "{raw:?} is outside the kubelet directory {}",
            root.display()
        )));
    }
    // Resolve symlinks in the longest existing ancestor: a link planted inside the kubelet
    // directory must not lead the mount elsewhere.
    let mut existing = normal.as_path();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                if !real.starts_with(root) {
                    return Err(invalid(format!(
                        "{raw:?} resolves through a symlink to {}, outside {}",
                        real.display(),
                        root.display()
                    )));
                }
                break;
            }
            Err(_) => match existing.parent() {
                Some(parent) => existing = parent,
                None => break,
            },
        }
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let r = root.to_str().unwrap();
        assert!(check_under(&format!("{r}/pods/x/vol"), &root, "target_path").is_ok());
        for bad in [
            String::new(),
            "relative/path".into(),
            format!("{r}/../etc"),
            format!("{r}/pods/./x"),
            format!("{r}//pods/x"),
            format!("{r}/pods/x/"),
            "/etc/passwd".into(),
            r.to_string(),
            format!("{r}/a\0b"),
            format!("{r}/{}", "x".repeat(5000)),
        ] {
            assert!(
                check_under(&bad, &root, "target_path").is_err(),
                "{bad:?} accepted"
            );
        }
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let e = check_under(&format!("{r}/link/vol"), &root, "target_path").unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }
}
