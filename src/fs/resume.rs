//! Serving a live FUSE connection that another process set up.
//!
//! A FUSE connection outlives the process that mounted it as long as some process holds its
//! `/dev/fuse` fd; the kernel performs the INIT handshake once per connection, so a process
//! that receives such an fd must serve requests straight away. fuser 0.18 insists on reading
//! an INIT first (`Session::from_fd` runs the handshake), so we give it one: the session is
//! created on one end of a socket pair carrying a synthetic INIT, and once the handshake is
//! done the live `/dev/fuse` fd is `dup3`ed over the socket's fd number. fuser's channel
//! reads and writes by fd number, so from then on it serves the live connection with its
//! ordinary request loop — no request parsing of our own, no proxy copying secret bytes.
//! The test `tests/restart.rs` fails if a fuser upgrade breaks this.
//!
//! Requests the previous process had read but not answered stay in the connection's
//! processing queue; [`resend`] asks the kernel to queue them again (FUSE_NOTIFY_RESEND,
//! Linux ≥ 6.9), so a reader that was waiting on a killed driver gets its answer from the
//! new one instead of hanging.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use fuser::{Filesystem, Session, SessionACL};

const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;

/// A FUSE_INIT request as the kernel sends it: header, then `fuse_init_in` (ABI 7.36 layout).
fn init_request() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_ne_bytes()); // len
    m.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
    m.extend_from_slice(&1u64.to_ne_bytes()); // unique
    m.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    m.extend_from_slice(&7u32.to_ne_bytes()); // major
    m.extend_from_slice(&36u32.to_ne_bytes()); // minor
    m.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_readahead
    m.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    m
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A fuser session serving the live connection `live` (a `/dev/fuse` fd whose INIT another
/// process answered). Not mounted anywhere by us: the mount already exists.
pub fn session<FS: Filesystem>(
    fs: FS,
    live: OwnedFd,
    config: fuser::Config,
) -> std::io::Result<Session<FS>> {
    let (ours, theirs) = seqpacket_pair()?;
    let mut theirs = UnixStream::from(theirs);
    theirs.write_all(&init_request())?;
    let session = Session::from_fd(fs, ours, SessionACL::All, config)?;
    // The INIT reply went to our end of the pair; it means nothing to the live connection.
    let mut reply = [0u8; 256];
    let n = theirs.read(&mut reply)?;
    let error = reply
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes);
    if n < 16 || error != Some(0) {
        return Err(std::io::Error::other(format!(
            "fuser refused the resumed handshake (error {error:?})"
        )));
    }
    // SAFETY: both are valid fds; dup3 atomically makes the session's fd number refer to the
    // live connection (closing the socket it referred to).
    let rc = unsafe {
        libc::dup3(
            live.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(session)
}

/// Asks the kernel to deliver again every request of this connection that was read but not
/// answered (by a process that died meanwhile).
pub fn resend(fuse: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_ne_bytes());
    m.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes());
    // SAFETY: writes 16 bytes from a live buffer to a valid fd.
    let n = unsafe { libc::write(fuse.as_raw_fd(), m.as_ptr().cast(), m.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
