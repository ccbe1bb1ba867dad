//! Standalone Sinkhorn-Knopp for SwAV cluster assignment, on CPU and CUDA.
//!
//! Given prototype scores (`rows x prototypes`, row-major `f32`: one row per sample), returns the soft
//! assignments `Q` (same shape, every row sums to 1) of SwAV's `distributed_sinkhorn` (Caron et al. 2020):
//!
//! ```text
//! Q = exp(scores / eps)^T                 # K x B
//! Q /= sum(Q)                             # all-reduced
//! repeat iterations:
//!     Q /= row sums (per prototype, all-reduced);  Q /= K
//!     Q /= column sums (per sample, local);         Q /= B      # B = rows x world_size
//! return (Q * B)^T
//! ```
//!
//! ```
//! use swav_sinkhorn::{sinkhorn, Params};
//! let scores = vec![0.9, -0.2, 0.1, 0.3, 0.8, -0.5]; // 3 samples x 2 prototypes
//! let q = sinkhorn(&scores, 3, 2, &Params::default())?;
//! assert!((q[0] + q[1] - 1.0).abs() < 1e-6);
//! # Ok::<(), swav_sinkhorn::SinkhornError>(())
//! ```
//!
//! # How it is computed
//!
//! Every normalisation only multiplies rows or columns, so `Q = diag(v) E diag(u)` for a fixed matrix `E`
//! and two scaling vectors; the matrix is never rescaled in memory. Each step sets one vector from the
//! other: `u_k = 1 / (K sum_b E_bk v_b)` (all-reduced) and `v_b = 1 / (B sum_k E_bk u_k)`. The last column
//! normalisation and the final `* B` give `q_bk = E_bk u_k / sum_k' E_bk' u_k'`, so rows sum to 1 up to
//! rounding. The official total-sum normalisation is a scalar that cancels at the first per-prototype
//! normalisation, so it is skipped. The passes over the matrix:
//!
//! 1. per-prototype maxima `m_k` and the first per-prototype sums `r_k = sum_b exp((s_bk - m_k) / eps)`;
//! 2. `iterations - 1` sweeps: per row, `c_b = sum_k E_bk u_k`, `v_b = 1 / (B c_b)`, and the column sums
//!    `sum_b E_bk v_b` for the next `u`: the column normalisation of one iteration fused with the row
//!    sums of the next;
//! 3. the output pass, `q_bk = E_bk u_k / c_b`.
//!
//! On CUDA (memory-bound) step 1 is one fused read (maxima and sums per tile of rows, combined with
//! rescaling) and `E` is recomputed from the scores in every pass: the scores are read
//! `iterations + 1` times and `Q` written once, by the last pass. On the CPU (`exp`-bound) the maxima come
//! first and `E` is computed once, into the output buffer, and read back by the later passes. Partial
//! sums are per tile of rows and added in a fixed order: results do not depend on the number of threads.
//!
//! # Numerics: shifts that cancel
//!
//! The official code computes `exp(scores / eps)` directly: with eps 0.05 a score of 4.5 already
//! overflows `f32`, and with eps 0.01 a score of 0.9 does. Here `E_bk = exp((s_bk - m_k - A_b) / eps)` with
//! two shifts:
//!
//! * `m_k`, the maximum of prototype `k`'s scores over all samples of all ranks. It multiplies column `k`
//!   by a constant, which the first per-prototype normalisation divides out exactly (`u_k` absorbs it).
//!   It must be the same on every rank: with a per-rank maximum, ranks would add up sums measured in
//!   different units. Hence [`Reducer::all_reduce_max`]: the maxima are all-reduced, in the slot of the
//!   official total sum, so the number of collectives is unchanged (`1 + iterations`). (On CUDA, where
//!   the first sums are taken in the same pass as the maxima, each rank rescales its sums by
//!   `exp((local max - global max) / eps)` between the two all-reduces.)
//! * `A_b = max_k (s_bk - m_k)`, per sample, local. It multiplies row `b` by a constant, which only
//!   rescales `v_b`, and every `v_b` is recomputed from scratch by each column normalisation; the first
//!   per-prototype sums use the unshifted rows (`v = exp(A_b / eps)`, where an underflow to 0 only drops a
//!   contribution below 1e-38 of the column's best). With it every row of `E` holds a 1, so no sample's sum can
//!   underflow to 0 even when its scores are far below every prototype's best (eps 0.01, scores near
//!   +-1), and every column holds a 1 at its best sample, so no prototype's sum can either.
//!
//! So the result agrees with the official one wherever that is finite (relative error about 1e-7 on the
//! reference cases) and stays finite where it is not. Scaling factors are clamped to `[1e-30, 1e30]`,
//! which only matters for degenerate inputs, and guarantees that no sum is 0 or infinite: the output
//! never holds NaN or infinity. Non-finite scores are an error ([`SinkhornError::NonFinite`]).
//!
//! # Distributed runs
//!
//! Each rank passes its own rows and a [`Reducer`] (host) or [`cuda::DeviceReducer`] (device); `B` is
//! `rows x world_size` (every rank has the same number of rows, as in the official code). Column
//! normalisation stays local. See [`LocalGroup`] for ranks that are threads, [`cuda::NcclReducer`] for
//! GPUs.

#![warn(missing_docs)]

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod math;
mod reduce;

pub mod baseline;
pub mod reference;

pub use error::SinkhornError;

/// The README's example, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExample;
pub use reduce::{LocalGroup, LocalRank, Reducer, SingleProcess};

/// Parameters of a Sinkhorn call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Entropy regularisation: smaller is sharper. SwAV: 0.05 (0.01-0.03 for small images).
    pub epsilon: f32,
    /// Sinkhorn-Knopp iterations (each one normalises prototypes, then samples). SwAV: 3.
    pub iterations: usize,
    /// CPU worker threads; 0 chooses (one for small inputs, all cores for large ones). Ignored on CUDA.
    pub threads: usize,
}

impl Default for Params {
    /// SwAV's defaults: epsilon 0.05, 3 iterations, automatic threads.
    fn default() -> Self {
        Params { epsilon: 0.05, iterations: 3, threads: 0 }
    }
}

impl Params {
    /// `epsilon` and `iterations`, automatic threads.
    pub fn new(epsilon: f32, iterations: usize) -> Self {
        Params { epsilon, iterations, threads: 0 }
    }
}

/// Soft assignments of one process's scores (`rows x prototypes`, row-major) to prototypes, on the CPU.
/// Returns `Q`, same shape, rows summing to 1.
pub fn sinkhorn(scores: &[f32], rows: usize, prototypes: usize, params: &Params) -> Result<Vec<f32>, SinkhornError> {
    let mut q = vec![0f32; Problem::new(rows, prototypes, params, 1)?.elements];
    sinkhorn_into(scores, rows, prototypes, params, &SingleProcess, &mut q)?;
    Ok(q)
}

/// Like [`sinkhorn`], for one rank of a distributed run (or [`SingleProcess`]), writing into `q`
/// (`rows x prototypes`). Every rank must call it with the same `prototypes`, `rows` and `params`.
pub fn sinkhorn_into(
    scores: &[f32],
    rows: usize,
    prototypes: usize,
    params: &Params,
    reducer: &dyn Reducer,
    q: &mut [f32],
) -> Result<(), SinkhornError> {
    cpu::sinkhorn_into(scores, rows, prototypes, params, reducer, q)
}

/// Runs a distributed Sinkhorn in one process: `scores[r]` are rank `r`'s rows (each `rows x prototypes`);
/// the ranks are threads joined by a [`LocalGroup`]. Returns each rank's `Q`. Meant for checking
/// distributed reference cases and for tests; it equals the single-process result on all rows stacked.
pub fn sinkhorn_ranks(
    scores: &[&[f32]],
    rows: usize,
    prototypes: usize,
    params: &Params,
) -> Result<Vec<Vec<f32>>, SinkhornError> {
    let world = scores.len();
    let p = Problem::new(rows, prototypes, params, world.max(1))?;
    for s in scores {
        p.check_len("scores", s.len())?;
    }
    let ranks = LocalGroup::new(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(scores)
            .map(|(rank, s)| {
                scope.spawn(move || {
                    let mut q = vec![0f32; p.elements];
                    sinkhorn_into(s, rows, prototypes, params, rank, &mut q).map(|()| q)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(SinkhornError::Reduce("a rank's thread panicked".into()))))
            .collect()
    })
}

/// Relative L2 error `||got - want|| / ||want||` (in f64), the measure used by the reference cases.
/// Infinite when the lengths differ or `got` is not finite.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// A validated call: sizes and the constants every implementation uses (computed once, in f64, so that
/// CPU and CUDA use the same bits).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) rows: usize,
    pub(crate) prototypes: usize,
    pub(crate) world_size: usize,
    pub(crate) iterations: usize,
    pub(crate) elements: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) epsilon: f32,
    pub(crate) inv_eps: f32,
    pub(crate) inv_k: f32,
    pub(crate) inv_b: f32,
}

impl Problem {
    pub(crate) fn new(
        rows: usize,
        prototypes: usize,
        params: &Params,
        world_size: usize,
    ) -> Result<Problem, SinkhornError> {
        let size_err = SinkhornError::Size { rows, prototypes };
        if rows == 0 || prototypes == 0 {
            return Err(size_err);
        }
        let elements = rows.checked_mul(prototypes).filter(|&n| n <= isize::MAX as usize / 4).ok_or(size_err)?;
        if world_size == 0 {
            return Err(SinkhornError::Reduce("the reducer reports a world size of 0".into()));
        }
        let b = rows.checked_mul(world_size).ok_or(SinkhornError::Size { rows, prototypes })?;
        let eps = params.epsilon;
        let inv_eps = (1.0 / eps as f64) as f32;
        if !(eps.is_finite() && eps > 0.0 && inv_eps.is_finite()) {
            return Err(SinkhornError::Epsilon(eps));
        }
        if params.iterations == 0 {
            return Err(SinkhornError::Iterations);
        }
        Ok(Problem {
            rows,
            prototypes,
            world_size,
            iterations: params.iterations,
            elements,
            epsilon: eps,
            inv_eps,
            inv_k: (1.0 / prototypes as f64) as f32,
            inv_b: (1.0 / b as f64) as f32,
        })
    }

    pub(crate) fn check_len(&self, buffer: &'static str, actual: usize) -> Result<(), SinkhornError> {
        if actual == self.elements {
            Ok(())
        } else {
            Err(SinkhornError::Shape { buffer, expected: self.elements, actual })
        }
    }
}
