//! A global allocator that wipes every heap block before it is freed or moved, so bytes that
//! passed through code we do not control (the gRPC/HTTP2 stack, protobuf decoding, JSON) do
//! not linger in freed memory where a later reader of `/proc/PID/mem` could find them.
//!
//! Blocks at or above glibc's mmap threshold (fixed at 128 KiB by `hardening`) are returned to
//! the kernel with `munmap` on free; the kernel hands out only zeroed pages, so those are not
//! wiped (wiping would fault in every page of fuser's mostly untouched 16 MiB read buffers).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this large or larger are unmapped on free rather than kept in the heap.
pub const UNMAPPED_ON_FREE: usize = 128 * 1024;

pub struct ZeroizingAlloc;

unsafe fn wipe(ptr: *mut u8, len: usize) {
    if len < UNMAPPED_ON_FREE {
        // SAFETY: the caller owns `len` writable bytes at `ptr`. glibc's explicit_bzero is a
        // memset the compiler may not drop as a dead store before the free (a byte-wise
        // volatile loop did the same at a fraction of the speed, on every free).
        unsafe { libc::explicit_bzero(ptr.cast(), len) }
    }
}

// SAFETY: delegates to the system allocator; only adds wiping of blocks it is handed back.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr/layout describe a live block we are handed back.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout);
        }
    }

    /// Never lets the system allocator move a block and free the old copy unwiped: allocate,
    /// copy, wipe, free.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: new_size is non-zero and, rounded to the alignment, fits isize (the
        // GlobalAlloc contract for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded allocation; on success both blocks are valid for the copy.
        unsafe {
            let new = System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_and_moved_blocks_are_wiped() {
        let a = ZeroizingAlloc;
        let layout = Layout::from_size_align(64, 8).expect("layout");
        // SAFETY: exercising the allocator with valid layouts; the wiped block is inspected
        // through a realloc that moves it (the old block stays owned by us until dealloc).
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, 64);
            wipe(p, 64);
            assert!(std::slice::from_raw_parts(p, 64).iter().all(|&b| b == 0));
            std::ptr::write_bytes(p, 0xCD, 64);
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            assert!(
                std::slice::from_raw_parts(q, 64).iter().all(|&b| b == 0xCD),
                "contents kept"
            );
            a.dealloc(q, Layout::from_size_align(4096, 8).expect("layout"));
        }
    }
}
