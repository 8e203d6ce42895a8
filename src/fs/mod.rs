//! The FUSE filesystem that serves one volume at its target path.
//!
//! Mounted with `mount(2)` directly (root; no fusermount), `nosuid,nodev,noexec`,
//! `allow_other` and `default_permissions` (the kernel enforces the files' modes), one FUSE
//! worker thread per mount. The mount at the target is made read-only (and so is every bind
//! mount kubelet and the runtime make of it); the driver keeps a private writable clone of the
//! mount (`open_tree`, attached nowhere) through which it swaps `..data` on rotation, so that
//! the kernel reports the swap to inotify watchers. The filesystem itself refuses every change
//! except that swap, and the swap from anyone but the driver.

mod access;
mod mounts;
mod resume;
mod tree;
mod volume_fs;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::{BackgroundSession, Config, INodeNo, MountOption, Session, SessionACL};

pub use access::{Ownership, Settings, cgroup_has_pod};
pub use mounts::{FSNAME, MountEntry, cached_pages, detach, mount_at, mount_table};
use volume_fs::{State, VolumeFs};

use crate::secret_mem::{FileLayout, ObjectVersion, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot path {0:?} conflicts with another path")]
    Layout(String),
    #[error("mounting FUSE at {target}: {source}")]
    Mount {
        target: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting {target}: {source}")]
    Unmount {
        target: PathBuf,
        source: std::io::Error,
    },
    #[error("handing over the mount at {target}: {reason}")]
    Handover { target: PathBuf, reason: String },
    #[error("swapping in the new version at {target}: {source}")]
    Swap {
        target: PathBuf,
        source: std::io::Error,
    },
}

/// A live mount. Dropping it unmounts (lazily) as well.
pub struct Mounted {
    target: PathBuf,
    state: Arc<State>,
    /// Writable clone of the mount, for the `..data` swap; closed on unmount.
    rw_root: Mutex<Option<OwnedFd>>,
    session: Mutex<Option<BackgroundSession>>,
    /// A dup of the connection's `/dev/fuse` fd, to hand to a successor or the keeper.
    fuse: OwnedFd,
}

/// What a successor process needs besides the fds to serve a mount: the non-secret layout.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MountLayout {
    pub settings: Settings,
    /// The current version directory's name.
    pub version: String,
    pub inodes: tree::Inodes,
    pub files: Vec<FileLayout>,
    pub versions: Vec<(String, String)>,
    pub region_len: usize,
    pub first_handle: u64,
}

/// The fds of a mount, in the order they travel: `/dev/fuse`, the writable clone, the
/// memfd_secret region.
pub struct MountFds {
    pub fuse: OwnedFd,
    pub rw_root: OwnedFd,
    pub region: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(FSNAME.into()),
        MountOption::Subtype(FSNAME.into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(1);
    config
}

fn cstr(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn os_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Lets inotify watchers of each file whose contents a swap changed see `IN_MODIFY` and
/// `IN_CLOSE_WRITE`, as if the new contents had been written in place: the driver opens the
/// file for writing through its writable clone and writes one byte, which the filesystem
/// accepts from the driver only and discards (the bytes served are the new version's). Files
/// are path-stable inodes, so the watch a reader put on the old version's file fires. Empty
/// files are skipped (a one-byte write would briefly grow the kernel's idea of their size).
fn touch_changed(rw: std::os::fd::BorrowedFd<'_>, old: &Snapshot, new: &Snapshot) {
    for file in new.files() {
        let unchanged = old
            .files()
            .iter()
            .any(|f| f.path == file.path && f.bytes.expose() == file.bytes.expose());
        if unchanged || file.bytes.is_empty() {
            continue;
        }
        let Ok(path) = CString::new(format!("{}/{}", tree::DATA, file.path)) else {
            continue;
        };
        // SAFETY: valid fd and C string; the fd is closed right below.
        let fd = unsafe {
            libc::openat(
                rw.as_raw_fd(),
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::debug!(path = %file.path, error = %std::io::Error::last_os_error(), "cannot signal a modified file");
            continue;
        }
        // SAFETY: fd was just opened and is owned here.
        let mut sink = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = std::io::Write::write(&mut sink, b"-");
    }
}

/// A detached, writable clone of the mount at `target` (open_tree(2) with OPEN_TREE_CLONE).
fn clone_mount(target: &Path) -> std::io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let path = cstr(target)?;
    // SAFETY: valid C string; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the mount at `target` read-only (a bind remount: the filesystem stays writable for
/// the driver's clone).
fn remount_read_only(target: &Path) -> std::io::Result<()> {
    let path = cstr(target)?;
    let flags = libc::MS_REMOUNT
        | libc::MS_BIND
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | libc::MS_NOATIME;
    // SAFETY: valid C string; null source/type/data are allowed for a bind remount.
    os_result(unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// Mounts `snapshot` at `target` (an existing, empty directory). Blocking: call it from a
/// blocking context.
pub fn mount(target: &Path, snapshot: Arc<Snapshot>, settings: Settings) -> Result<Mounted, Error> {
    let state = State::new(snapshot, settings).map_err(Error::Layout)?;
    let mount_err = |source| Error::Mount {
        target: target.to_path_buf(),
        source,
    };
    let session =
        Session::new(VolumeFs(Arc::clone(&state)), target, &config()).map_err(mount_err)?;
    state.set_notifier(session.notifier());
    let fuse = session.as_fd().try_clone_to_owned().map_err(mount_err)?;
    let session = session.spawn().map_err(mount_err)?;
    let mounted = Mounted {
        target: target.to_path_buf(),
        state,
        rw_root: Mutex::new(None),
        session: Mutex::new(Some(session)),
        fuse,
    };
    // On error `mounted` drops and unmounts.
    *lock(&mounted.rw_root) = Some(clone_mount(target).map_err(mount_err)?);
    remount_read_only(target).map_err(mount_err)?;
    Ok(mounted)
}

/// Serves, from this process, a mount another driver process made and handed over (see
/// `resume.rs`). Nothing is fetched or remounted; the bytes stay in the handed-over region.
pub fn resume(target: &Path, layout: MountLayout, fds: MountFds) -> Result<Mounted, Error> {
    let err = |reason: String| Error::Handover {
        target: target.to_path_buf(),
        reason,
    };
    let versions = layout
        .versions
        .into_iter()
        .map(|(id, version)| ObjectVersion { id, version })
        .collect();
    let snapshot = Snapshot::adopt(fds.region, layout.region_len, layout.files, versions)
        .map_err(|e| err(e.to_string()))?;
    let state = State::resume(
        Arc::new(snapshot),
        layout.settings,
        layout.inodes,
        layout.version,
        layout.first_handle,
    )
    .map_err(err)?;
    let session = resume::session(VolumeFs(Arc::clone(&state)), fds.fuse, config())
        .map_err(|e| err(e.to_string()))?;
    state.set_notifier(session.notifier());
    let fuse = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| err(e.to_string()))?;
    let session = session.spawn().map_err(|e| err(e.to_string()))?;
    Ok(Mounted {
        target: target.to_path_buf(),
        state,
        rw_root: Mutex::new(Some(fds.rw_root)),
        session: Mutex::new(Some(session)),
        fuse,
    })
}

impl Mounted {
    /// The layout and dups of the fds a successor process needs to serve this mount. Fails
    /// for mlock regions (they have no fd; such volumes cannot survive a restart).
    pub fn handover(&self) -> Result<(MountLayout, MountFds), Error> {
        let err = |reason: String| Error::Handover {
            target: self.target.clone(),
            reason,
        };
        let view = self.state.view();
        let snapshot = &view.snapshot;
        let region = snapshot
            .region_fd()
            .ok_or_else(|| err("mlock memory cannot be handed to another process".into()))?
            .try_clone_to_owned()
            .map_err(|e| err(e.to_string()))?;
        let rw_root = lock(&self.rw_root)
            .as_ref()
            .ok_or_else(|| err("the mount is no longer served".into()))?
            .try_clone()
            .map_err(|e| err(e.to_string()))?;
        let fuse = self.fuse.try_clone().map_err(|e| err(e.to_string()))?;
        let layout = MountLayout {
            settings: self.state.settings().clone(),
            version: view.tree.version.0.to_string_lossy().into_owned(),
            inodes: view.base.clone(),
            files: snapshot.layout(),
            versions: snapshot
                .versions()
                .iter()
                .map(|o| (o.id.clone(), o.version.clone()))
                .collect(),
            region_len: snapshot.region_bytes(),
            first_handle: self.state.next_handle().saturating_add(1 << 32),
        };
        Ok((
            layout,
            MountFds {
                fuse,
                rw_root,
                region,
            },
        ))
    }

    /// Has the kernel deliver again the requests a dead predecessor read but never answered.
    pub fn resend_lost_requests(&self) -> std::io::Result<()> {
        resume::resend(self.fuse.as_fd())
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The snapshot new opens are served from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.state.view().snapshot)
    }

    /// Whether only the pod's own processes may open files.
    pub fn reader_binding(&self) -> bool {
        self.state.reader_binding()
    }

    /// Files currently open through this mount.
    pub fn open_handles(&self) -> usize {
        self.state.open_handles()
    }

    /// Serves `snapshot` from now on, the way kubelet's atomic writer updates a volume: a new
    /// version directory, `..data_tmp` pointing at it, renamed over `..data` — all through the
    /// mount, so inotify watchers on the volume see IN_CREATE `..data_tmp` and IN_MOVED_TO
    /// `..data`. Handles opened earlier keep reading the version they opened. Blocking.
    pub fn swap(&self, snapshot: Arc<Snapshot>) -> Result<(), Error> {
        let swap_err = |source| Error::Swap {
            target: self.target.clone(),
            source,
        };
        // Held for the whole swap: an unmount waits for it.
        let rw_guard = lock(&self.rw_root);
        let Some(rw) = rw_guard.as_ref() else {
            return Err(swap_err(std::io::ErrorKind::NotConnected.into()));
        };
        let old = self.state.view();
        let new = self.state.stage(snapshot).map_err(Error::Layout)?;
        let version = CString::new(new.tree.version.0.as_bytes())
            .map_err(|_| swap_err(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: valid fd and C strings.
        let result = os_result(unsafe {
            libc::symlinkat(version.as_ptr(), rw.as_raw_fd(), c"..data_tmp".as_ptr())
        })
        .and_then(|()| {
            // SAFETY: valid fd and C strings.
            os_result(unsafe {
                libc::renameat(
                    rw.as_raw_fd(),
                    c"..data_tmp".as_ptr(),
                    rw.as_raw_fd(),
                    c"..data".as_ptr(),
                )
            })
        })
        .and_then(|()| {
            if Arc::ptr_eq(&self.state.view(), &new) {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    "the rename did not commit the new version",
                ))
            }
        });
        let notifier = self.state.notifier();
        if let Err(e) = result {
            self.state.unstage();
            if let Some(n) = notifier {
                let _ = n.inval_entry(INodeNo(tree::ROOT), std::ffi::OsStr::new(tree::DATA_TMP));
            }
            return Err(swap_err(e));
        }
        if let Some(n) = notifier {
            // Files keep their inode numbers: drop cached attributes (sizes, modes, times).
            for &ino in &new.tree.files {
                let _ = n.inval_inode(INodeNo(ino), 0, 0);
            }
            // Names that are gone: the old version directory and removed top-level names.
            let (old_name, old_ino) = &old.tree.version;
            let _ = n.delete(INodeNo(tree::ROOT), INodeNo(*old_ino), old_name);
            for (name, ino) in &old.tree.top {
                if !new.tree.top.contains_key(name) {
                    let _ = n.delete(INodeNo(tree::ROOT), INodeNo(*ino), name);
                }
            }
            let _ = n.inval_inode(INodeNo(tree::ROOT), 0, 0);
        }
        touch_changed(rw.as_fd(), &old.snapshot, &new.snapshot);
        Ok(())
    }

    /// Detaches the mount. Readers that still hold files open keep them until they close;
    /// the snapshot is zeroized once the last one does. Blocking.
    pub fn unmount(&self) -> Result<(), Error> {
        self.detach()
    }

    /// Leaves the mount in place without serving it any more (process shutdown: the next
    /// driver process takes over the target). Readers see ENOTCONN until then.
    pub fn leave(&self) {
        lock(&self.rw_root).take();
        if let Some(session) = lock(&self.session).take() {
            // Dropping the session would unmount; forgetting it keeps the mount.
            std::mem::forget(session);
        }
    }

    fn detach(&self) -> Result<(), Error> {
        // The writable clone holds the filesystem too: close it so the connection can end.
        lock(&self.rw_root).take();
        let Some(session) = lock(&self.session).take() else {
            return Ok(());
        };
        let result = detach(&self.target).map_err(|source| Error::Unmount {
            target: self.target.clone(),
            source,
        });
        // The FUSE thread ends when the kernel closes the connection; dropping the session
        // does not wait for it.
        drop(session);
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}
