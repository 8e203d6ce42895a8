//! Reading the mount table and detaching mounts.

use std::path::{Path, PathBuf};

/// The source (`fsname`) secretfs mounts carry in the mount table; their type is `fuse`
/// (the subtype is not recorded when mounting with `mount(2)` directly).
pub const FSNAME: &str = "secretfs";

/// One line of the mount table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub path: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// Whether this is a secretfs FUSE mount.
    pub fn is_secretfs(&self) -> bool {
        self.source == FSNAME && (self.fstype == "fuse" || self.fstype.starts_with("fuse."))
    }
}

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

/// The entries of a mountinfo text.
fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                path: unescape(fields.get(4)?),
                fstype: fields.get(sep + 1)?.to_string(),
                source: fields
                    .get(sep + 2)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Every mount in this process's mount namespace.
pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The mount at exactly `path` (the topmost one), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mount_table().into_iter().rev().find(|m| m.path == path)
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

/// Pages of `file`'s contents in the page cache, by `cachestat(2)`. Use an fd opened before
/// the reads in question: opening a FUSE file drops its cache, so a later probe sees nothing.
pub fn cached_pages(file: &std::fs::File) -> std::io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    use std::os::fd::AsRawFd;
    let range = Range { off: 0, len: 0 }; // len 0: to the end of the file
    let mut stat = Stat::default();
    // SAFETY: a valid fd and pointers to structs laid out as the kernel expects.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    if rc == 0 {
        Ok(stat.nr_cache)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse secretfs ro\n\
                    37 35 98:0 / /proc rw - proc proc rw\n";
        let t = parse(text);
        assert_eq!(t[0].path, PathBuf::from("/mnt/a b"));
        assert!(t[0].is_secretfs());
        assert_eq!(t[1].fstype, "proc");
        assert!(!t[1].is_secretfs());
    }

    #[test]
    fn proc_is_listed_and_detaching_a_plain_dir_is_ok() {
        assert_eq!(
            mount_at(Path::new("/proc")).map(|m| m.fstype).as_deref(),
            Some("proc")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(mount_at(dir.path()).is_none());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            detach(dir.path()).expect("not a mount point is fine");
        }
    }
}
