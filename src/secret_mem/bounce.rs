use std::cell::RefCell;

use zeroize::Zeroize;

use super::{Error, MemoryKind, Region};

thread_local! {
    /// This thread's bounce buffer: mlocked, MADV_DONTDUMP, grown on demand, zeroized after
    /// every use and again (with the whole region) when the thread exits.
    static BOUNCE: RefCell<Option<Region>> = const { RefCell::new(None) };
}

/// Lends `f` an mlocked buffer of exactly `len` bytes and zeroizes it when `f` returns.
///
/// The FUSE reply path hands the kernel a pointer to the reply bytes; the kernel cannot pin
/// memfd_secret pages, so each read copies from the snapshot into this buffer, replies from
/// it, and wipes it.
pub fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, Error> {
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let region = match slot.take() {
            Some(r) if r.len() >= len => r,
            _ => Region::with_kind(len, MemoryKind::Locked)?,
        };
        let region = slot.insert(region);
        let buf = &mut region.as_mut_slice()[..len];
        let out = f(buf);
        buf.zeroize();
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_wiped_after_use_and_grows() {
        let ptr = with_bounce(16, |b| {
            b.copy_from_slice(b"0123456789abcdef");
            b.as_ptr() as usize
        })
        .expect("bounce");
        // The same thread gets the same (now zeroed) buffer back.
        let (again, zeroed) =
            with_bounce(16, |b| (b.as_ptr() as usize, b.iter().all(|&x| x == 0))).expect("bounce");
        assert_eq!(ptr, again);
        assert!(zeroed, "bounce buffer kept bytes after use");
        let big = with_bounce(300_000, |b| b.len()).expect("bounce");
        assert_eq!(big, 300_000);
    }
}
