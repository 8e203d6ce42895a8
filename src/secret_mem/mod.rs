//! Locked memory for secret bytes.
//!
//! A [`Region`] is one mapping of `memfd_secret(2)` pages (unreadable even to root through
//! `/proc/PID/mem`, never swapped) or, where the kernel lacks that syscall, anonymous pages that
//! are `mlock`ed and excluded from core dumps. A [`Snapshot`] holds every file of one provider
//! response in one region; a [`SecretBytes`] is one file's bytes inside it. Regions are zeroized
//! before they are unmapped. Reads reach the kernel through a per-thread mlocked bounce buffer
//! ([`with_bounce`]) because the kernel cannot pin memfd_secret pages for a FUSE reply.

pub mod alloc;
mod bounce;
mod map;
mod region;
mod snapshot;

pub use bounce::with_bounce;
pub use map::{SecretMap, secret_json};
pub use region::{MemoryKind, MemoryPolicy, Region, SealedRegion, set_policy};
pub use snapshot::{FileLayout, ObjectVersion, SecretBytes, SecretFile, Snapshot, SnapshotBuilder};

/// Failures to obtain or prepare locked memory. Never carries secret bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mmap of {len} bytes failed: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error("mlock of {len} bytes failed (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK): {source}")]
    Lock { len: usize, source: std::io::Error },
    #[error("memfd_secret region of {len} bytes could not be sized: {source}")]
    Size { len: usize, source: std::io::Error },
    #[error(
        "memfd_secret is unavailable on this kernel and --memory memfd-secret (--require-secret-memory) is set"
    )]
    SecretMemRequired,
    #[error("snapshot needs {needed} bytes but its region holds {capacity}")]
    Overflow { needed: usize, capacity: usize },
}
