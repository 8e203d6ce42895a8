//! `secretfs keeper`: a small process that holds dups of every volume's fds so that the
//! volumes survive a crash of the driver (a FUSE connection and a memfd_secret region live as
//! long as any process holds their fds). It never maps a region and never reads a request;
//! it keeps what the driver sends and gives it back to the next driver process.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::wire::{self, Message};
use super::{KEEPER_SOCKET, fds_of, lock, mount_fds};
use crate::fs::MountFds;
use crate::volume::VolumeRecord;

type Held = Arc<Mutex<BTreeMap<String, (VolumeRecord, MountFds)>>>;

/// Serves `KEEPER_SOCKET` in `state_dir` until the process is killed.
pub fn run(state_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(KEEPER_SOCKET);
    let listener = wire::listen(&path)?;
    tracing::info!(socket = %path.display(), "keeper listening");
    let held: Held = Arc::default();
    loop {
        let conn = match wire::accept(listener.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let held = Arc::clone(&held);
        std::thread::Builder::new()
            .name("keeper-conn".into())
            .spawn(move || {
                if let Err(e) = serve(conn.as_fd(), &held) {
                    tracing::warn!(error = %e, "driver connection ended");
                }
            })?;
    }
}

fn serve(conn: BorrowedFd<'_>, held: &Held) -> std::io::Result<()> {
    let peer = match wire::trusted_peer(conn) {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(%reason, "connection refused");
            return Ok(());
        }
    };
    tracing::info!(pid = peer.pid, "driver connected");
    while let Some((msg, fds)) = wire::recv(conn)? {
        match msg {
            Message::Hello => {
                let held = lock(held);
                for (record, fds) in held.values() {
                    wire::send(
                        conn,
                        &Message::Volume(Box::new(record.clone())),
                        &fds_of(fds),
                    )?;
                }
                wire::send(conn, &Message::Done, &[])?;
                tracing::info!(volumes = held.len(), "handed the held volumes to a driver");
            }
            Message::Volume(record) => match mount_fds(fds) {
                Some(fds) => {
                    tracing::debug!(volume_id = %record.volume_id, "holding volume");
                    lock(held).insert(record.volume_id.clone(), (*record, fds));
                }
                None => tracing::warn!(volume_id = %record.volume_id, "volume without its fds"),
            },
            Message::Forget { volume_id } => {
                lock(held).remove(&volume_id);
            }
            Message::Keep { volume_ids } => {
                lock(held).retain(|id, _| volume_ids.contains(id));
            }
            other => tracing::warn!(message = ?other, "unexpected message"),
        }
    }
    Ok(())
}
