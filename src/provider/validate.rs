//! Checks on what a provider returns, before any byte is copied into secret memory.

use std::collections::{BTreeSet, HashSet};

/// Longest accepted relative path and path segment (Linux NAME_MAX).
const MAX_PATH: usize = 4096;
const MAX_SEGMENT: usize = 255;

/// Mode given to files whose provider mode is 0.
pub const DEFAULT_MODE: u32 = 0o644;

/// A provider plugin name: `^[a-zA-Z0-9_-]{1,30}$` (it becomes a socket file name).
pub fn provider_name_ok(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks one file path from a provider response: relative, no empty, `.` or `..` segment, no
/// segment starting with `..` (kubelet's atomic-writer layout reserves those), no NUL, within
/// the length limits.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("path is empty".into());
    }
    if path.len() > MAX_PATH {
        return Err(format!("path is longer than {MAX_PATH} bytes"));
    }
    if path.contains('\0') {
        return Err(format!(
            "path {:?} contains a NUL byte",
            path.replace('\0', "\\0")
        ));
    }
    if path.starts_with('/') {
        return Err(format!("path {path:?} is absolute"));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(format!("path {path:?} has an empty segment"));
        }
        if segment == "." || segment.starts_with("..") {
            return Err(format!("path {path:?} has a {segment:?} segment"));
        }
        if segment.len() > MAX_SEGMENT {
            return Err(format!(
                "path {path:?} has a segment over {MAX_SEGMENT} bytes"
            ));
        }
    }
    Ok(())
}

/// Checks a whole set of paths: each valid, no duplicates, and no path that is both a file
/// and a directory of another (`a` and `a/b`).
pub fn check_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut files = HashSet::new();
    let mut dirs = BTreeSet::new();
    for path in paths {
        check_path(path)?;
        if !files.insert(path) {
            return Err(format!("path {path:?} appears twice"));
        }
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            dirs.insert(&path[..end + i]);
            end += i + 1;
        }
    }
    if let Some(both) = files.iter().find(|f| dirs.contains(*f)) {
        return Err(format!("path {both:?} is both a file and a directory"));
    }
    Ok(())
}

/// Keeps only the permission bits of a provider's mode (no setuid, setgid or sticky); 0 (and
/// anything without permission bits) becomes `default` (the volume's default mode).
pub fn file_mode(mode: i32, default: u32) -> u32 {
    let perm = (mode as u32) & 0o777;
    if perm == 0 { default & 0o777 } else { perm }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_nested_paths() {
        for p in [
            "a",
            "db/password",
            "a/b/c.txt",
            ".hidden",
            "x..y",
            "a/.b",
            "ü/ñ",
        ] {
            check_path(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn rejects_escapes_and_malformed_paths() {
        let long_segment = "x".repeat(256);
        let long_path = "a/".repeat(2049);
        for p in [
            "",
            "/etc/passwd",
            "../escape",
            "a/../../b",
            "a/..",
            "..data",
            "a/..2026_01_01",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            "nul\0byte",
            &long_segment,
            &long_path,
        ] {
            assert!(check_path(p).is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn rejects_duplicates_and_file_dir_conflicts() {
        assert!(check_paths(["a", "b/c", "b/d"]).is_ok());
        assert!(check_paths(["a", "a"]).unwrap_err().contains("twice"));
        assert!(check_paths(["a", "a/b"]).unwrap_err().contains("both"));
        assert!(check_paths(["x/y/z", "x/y"]).unwrap_err().contains("both"));
        assert!(check_paths(["ok", "../bad"]).is_err());
    }

    #[test]
    fn modes_keep_permission_bits_only() {
        assert_eq!(file_mode(0, DEFAULT_MODE), 0o644);
        assert_eq!(file_mode(0, 0o400), 0o400);
        assert_eq!(file_mode(0o440, DEFAULT_MODE), 0o440);
        assert_eq!(file_mode(0o4755, DEFAULT_MODE), 0o755);
        assert_eq!(file_mode(0o7000, DEFAULT_MODE), 0o644);
        assert_eq!(file_mode(-1, DEFAULT_MODE), 0o777);
        assert_eq!(file_mode(420, DEFAULT_MODE), 0o644);
    }

    #[test]
    fn provider_names() {
        assert!(provider_name_ok("vault"));
        assert!(provider_name_ok("aws-provider_2"));
        assert!(!provider_name_ok(""));
        assert!(!provider_name_ok("../x"));
        assert!(!provider_name_ok("a.b"));
        assert!(!provider_name_ok(&"a".repeat(31)));
    }
}
