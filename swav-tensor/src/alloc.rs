//! A caching allocator for CPU tensor storage.
//!
//! A training step allocates the same buffers every iteration (activations, gradients, im2col
//! tiles). Left to the system allocator, large freed buffers go back to the OS and every new one
//! page-faults its memory in again: measured at a quarter of a narrow ResNet's step time. Here freed
//! buffers wait in a pool keyed by their exact length and are handed out again; a step reaches a
//! steady state with no page faults and no allocation churn.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers smaller than this go straight back to the system allocator (cheap to get again).
const MIN_POOLED: usize = 1 << 14;
/// Most memory kept idle in the pool.
const MAX_POOL_BYTES: usize = 3 << 30;

struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// A buffer of `len` values with unspecified (but initialised) contents.
pub fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED {
        let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = guard.as_mut() {
            if let Some(v) = pool.free.get_mut(&len).and_then(Vec::pop) {
                pool.bytes -= len * 4;
                return v;
            }
        }
    }
    vec![0.0; len]
}

/// A zero-filled buffer of `len` values.
pub fn zeros(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// Returns a buffer to the pool (or to the system when the pool is full).
pub fn give(v: Vec<f32>) {
    let len = v.len();
    if len < MIN_POOLED || v.capacity() != len {
        return;
    }
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(|| Pool { free: HashMap::new(), bytes: 0 });
    if pool.bytes + len * 4 <= MAX_POOL_BYTES {
        pool.bytes += len * 4;
        pool.free.entry(len).or_default().push(v);
    }
}

/// Bytes held idle by the pool.
pub fn pooled_bytes() -> usize {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |p| p.bytes)
}
