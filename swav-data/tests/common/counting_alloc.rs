//! A global allocator that counts live heap bytes and their peak, so that a test can assert that reading
//! hostile input allocates memory in proportion to the input, not to what the input claims.
//!
//! Include it in a test binary with `#[path = "common/counting_alloc.rs"] mod counting_alloc;`: it installs
//! itself as that binary's global allocator. [`measure`] serialises measurements (one at a time per
//! binary), so tests of the same binary may run in parallel without counting each other's allocations
//! as long as all their heavy work runs inside `measure`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());
static WHOLE_TEST: Mutex<()> = Mutex::new(());

/// Held for a whole test: the tests of a binary that take it run one at a time, so that the work one
/// does outside its measurements (building a dataset) cannot count in another's.
pub fn exclusive() -> MutexGuard<'static, ()> {
    WHOLE_TEST.lock().unwrap_or_else(|e| e.into_inner())
}

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only successful allocations are
// counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the peak number of heap bytes it held beyond what was live when
/// it started. Measurements run one at a time.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (r, peak)
}

/// Heap bytes live now (for diagnostics inside a measurement).
pub fn live() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// The peak since the measurement started (for diagnostics inside a measurement).
pub fn peak_so_far() -> usize {
    PEAK.load(Ordering::Relaxed)
}
