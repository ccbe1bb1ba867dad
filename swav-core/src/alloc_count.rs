//! A counting global allocator for tests that bound the memory an input can make code allocate:
//! install it in a test binary with `#[global_allocator]`, then [`CountingAlloc::measure`] a call.
//! (The system allocator does the work; this only counts live bytes and their peak.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The allocator: the system's, counted.
pub struct CountingAlloc {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingAlloc {
    /// A counter at zero (for a `static`).
    pub const fn new() -> CountingAlloc {
        CountingAlloc { live: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    /// Runs `f` and returns its result with the peak of live bytes above those live when it started.
    /// Allocations of other threads count too: measure in a test binary that runs one test.
    pub fn measure<R>(&self, f: impl FnOnce() -> R) -> (R, usize) {
        let base = self.live.load(Ordering::SeqCst);
        self.peak.store(base, Ordering::SeqCst);
        let r = f();
        (r, self.peak.load(Ordering::SeqCst).saturating_sub(base))
    }

    fn add(&self, n: usize) {
        let live = self.live.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(live, Ordering::SeqCst);
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        self.live.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            self.live.fetch_sub(layout.size(), Ordering::SeqCst);
            self.add(new_size);
        }
        p
    }
}
