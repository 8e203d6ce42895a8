//! Restart survival: volumes outlive the driver process that published them.
//!
//! - **Graceful handover** (upgrade, `maxSurge`): a new driver process connects to the running
//!   one's `handoff.sock` in `--state-dir`, receives every volume's `/dev/fuse` fd, writable
//!   mount clone and memfd_secret region with the non-secret record, serves them, and only then
//!   does the old process exit.
//! - **Keeper** (crash, `kill -9`, OOM): `secretfs keeper` holds dups of the same fds (sent on
//!   every publish and rotation, dropped on unpublish); a restarted driver takes them back.
//! - **Neither**: the mounts of the dead process are found from `volumes.log` in the state dir
//!   and detached; kubelet's next publish mounts them afresh.
//!
//! After taking volumes from a process that is gone, the kernel is asked to re-deliver the FUSE
//! requests that process read but never answered (`fs::resume`). Only fds and non-secret
//! metadata cross the sockets; the state dir holds volume ids and targets, nothing else.

pub mod keeper;
mod records;
mod wire;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;

use crate::fs::{self, MountFds};
use crate::volume::{Manager, VolumeRecord, Watcher};
use wire::Message;

pub const HANDOFF_SOCKET: &str = "handoff.sock";
pub const KEEPER_SOCKET: &str = "keeper.sock";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fds_of(fds: &MountFds) -> [BorrowedFd<'_>; 3] {
    [fds.fuse.as_fd(), fds.rw_root.as_fd(), fds.region.as_fd()]
}

fn mount_fds(fds: Vec<OwnedFd>) -> Option<MountFds> {
    let [fuse, rw_root, region]: [OwnedFd; 3] = fds.try_into().ok()?;
    Some(MountFds {
        fuse,
        rw_root,
        region,
    })
}

/// Where the previous process came from, for the log and the tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// A running predecessor handed its volumes over.
    Predecessor(usize),
    /// The keeper held the volumes of a process that died.
    Keeper(usize),
    /// Nothing to take over; this many stale mounts were detached.
    Fresh(usize),
}

/// The keeper connection and the volume records file; the manager's watcher.
pub struct Link {
    state_dir: PathBuf,
    keeper: Mutex<Option<OwnedFd>>,
    /// None until `start` has taken over or cleaned up what an earlier process left.
    records: Mutex<Option<records::Records>>,
}

impl Link {
    fn keeper_path(&self) -> PathBuf {
        self.state_dir.join(KEEPER_SOCKET)
    }

    /// Sends to the keeper; on failure drops the connection (the maintenance task reconnects).
    fn to_keeper(&self, msg: &Message, fds: &[BorrowedFd<'_>]) {
        let mut keeper = lock(&self.keeper);
        if let Some(sock) = keeper.as_ref()
            && let Err(e) = wire::send(sock.as_fd(), msg, fds)
        {
            tracing::warn!(error = %e, "lost the keeper; volumes will not survive a crash until it is back");
            *keeper = None;
        }
    }

    /// Connects to the keeper if it is not connected and sends it every volume.
    fn sync_keeper(&self, manager: &Manager) {
        if lock(&self.keeper).is_some() {
            return;
        }
        let Ok(sock) = wire::connect(&self.keeper_path()) else {
            return;
        };
        let all = manager.export_all();
        let mut ids = Vec::with_capacity(all.len());
        for (record, fds) in &all {
            if let Err(e) = wire::send(
                sock.as_fd(),
                &Message::Volume(Box::new(record.clone())),
                &fds_of(fds),
            ) {
                tracing::warn!(error = %e, "cannot reach the keeper");
                return;
            }
            ids.push(record.volume_id.clone());
        }
        if wire::send(sock.as_fd(), &Message::Keep { volume_ids: ids }, &[]).is_ok() {
            tracing::info!(volumes = all.len(), "keeper holds every volume");
            *lock(&self.keeper) = Some(sock);
        }
    }
}

impl Watcher for Link {
    fn saved(&self, record: &VolumeRecord, fds: &MountFds) {
        if let Some(records) = lock(&self.records).as_mut() {
            records.add(&record.volume_id, &record.target);
        }
        self.to_keeper(&Message::Volume(Box::new(record.clone())), &fds_of(fds));
    }

    fn forgotten(&self, volume_id: &str) {
        if let Some(records) = lock(&self.records).as_mut() {
            records.remove(volume_id);
        }
        self.to_keeper(
            &Message::Forget {
                volume_id: volume_id.to_string(),
            },
            &[],
        );
    }
}

/// Adopts every volume of a conversation until `Done`; returns how many.
fn adopt_all(sock: BorrowedFd<'_>, manager: &Manager, rt: &Handle) -> std::io::Result<usize> {
    let mut adopted = 0;
    loop {
        match wire::recv(sock)? {
            Some((Message::Volume(record), fds)) => {
                let id = record.volume_id.clone();
                let Some(fds) = mount_fds(fds) else {
                    tracing::error!(volume_id = %id, "volume arrived without its three fds");
                    continue;
                };
                match rt.block_on(manager.adopt(*record, fds)) {
                    Ok(()) => adopted += 1,
                    Err(e) => {
                        tracing::error!(volume_id = %id, error = %e, "cannot take the volume over")
                    }
                }
            }
            Some((Message::Done, _)) => return Ok(adopted),
            Some((Message::Refused { reason }, _)) => {
                return Err(std::io::Error::other(format!("refused: {reason}")));
            }
            Some((other, _)) => {
                return Err(std::io::Error::other(format!("unexpected {other:?}")));
            }
            None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Takes the volumes over from a running predecessor; `None` if there is none.
fn from_predecessor(
    state_dir: &Path,
    manager: &Manager,
    rt: &Handle,
) -> Option<std::io::Result<usize>> {
    let sock = wire::connect(&state_dir.join(HANDOFF_SOCKET)).ok()?;
    Some((|| {
        wire::send(sock.as_fd(), &Message::Take, &[])?;
        let adopted = adopt_all(sock.as_fd(), manager, rt)?;
        wire::send(sock.as_fd(), &Message::Taken, &[])?;
        // The predecessor exits now; its end closes when it is gone.
        let timeout = nix::sys::time::TimeVal::new(10, 0);
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        );
        while let Ok(Some(_)) = wire::recv(sock.as_fd()) {}
        Ok(adopted)
    })())
}

/// Takes back the volumes the keeper holds; `None` if no keeper runs.
fn from_keeper(link: &Link, manager: &Manager, rt: &Handle) -> Option<std::io::Result<usize>> {
    let sock = wire::connect(&link.keeper_path()).ok()?;
    Some((|| {
        wire::send(sock.as_fd(), &Message::Hello, &[])?;
        adopt_all(sock.as_fd(), manager, rt)
    })())
}

/// Detaches the mounts a dead predecessor left (as recorded in the state dir).
fn detach_stale(records: &BTreeMap<String, PathBuf>) -> usize {
    let mut detached = 0;
    for (id, target) in records {
        if fs::mount_at(target).is_some_and(|m| m.is_secretfs()) {
            match fs::detach(target) {
                Ok(()) => {
                    detached += 1;
                    tracing::info!(volume_id = %id, target = %target.display(), "detached a mount left by a previous driver process; kubelet's next publish mounts it again");
                }
                Err(e) => {
                    tracing::warn!(volume_id = %id, target = %target.display(), error = %e, "cannot detach a stale mount");
                }
            }
        }
    }
    detached
}

/// Runs before the driver serves: takes volumes over from a predecessor or the keeper, or
/// cleans up after a dead one; then registers the keeper link as the manager's watcher,
/// listens for a successor and keeps the keeper in sync.
pub async fn start(manager: &Arc<Manager>, state_dir: &Path) -> Origin {
    let link = Arc::new(Link {
        state_dir: state_dir.to_path_buf(),
        keeper: Mutex::new(None),
        records: Mutex::new(None),
    });
    let rt = Handle::current();
    let origin = tokio::task::spawn_blocking({
        let (manager, link) = (Arc::clone(manager), Arc::clone(&link));
        move || {
            let previous = records::load(&link.state_dir);
            let origin = match from_predecessor(&link.state_dir, &manager, &rt) {
                Some(Ok(n)) => Origin::Predecessor(n),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "handover from the running driver failed");
                    Origin::Predecessor(manager.list().len())
                }
                None => match from_keeper(&link, &manager, &rt) {
                    Some(Ok(n)) => Origin::Keeper(n),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "taking volumes back from the keeper failed");
                        Origin::Keeper(manager.list().len())
                    }
                    None => Origin::Fresh(0),
                },
            };
            // Requests the previous process read and never answered: deliver them again.
            manager.resend_lost_requests();
            // Whatever was recorded but is not served now is a dead mount.
            let served: BTreeMap<String, PathBuf> = manager
                .list()
                .into_iter()
                .map(|v| (v.volume_id, v.target))
                .collect();
            let stale: BTreeMap<String, PathBuf> = previous
                .into_iter()
                .filter(|(id, _)| !served.contains_key(id))
                .collect();
            let detached = detach_stale(&stale);
            *lock(&link.records) = Some(records::Records::create(&link.state_dir, served));
            match origin {
                Origin::Fresh(_) => Origin::Fresh(detached),
                other => other,
            }
        }
    })
    .await
    .unwrap_or(Origin::Fresh(0));
    tracing::info!(?origin, "volumes of earlier driver processes");
    manager.set_watcher(Arc::clone(&link) as Arc<dyn Watcher>);
    // Keep the keeper in sync (first now, then whenever it was lost). A thread of its own:
    // a blocking-pool task every 2 s would keep every idle pool thread awake for good.
    let (m, l) = (Arc::clone(manager), Arc::clone(&link));
    if let Err(e) = std::thread::Builder::new()
        .name("secretfs-keeper".into())
        .spawn(move || {
            loop {
                l.sync_keeper(&m);
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    {
        tracing::error!(error = %e, "cannot start the keeper link; volumes will not survive a crash");
    }
    listen_for_successor(Arc::clone(manager), state_dir);
    origin
}

/// Serves `handoff.sock`: a successor that asks gets every volume, then this process exits.
fn listen_for_successor(manager: Arc<Manager>, state_dir: &Path) {
    let path = state_dir.join(HANDOFF_SOCKET);
    let listener = match wire::listen(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %path.display(), error = %e, "cannot listen for a successor; upgrades will remount volumes");
            return;
        }
    };
    let rt = Handle::current();
    let spawned = std::thread::Builder::new()
        .name("secretfs-handoff".into())
        .spawn(move || {
            loop {
                let Ok(conn) = wire::accept(listener.as_fd()) else {
                    continue;
                };
                if let Err(e) = hand_over(conn.as_fd(), &manager, &rt) {
                    tracing::error!(error = %e, "handover to a successor failed; serving on");
                    rt.block_on(manager.thaw());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the handoff listener");
    }
}

/// One successor's request. Exits the process once the successor has taken every volume.
fn hand_over(conn: BorrowedFd<'_>, manager: &Manager, rt: &Handle) -> std::io::Result<()> {
    // The request is read before the peer is judged: closing a socket with an unread
    // message in it resets the connection, and the peer would never see the refusal.
    match wire::recv(conn)? {
        Some((Message::Take, _)) => {}
        other => {
            return Err(std::io::Error::other(format!(
                "unexpected {:?}",
                other.map(|(m, _)| m)
            )));
        }
    }
    let peer = match wire::trusted_peer(conn) {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(%reason, "handover request refused");
            let _ = wire::send(conn, &Message::Refused { reason }, &[]);
            return Ok(());
        }
    };
    tracing::info!(pid = peer.pid, exe = %peer.exe.display(), "a successor asks for the volumes: handing over");
    rt.block_on(manager.freeze());
    let all = manager.export_all();
    for (record, fds) in &all {
        wire::send(
            conn,
            &Message::Volume(Box::new(record.clone())),
            &fds_of(fds),
        )?;
    }
    wire::send(conn, &Message::Done, &[])?;
    match wire::recv(conn)? {
        Some((Message::Taken, _)) => {
            tracing::info!(volumes = all.len(), "volumes handed over; exiting");
            // No destructors: the regions must not be zeroized, they are the successor's now.
            std::process::exit(0);
        }
        other => Err(std::io::Error::other(format!(
            "successor answered {:?}",
            other.map(|(m, _)| m)
        ))),
    }
}
