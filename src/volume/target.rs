//! The target directory: create it, check it, remove it.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::Error;
use crate::fs::{detach, mount_at};

fn target_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Target {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Makes `target` an empty directory ready to mount on; returns whether this call created it.
/// A secretfs mount left there by an earlier driver process (not in the registry) is detached.
pub fn prepare(target: &Path) -> Result<bool, Error> {
    // kubelet creates only the parent: a target that does not exist is no mount point, and
    // the mount table (hundreds of entries on a busy node) need not be read.
    let missing =
        std::fs::symlink_metadata(target).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
    match if missing { None } else { mount_at(target) } {
        Some(m) if m.is_secretfs() => {
            tracing::warn!(target = %target.display(), "detaching a stale secretfs mount left by an earlier driver process");
            detach(target)
                .map_err(|e| target_err(target, format!("detaching stale mount: {e}")))?;
        }
        Some(other) => {
            return Err(target_err(
                target,
                format!("is already a mount point ({})", other.fstype),
            ));
        }
        None => {}
    }
    if target.exists() {
        let mut entries = std::fs::read_dir(target)
            .map_err(|e| target_err(target, format!("exists but cannot be listed: {e}")))?;
        if entries.next().is_some() {
            return Err(target_err(target, "exists and is not empty"));
        }
        return Ok(false);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(target)
        .map_err(|e| target_err(target, format!("cannot be created: {e}")))?;
    Ok(true)
}

/// Removes the target directory if it is there and empty.
pub fn remove(target: &Path) -> Result<(), Error> {
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(target_err(target, format!("cannot be removed: {e}"))),
    }
}

/// Some providers (AWS by default) write secrets into target_path themselves. Those files
/// would sit on the node's disk under our mount: overwrite them with zeros, delete them, and
/// report whether there were any.
pub fn scrub_provider_writes(target: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(target) else {
        return false;
    };
    let mut found = false;
    for entry in entries.flatten() {
        found = true;
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => {
                scrub_provider_writes(&path);
                let _ = std::fs::remove_dir(&path);
            }
            Ok(t) if t.is_file() => {
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    let zeros = vec![0u8; 64 * 1024];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        if f.write_all(&zeros[..n]).is_err() {
                            break;
                        }
                        left -= n as u64;
                    }
                    let _ = f.sync_all();
                }
                let _ = std::fs::remove_file(&path);
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_creates_reuses_and_refuses() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("pod/volumes/mount");
        assert!(prepare(&target).expect("create"));
        assert!(!prepare(&target).expect("reuse empty dir"));
        std::fs::write(target.join("x"), b"1").expect("write");
        assert!(prepare(&target).is_err(), "non-empty dir accepted");
        assert!(remove(&target).is_err(), "non-empty dir removed");
        std::fs::remove_file(target.join("x")).expect("rm");
        remove(&target).expect("remove");
        remove(&target).expect("remove again is fine");
        assert!(!target.exists());
    }

    #[test]
    fn scrub_wipes_files_and_dirs() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(!scrub_provider_writes(root.path()));
        std::fs::create_dir(root.path().join("d")).expect("mkdir");
        std::fs::write(root.path().join("d/secret"), b"value").expect("write");
        std::fs::write(root.path().join("top"), b"value").expect("write");
        assert!(scrub_provider_writes(root.path()));
        assert_eq!(std::fs::read_dir(root.path()).expect("ls").count(), 0);
    }
}
