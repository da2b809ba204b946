//! What every fuzz target shares: a global allocator that refuses to let the code under test
//! hold more than [`LIMIT`] bytes at once (an input that makes a parser take memory beyond
//! that is a finding, reported like a crash), and the macro that declares a target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use libfuzzer_sys;

/// The rescue system's budget for restore, verify, ls and restore-files.
pub const LIMIT: usize = 256 << 20;

pub struct Capped {
    live: AtomicUsize,
}

impl Capped {
    pub const fn new() -> Capped {
        Capped {
            live: AtomicUsize::new(0),
        }
    }
}

impl Default for Capped {
    fn default() -> Self {
        Self::new()
    }
}

impl Capped {
    /// Count `n` more bytes; false (and nothing counted) past the limit.
    fn take(&self, n: usize) -> bool {
        let live = self.live.fetch_add(n, Ordering::Relaxed) + n;
        if live > LIMIT {
            self.live.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }
}

// Past the limit an allocation fails: Rust then aborts with "memory allocation of N bytes
// failed", which libFuzzer records as a crash with the input that caused it.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !self.take(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !self.take(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.live.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !self.take(new - l.size()) {
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, new) };
        if new < l.size() && !q.is_null() {
            self.live.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        q
    }
}

/// `bmr_fuzz::target!(bmr::fuzz::NAME);` in fuzz_targets/NAME.rs.
#[macro_export]
macro_rules! target {
    ($f:path) => {
        #[global_allocator]
        static ALLOC: $crate::Capped = $crate::Capped::new();
        $crate::libfuzzer_sys::fuzz_target!(|data: &[u8]| $f(data));
    };
}
