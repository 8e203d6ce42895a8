//! The FUSE filesystem that serves one volume's snapshot at its target path.
//!
//! Mounted with `mount(2)` directly (root; no fusermount), read-only, nosuid, nodev, noexec,
//! `allow_other` and `default_permissions` (the kernel enforces the files' modes). One FUSE
//! worker thread per mount.

mod mounts;
mod tree;
mod volume_fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

pub use mounts::{FSNAME, MountEntry, cached_pages, detach, mount_at, mount_table};
use volume_fs::{State, View, VolumeFs};

use crate::secret_mem::Snapshot;

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
}

/// A live mount. Dropping it unmounts (lazily) as well.
pub struct Mounted {
    target: PathBuf,
    state: Arc<State>,
    session: Option<BackgroundSession>,
}

fn config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(FSNAME.into()),
        MountOption::Subtype(FSNAME.into()),
        MountOption::RO,
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

/// Mounts `snapshot` at `target` (an existing, empty directory). Blocking: call it from a
/// blocking context.
pub fn mount(target: &Path, snapshot: Arc<Snapshot>) -> Result<Mounted, Error> {
    let view = View::new(snapshot).map_err(Error::Layout)?;
    let state = State::new(view);
    let mount_err = |source| Error::Mount {
        target: target.to_path_buf(),
        source,
    };
    let session =
        Session::new(VolumeFs(Arc::clone(&state)), target, &config()).map_err(mount_err)?;
    state.set_notifier(session.notifier());
    let session = session.spawn().map_err(mount_err)?;
    Ok(Mounted {
        target: target.to_path_buf(),
        state,
        session: Some(session),
    })
}

impl Mounted {
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The snapshot new opens are served from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.state.view().snapshot)
    }

    /// Files currently open through this mount.
    pub fn open_handles(&self) -> usize {
        self.state.open_handles()
    }

    /// Detaches the mount. Readers that still hold files open keep them until they close;
    /// the snapshot is zeroized once the last one does. Blocking.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.detach()
    }

    /// Leaves the mount in place without serving it any more (process shutdown: the next
    /// driver process takes over the target). Readers see ENOTCONN until then.
    pub fn leave(mut self) {
        if let Some(session) = self.session.take() {
            // Dropping the session would unmount; forgetting it keeps the mount.
            std::mem::forget(session);
        }
    }

    fn detach(&mut self) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
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
