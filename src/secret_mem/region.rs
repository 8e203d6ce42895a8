use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroize;

use super::Error;

/// Which kind of memory holds a region's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// `memfd_secret(2)` pages: removed from the kernel's direct map, unreadable through
    /// `/proc/PID/mem`, never swapped.
    SecretMem,
    /// Anonymous pages, `mlock`ed and `MADV_DONTDUMP`: never swapped or dumped, but readable by a
    /// root process that can ptrace the driver.
    Locked,
}

impl MemoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::SecretMem => "memfd_secret",
            MemoryKind::Locked => "mlock",
        }
    }
}

/// One page-aligned mapping of secret memory. Zeroized and unmapped on drop.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    kind: MemoryKind,
    _fd: Option<OwnedFd>,
}

// SAFETY: the mapping is owned exclusively by this value; shared access is read-only (`&self`)
// and mutation needs `&mut self`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

/// Live bytes per kind, for metrics and the audit report.
fn live(kind: MemoryKind) -> &'static AtomicU64 {
    static SECRETMEM: AtomicU64 = AtomicU64::new(0);
    static LOCKED: AtomicU64 = AtomicU64::new(0);
    match kind {
        MemoryKind::SecretMem => &SECRETMEM,
        MemoryKind::Locked => &LOCKED,
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v).unwrap_or(4096).max(4096)
    })
}

/// Which memory secrets may live in, chosen once per process (`--memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// memfd_secret where the kernel allows it, else mlocked memory.
    #[default]
    Auto,
    /// memfd_secret or nothing: publishes fail where the kernel refuses it.
    RequireSecretMem,
    /// Always mlocked memory (e.g. where memfd_secret's block on hibernation matters).
    Locked,
}

static POLICY: OnceLock<MemoryPolicy> = OnceLock::new();

/// Sets the process's memory policy; only the first call counts.
pub fn set_policy(policy: MemoryPolicy) {
    let _ = POLICY.set(policy);
}

fn policy() -> MemoryPolicy {
    POLICY.get().copied().unwrap_or_default()
}

/// Whether this process can use memfd_secret, probed once.
fn secretmem_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match Region::with_kind(1, MemoryKind::SecretMem) {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(error = %err, "memfd_secret unavailable; secrets will live in mlocked, MADV_DONTDUMP memory");
            false
        }
    })
}

impl Region {
    /// Takes ownership of a fresh mapping (counted in `live_bytes` until dropped).
    fn adopt(ptr: NonNull<u8>, len: usize, kind: MemoryKind, fd: Option<OwnedFd>) -> Region {
        live(kind).fetch_add(len as u64, Ordering::Relaxed);
        Region {
            ptr,
            len,
            kind,
            _fd: fd,
        }
    }

    /// Allocates at least `len` bytes of the memory the process policy asks for.
    pub fn new(len: usize) -> Result<Region, Error> {
        match Region::preferred_kind() {
            Some(kind) => Region::with_kind(len, kind),
            None => Err(Error::SecretMemRequired),
        }
    }

    /// The kind [`Region::new`] allocates in this process, or `None` when the policy demands
    /// memfd_secret and the kernel refuses it.
    pub fn preferred_kind() -> Option<MemoryKind> {
        match policy() {
            MemoryPolicy::Locked => Some(MemoryKind::Locked),
            MemoryPolicy::Auto if !secretmem_available() => Some(MemoryKind::Locked),
            MemoryPolicy::RequireSecretMem if !secretmem_available() => None,
            _ => Some(MemoryKind::SecretMem),
        }
    }

    /// Allocates at least `len` bytes (rounded up to whole pages, at least one) of `kind`.
    pub fn with_kind(len: usize, kind: MemoryKind) -> Result<Region, Error> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        let region = match kind {
            MemoryKind::SecretMem => map_secretmem(len)?,
            MemoryKind::Locked => map_locked(len)?,
        };
        // Best effort: keep the pages out of core dumps and out of forked children. Both are
        // advisory; mlock / memfd_secret already keep them out of swap.
        // SAFETY: ptr/len describe the mapping just created.
        unsafe {
            libc::madvise(region.ptr.as_ptr().cast(), len, libc::MADV_DONTDUMP);
            libc::madvise(region.ptr.as_ptr().cast(), len, libc::MADV_WIPEONFORK);
        }
        Ok(region)
    }

    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// Maps the memfd_secret region another driver process created and handed over (its
    /// bytes stay where they are; nothing is copied). `len` is the region's length.
    pub fn from_secretmem_fd(fd: OwnedFd, len: usize) -> Result<Region, Error> {
        use std::os::fd::AsRawFd;
        let ptr = mmap(len, libc::MAP_SHARED, fd.as_raw_fd())?;
        // SAFETY: ptr/len describe the mapping just created.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTDUMP);
        }
        Ok(Region::adopt(ptr, len, MemoryKind::SecretMem, Some(fd)))
    }

    /// The memfd behind a memfd_secret region (to hand it to another process); none for mlock.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self._fd.as_ref().map(|fd| fd.as_fd())
    }

    /// Bytes of `kind` currently mapped by live regions in this process.
    pub fn live_bytes(kind: MemoryKind) -> u64 {
        live(kind).load(Ordering::Relaxed)
    }

    /// Mapped length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid, readable and `len` bytes long for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Makes the region read-only; a stray write through any pointer then faults instead of
    /// corrupting a secret. Drop makes it writable again to zeroize it.
    pub fn seal(self) -> SealedRegion {
        self.protect(libc::PROT_READ);
        SealedRegion(self)
    }

    fn protect(&self, prot: libc::c_int) {
        // SAFETY: ptr/len describe this region's own mapping.
        unsafe {
            libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot);
        }
    }
}

/// A filled region that can only be read. See [`Region::seal`].
#[derive(Debug)]
pub struct SealedRegion(Region);

impl SealedRegion {
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    pub fn kind(&self) -> MemoryKind {
        self.0.kind
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.0.fd()
    }

    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

impl Drop for SealedRegion {
    fn drop(&mut self) {
        self.0.protect(libc::PROT_READ | libc::PROT_WRITE);
    }
}

fn map_secretmem(len: usize) -> Result<Region, Error> {
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_ulong) };
    if fd < 0 {
        return Err(Error::Map {
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: fd is a valid memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(Error::Size {
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    let ptr = mmap(len, libc::MAP_SHARED, fd.as_raw_fd())?;
    Ok(Region::adopt(ptr, len, MemoryKind::SecretMem, Some(fd)))
}

fn map_locked(len: usize) -> Result<Region, Error> {
    let ptr = mmap(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
    let region = Region::adopt(ptr, len, MemoryKind::Locked, None);
    // SAFETY: ptr/len describe the mapping just created.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
        return Err(Error::Lock {
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(region)
}

fn mmap(len: usize, flags: libc::c_int, fd: libc::c_int) -> Result<NonNull<u8>, Error> {
    // SAFETY: asks the kernel for a new mapping; no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Map {
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast()).ok_or(Error::Map {
        len,
        source: std::io::Error::other("mmap returned null"),
    })
}

impl Drop for Region {
    fn drop(&mut self) {
        self.as_mut_slice().zeroize();
        live(self.kind).fetch_sub(self.len as u64, Ordering::Relaxed);
        // SAFETY: the mapping belongs to self and is not used after this point. munmap also
        // drops the mlock. The memfd (if any) closes when `_fd` drops.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the smaps entry containing `ptr` reports locked pages.
    fn is_locked(ptr: *const u8) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let addr = ptr as usize;
        let mut in_range = false;
        for line in smaps.lines() {
            let range = line
                .split_once(' ')
                .and_then(|(range, _)| range.split_once('-'))
                .and_then(|(lo, hi)| {
                    Some((
                        usize::from_str_radix(lo, 16).ok()?,
                        usize::from_str_radix(hi, 16).ok()?,
                    ))
                });
            if let Some((lo, hi)) = range {
                in_range = lo <= addr && addr < hi;
            } else if in_range && line.starts_with("Locked:") {
                return !line.contains(" 0 kB");
            }
        }
        false
    }

    #[test]
    fn locked_region_is_mlocked_zeroed_and_page_sized() {
        let mut r = Region::with_kind(10, MemoryKind::Locked).expect("mlock region");
        assert_eq!(r.len() % page_size(), 0);
        assert!(r.len() >= 10);
        assert!(r.as_slice().iter().all(|&b| b == 0));
        r.as_mut_slice()[..5].copy_from_slice(b"hello");
        assert_eq!(&r.as_slice()[..5], b"hello");
        assert!(is_locked(r.as_slice().as_ptr()), "region not mlocked");
    }

    #[test]
    fn secretmem_region_holds_bytes() {
        match Region::with_kind(5000, MemoryKind::SecretMem) {
            Ok(mut r) => {
                assert_eq!(r.kind(), MemoryKind::SecretMem);
                assert_eq!(r.len(), 2 * page_size());
                r.as_mut_slice()[4999] = 7;
                assert_eq!(r.as_slice()[4999], 7);
            }
            Err(e) if std::env::var_os("SECRETFS_REQUIRE_FUSE").is_some() => {
                panic!("memfd_secret must work on CI machines: {e}")
            }
            Err(e) => eprintln!("skipping: memfd_secret unavailable here: {e}"),
        }
    }

    #[test]
    fn drop_zeroizes_before_unmapping() {
        // Fill a memfd_secret region, keep a dup of its fd, drop the region (sealed, as
        // snapshots are), then map the memfd again: its bytes must be zero.
        let r = Region::with_kind(4096, MemoryKind::SecretMem);
        let Ok(mut r) = r else { return };
        let fd = r
            ._fd
            .as_ref()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .expect("memfd");
        // SAFETY: dup of a valid fd.
        let dup = unsafe { libc::dup(fd) };
        assert!(dup >= 0);
        r.as_mut_slice()[..4].copy_from_slice(b"KEYS");
        let sealed = r.seal();
        assert_eq!(&sealed.as_slice()[..4], b"KEYS");
        drop(sealed);
        let second = mmap(4096, libc::MAP_SHARED, dup).expect("remap memfd");
        // SAFETY: fresh 4096-byte mapping.
        let bytes = unsafe { std::slice::from_raw_parts(second.as_ptr(), 4096) };
        assert!(bytes.iter().all(|&b| b == 0), "region not zeroized on drop");
        // SAFETY: unmapping and closing what this test created.
        unsafe {
            libc::munmap(second.as_ptr().cast(), 4096);
            libc::close(dup);
        }
    }
}
