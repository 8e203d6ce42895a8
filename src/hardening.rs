//! Process-wide settings applied before anything else runs.

/// glibc's mmap threshold: allocations at or above it are mmapped and returned to the
/// kernel on free. Fixing it keeps fuser's 16 MiB per-mount read buffer from becoming
/// resident heap (measured: ~5 MB RSS per mount without, ~33 KB with).
const MMAP_THRESHOLD: libc::c_int = crate::secret_mem::alloc::UNMAPPED_ON_FREE as libc::c_int;

/// No core dumps, no ptrace-by-peers (`PR_SET_DUMPABLE` 0, `RLIMIT_CORE` 0), and the malloc
/// setting above. Call first thing in `main`, before any thread starts.
pub fn harden_process() -> Result<(), std::io::Error> {
    // SAFETY: plain libc calls with constant arguments.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_is_not_dumpable_and_has_no_core_limit() {
        super::harden_process().expect("harden");
        // SAFETY: reads process attributes only.
        let (dumpable, core) = unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
            (libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0), lim.rlim_max)
        };
        assert_eq!((dumpable, core), (0, 0));
    }
}
