//! Deterministic data-parallel helpers over the rayon pool.
//!
//! Work is cut into chunks whose boundaries depend only on the problem size, never on the number of
//! threads, and partial results are combined in chunk order: results are bit-identical whatever the
//! scheduling.

use rayon::prelude::*;

/// Splits `0..n` into ranges of `chunk` items, runs `f` on each in parallel and returns the results
/// in range order.
pub fn map_chunks<R: Send>(n: usize, chunk: usize, f: impl Fn(std::ops::Range<usize>) -> R + Sync) -> Vec<R> {
    let chunk = chunk.max(1);
    let count = n.div_ceil(chunk);
    (0..count).into_par_iter().map(|i| f(i * chunk..((i + 1) * chunk).min(n))).collect()
}

/// Per-channel sums of `f(row)` contributions: each chunk of rows fills a `width`-long f64 partial,
/// and partials are added in chunk order.
pub fn sum_rows(
    rows: usize,
    width: usize,
    chunk: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let partials = map_chunks(rows, chunk, |r| {
        let mut acc = vec![0.0f64; width];
        f(r, &mut acc);
        acc
    });
    let mut total = vec![0.0f64; width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Rows per chunk so that a chunk holds about `target` values of a `width`-wide matrix.
pub fn rows_per_chunk(width: usize, target: usize) -> usize {
    (target / width.max(1)).max(1)
}
