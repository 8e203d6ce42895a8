//! Messages between driver processes and the keeper: one JSON document per `SOCK_SEQPACKET`
//! packet (so no framing), with file descriptors attached as `SCM_RIGHTS`. Nothing secret is
//! ever in the JSON; secret bytes travel only as memfd_secret fds, never copied.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

use crate::volume::VolumeRecord;

/// The largest message: a volume's record with its inode map.
const MAX_MESSAGE: usize = 1 << 20;
/// fds per message: a volume's `/dev/fuse`, writable clone and region.
const MAX_FDS: usize = 3;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Successor → running driver: hand every volume over.
    Take,
    /// Driver → keeper: send back what you hold.
    Hello,
    /// One volume, with its three fds attached.
    Volume(Box<VolumeRecord>),
    /// End of a list of volumes.
    Done,
    /// Successor → predecessor: every volume is served here now; exit.
    Taken,
    /// Driver → keeper: forget a volume (unpublished).
    Forget { volume_id: String },
    /// Driver → keeper: forget every volume but these.
    Keep { volume_ids: Vec<String> },
    /// Predecessor → successor: cannot hand over (and why).
    Refused { reason: String },
}

fn errno(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno)
}

/// Listens on `path` (replacing a stale socket file), owner-only.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket::listen(&fd, Backlog::new(8).map_err(errno)?).map_err(errno)?;
    Ok(fd)
}

pub fn accept(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(errno)?;
    // SAFETY: accept4 returned a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seqpacket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    Ok(fd)
}

pub fn send(sock: BorrowedFd<'_>, msg: &Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&body)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(errno)?;
    Ok(())
}

/// The next message and its fds; `None` when the peer closed the connection.
pub fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut body)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(errno)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(errno)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel installed these fds for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&body[..len]).map_err(std::io::Error::other)?;
    Ok(Some((msg, fds)))
}

/// Who is on the other end of `sock`: pid, uid and executable.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub exe: std::path::PathBuf,
}

/// The peer, if it is a secretfs process of our own user (the same executable name; an
/// upgrade brings a different file). Anything else may not take or hand over fds.
pub fn trusted_peer(sock: BorrowedFd<'_>) -> Result<Peer, String> {
    let cred = socket::getsockopt(&sock, socket::sockopt::PeerCredentials)
        .map_err(|e| format!("no peer credentials: {e}"))?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", cred.pid()))
        .map_err(|e| format!("peer pid {}: {e}", cred.pid()))?;
    let peer = Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        exe,
    };
    let ours = std::env::current_exe().map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if peer.uid != euid || peer.exe.file_name() != ours.file_name() {
        return Err(format!(
            "refusing {peer:?}: not a secretfs process of uid {euid}"
        ));
    }
    Ok(peer)
}
