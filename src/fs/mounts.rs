//! Reading the mount table and detaching mounts.

use std::path::{Path, PathBuf};

/// The filesystem type secretfs mounts carry in the mount table.
pub const FSTYPE: &str = "fuse.secretfs";

/// Decodes the octal escapes (`\040` for a space) the kernel uses in mountinfo paths.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Mount points and filesystem types from a mountinfo text.
fn parse(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some((unescape(fields.get(4)?), fields.get(sep + 1)?.to_string()))
        })
        .collect()
}

/// Every mount point in this process's mount namespace, with its filesystem type.
pub fn mount_table() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The filesystem type mounted at exactly `path` (the topmost one), if any.
pub fn fstype_at(path: &Path) -> Option<String> {
    mount_table()
        .into_iter()
        .rev()
        .find(|(p, _)| p == path)
        .map(|(_, t)| t)
}

/// Lazily unmounts `path` (MNT_DETACH): it leaves the namespace at once even if busy.
/// Not being a mount point is not an error.
pub fn detach(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.secretfs secretfs ro\n\
                    37 35 98:0 / /proc rw - proc proc rw\n";
        let t = parse(text);
        assert_eq!(t[0], (PathBuf::from("/mnt/a b"), FSTYPE.to_string()));
        assert_eq!(t[1].1, "proc");
    }

    #[test]
    fn proc_is_listed_and_detaching_a_plain_dir_is_ok() {
        assert_eq!(fstype_at(Path::new("/proc")).as_deref(), Some("proc"));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(fstype_at(dir.path()).is_none());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            detach(dir.path()).expect("not a mount point is fine");
        }
    }
}
