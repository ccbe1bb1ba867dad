//! The official algorithm written the straightforward way, for benchmarks and comparisons only: one
//! thread, `f32`, every normalisation a full pass over the matrix, in the official order, and no max
//! subtraction, so it overflows (NaN) exactly where the official code does (`scores / eps` above ~88).
//! Use [`crate::sinkhorn`] for real work.

use crate::SinkhornError;

/// `distributed_sinkhorn` of the official SwAV code with world size 1, step by step. `scores` is
/// `rows x prototypes` row-major; so is the result (the official code's `Q^T`). Only the length of
/// `scores` is checked.
pub fn official(
    scores: &[f32],
    rows: usize,
    prototypes: usize,
    epsilon: f32,
    iterations: usize,
) -> Result<Vec<f32>, SinkhornError> {
    let (b, k) = (rows, prototypes);
    let n = b.checked_mul(k).filter(|&n| n > 0).ok_or(SinkhornError::Size { rows, prototypes })?;
    if scores.len() != n {
        return Err(SinkhornError::Shape { buffer: "scores", expected: n, actual: scores.len() });
    }
    // Q = exp(out / epsilon).t(): we keep the rows x prototypes layout and sum along the other axis.
    let mut q: Vec<f32> = scores.iter().map(|&s| (s / epsilon).exp()).collect();
    let total: f32 = q.iter().sum();
    q.iter_mut().for_each(|x| *x /= total);
    let mut per_prototype = vec![0f32; k];
    for _ in 0..iterations {
        // sum_of_rows = sum(Q, dim=1); Q /= sum_of_rows; Q /= K
        per_prototype.iter_mut().for_each(|s| *s = 0.0);
        for row in q.chunks(k) {
            for (s, &x) in per_prototype.iter_mut().zip(row) {
                *s += x;
            }
        }
        for row in q.chunks_mut(k) {
            for (x, &s) in row.iter_mut().zip(&per_prototype) {
                *x /= s;
                *x /= k as f32;
            }
        }
        // Q /= sum(Q, dim=0); Q /= B
        for row in q.chunks_mut(k) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| {
                *x /= s;
                *x /= b as f32;
            });
        }
    }
    q.iter_mut().for_each(|x| *x *= b as f32);
    Ok(q)
}
