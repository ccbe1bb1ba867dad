//! Per-thread scratch buffers for the tiles of the CPU kernels, reused across calls so that a
//! training step does not allocate and page-fault its im2col buffers again and again.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with two scratch slices of `a` and `b` values (contents unspecified).
/// Must not be called re-entrantly on one thread (the tile kernels call no rayon work inside).
pub fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < a + b {
            buf.resize(a + b, 0.0);
        }
        let (first, rest) = buf.split_at_mut(a);
        f(first, &mut rest[..b])
    })
}

/// A raw pointer that may cross threads; used where parallel tiles write disjoint, non-contiguous
/// rows of one output buffer (each use states why the rows are disjoint).
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the raw field).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
