//! Sinkhorn-Knopp on the CPU. On a CPU `exp` is the bottleneck, so it is computed once per element:
//!
//! * `colmax`: per tile of `TILE_ROWS` rows, the column maxima (and a non-finite flag); combined into
//!   `m_k` and all-reduced (max).
//! * `exp`: per row `a = x - m_k` (never -inf), `A_b = max_k a`, `e = exp((a - A_b) / eps)` (1 at the row
//!   maximum), stored in the output buffer; the tile's column sums `sum_b e_bk exp(A_b / eps)` (the
//!   unshifted rows: the first per-prototype sums of the official algorithm, up to the factor `m_k`).
//! * `iterations` row passes over `e`: `c_b = sum_k e u_k`, then either the tile's column sums
//!   `sum_b e v_b` with `v_b = 1 / (B c_b)` (sweep), or, in the last one, `q = e u / c_b` in place.
//!
//! Between passes, the tiles' column sums are added in f64 in tile order, all-reduced, and turned into
//! `u_k = 1 / (K r_k)`. Scaling lives in `u` and `v`; the matrix `e` is never rescaled until the output.
//! Tiles have a fixed size, so the result is bit-identical whatever the number of threads.
//!
//! The CUDA kernels (`cuda/kernels.cu`) compute the same quantities with the same tiles and reductions,
//! but are limited by memory, not `exp`: they fuse the maxima with the first sums (one read fewer) and
//! recompute `e` from the scores in every pass instead of storing it.

use crate::math::{clamp_scale, exp, not_finite, sanitize};
use crate::{Params, Problem, Reducer, SinkhornError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Rows per tile (the unit of work and of partial column sums).
pub(crate) const TILE_ROWS: usize = 16;
/// Below this many elements (4M; 256 x 3000 takes ~1.5 ms on one core) one thread is used: starting
/// threads for every pass costs little on an idle machine, but on a busy one (data loader threads)
/// each pass can wait milliseconds for a time slice.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 22;
/// Independent accumulators in row reductions (fixed, so results do not depend on the SIMD width).
const LANES: usize = 8;

pub(crate) fn sinkhorn_into(
    scores: &[f32],
    rows: usize,
    prototypes: usize,
    params: &Params,
    reducer: &dyn Reducer,
    q: &mut [f32],
) -> Result<(), SinkhornError> {
    let p = Problem::new(rows, prototypes, params, reducer.world_size())?;
    p.check_len("scores", scores.len())?;
    p.check_len("q", q.len())?;
    let k = p.prototypes;
    let tiles = rows.div_ceil(TILE_ROWS);
    let threads = choose_threads(params.threads, p.elements, tiles);
    let kern = Kernels::detect();
    let mut part = vec![0f32; tiles * k];

    // Column maxima. colmax[k] is the "some score was not finite" flag, all-reduced (max) with the maxima
    // so that every rank sees it and returns the error at the same point.
    let mut bad = vec![false; tiles];
    {
        let items: Vec<_> = scores.chunks(TILE_ROWS * k).zip(part.chunks_mut(k)).zip(bad.iter_mut()).collect();
        parallel(threads, items, |((s, mx), b)| *b = !(kern.colmax)(s, k, mx));
    }
    let local_bad = bad.iter().any(|&b| b);
    let mut colmax = vec![-f32::MAX; k + 1];
    for tile in part.chunks(k) {
        for (m, &t) in colmax.iter_mut().zip(tile) {
            *m = m.max(t);
        }
    }
    colmax[k] = if local_bad { 1.0 } else { 0.0 };
    if p.world_size > 1 {
        reducer.all_reduce_max(&mut colmax)?;
    }
    if colmax[k] != 0.0 {
        return Err(SinkhornError::NonFinite { this_rank: local_bad });
    }

    // e into q, the first column sums, then the iterations.
    let mut colsum = vec![0f32; k];
    let mut acc = vec![0f64; k];
    let mut u = vec![0f32; k];
    for pass in 0..=p.iterations {
        let mode = match pass {
            0 => Mode::Exp,
            _ if pass == p.iterations => Mode::Output,
            _ => Mode::Sweep,
        };
        if pass > 0 {
            for (u, &r) in u.iter_mut().zip(&colsum) {
                *u = clamp_scale(p.inv_k / r);
            }
        }
        let args = RowArgs { k, inv_eps: p.inv_eps, inv_b: p.inv_b, colmax: &colmax[..k], u: &u, mode };
        let items: Vec<_> =
            scores.chunks(TILE_ROWS * k).zip(q.chunks_mut(TILE_ROWS * k)).zip(part.chunks_mut(k)).collect();
        parallel(threads, items, |((s, qt), ps)| (kern.rows)(&args, s, qt, ps));
        if mode != Mode::Output {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for tile in part.chunks(k) {
                for (a, &t) in acc.iter_mut().zip(tile) {
                    *a += t as f64;
                }
            }
            for (s, &a) in colsum.iter_mut().zip(&acc) {
                *s = a as f32;
            }
            if p.world_size > 1 {
                reducer.all_reduce_sum(&mut colsum)?;
            }
        }
    }
    Ok(())
}

fn choose_threads(requested: usize, elements: usize, tiles: usize) -> usize {
    let wanted = if requested > 0 {
        requested
    } else if elements < PARALLEL_MIN_ELEMENTS {
        1
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    };
    wanted.clamp(1, tiles.max(1))
}

/// Runs `f` on every item, on up to `threads` threads including the calling one. Items are claimed one at
/// a time, so a thread that the OS starts late (a busy machine) simply gets fewer; which thread runs an
/// item never changes the result.
fn parallel<T: Send, F: Fn(T) + Sync>(threads: usize, items: Vec<T>, f: F) {
    let n = items.len();
    if threads <= 1 || n <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|it| Mutex::new(Some(it))).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = slots.get(i) else { break };
        let item = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(item) = item {
            f(item);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.min(n) {
            scope.spawn(work);
        }
        work();
    });
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Scores -> e (into q); column sums of the unshifted rows.
    Exp,
    /// e -> column sums of e v.
    Sweep,
    /// e -> Q, in place.
    Output,
}

struct RowArgs<'a> {
    k: usize,
    inv_eps: f32,
    inv_b: f32,
    colmax: &'a [f32],
    u: &'a [f32],
    mode: Mode,
}

type ColmaxFn = fn(&[f32], usize, &mut [f32]) -> bool;
type RowsFn = fn(&RowArgs, &[f32], &mut [f32], &mut [f32]);

/// The two tile kernels, compiled twice: for the baseline target and, on x86-64, for AVX2 (chosen at run
/// time). Both give bit-identical results (same operations, no fused multiply-add).
#[derive(Clone, Copy)]
struct Kernels {
    colmax: ColmaxFn,
    rows: RowsFn,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernels { colmax: avx2::colmax, rows: avx2::rows };
            }
        }
        Kernels { colmax: colmax_tile, rows: rows_tile }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2")]
    unsafe fn colmax_avx2(s: &[f32], k: usize, tmax: &mut [f32]) -> bool {
        colmax_tile(s, k, tmax)
    }
    #[target_feature(enable = "avx2")]
    unsafe fn rows_avx2(a: &RowArgs, s: &[f32], qt: &mut [f32], part: &mut [f32]) {
        rows_tile(a, s, qt, part)
    }
    pub(super) fn colmax(s: &[f32], k: usize, tmax: &mut [f32]) -> bool {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { colmax_avx2(s, k, tmax) }
    }
    pub(super) fn rows(a: &RowArgs, s: &[f32], qt: &mut [f32], part: &mut [f32]) {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { rows_avx2(a, s, qt, part) }
    }
}

/// Column maxima of one tile (`s` = its rows) into `tmax`. Returns true when every score is finite.
#[inline(always)]
fn colmax_tile(s: &[f32], k: usize, tmax: &mut [f32]) -> bool {
    let mut bad = 0u32;
    tmax.fill(-f32::MAX);
    for row in s.chunks_exact(k) {
        for (m, &x) in tmax.iter_mut().zip(row) {
            bad |= not_finite(x) as u32;
            *m = m.max(sanitize(x));
        }
    }
    bad == 0
}

/// Maximum of `v` (at least -MAX), lane-wise.
#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let mut mx = [-f32::MAX; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        mx[l] = mx[l].max(x);
    }
    mx.iter().fold(-f32::MAX, |acc, &x| acc.max(x))
}

/// `sum_k a_k b_k`, lane-wise, in a fixed order.
#[inline(always)]
fn lanes_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ac = a.chunks_exact(LANES);
    let mut bc = b.chunks_exact(LANES);
    for (ai, bi) in (&mut ac).zip(&mut bc) {
        for l in 0..LANES {
            acc[l] += ai[l] * bi[l];
        }
    }
    for (l, (&ai, &bi)) in ac.remainder().iter().zip(bc.remainder()).enumerate() {
        acc[l] += ai * bi;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// A row pass on one tile: `s` its scores, `qt` its rows of the output buffer (e after the exp pass, Q
/// after the output pass), `part` its column sums (not touched by the output pass). Loops are element-wise
/// with separate lane-wise reductions: that is what the compiler vectorises.
#[inline(always)]
fn rows_tile(a: &RowArgs, s: &[f32], qt: &mut [f32], part: &mut [f32]) {
    let k = a.k;
    let u = &a.u[..k];
    if a.mode != Mode::Output {
        part.fill(0.0);
    }
    for (x, e) in s.chunks_exact(k).zip(qt.chunks_exact_mut(k)) {
        match a.mode {
            Mode::Exp => {
                for ((ei, &xi), &mi) in e.iter_mut().zip(x).zip(&a.colmax[..k]) {
                    *ei = (sanitize(xi) - mi).max(-f32::MAX);
                }
                let amax = lanes_max(e);
                for ei in e.iter_mut() {
                    *ei = exp((*ei - amax) * a.inv_eps);
                }
                // The unshifted row is e exp(A_b / eps); samples far below every prototype's best
                // underflow to 0 here, which is negligible against the 1 that each column's best holds.
                let w = exp(amax * a.inv_eps);
                for (p, &ei) in part.iter_mut().zip(e.iter()) {
                    *p += ei * w;
                }
            }
            Mode::Sweep => {
                // v_b = 1 / (B c_b), c_b = sum_k e u_k >= SCALE_MIN (e is 1 at the row maximum).
                let v = clamp_scale(a.inv_b / lanes_dot(e, u));
                for (p, &ei) in part.iter_mut().zip(e.iter()) {
                    *p += ei * v;
                }
            }
            Mode::Output => {
                let w = 1.0 / lanes_dot(e, u);
                for (ei, &ui) in e.iter_mut().zip(u) {
                    *ei = *ei * ui * w;
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Time of each pass on 256 x 3000 (`cargo test --release -p swav-sinkhorn -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn time_passes() {
        let (rows, k): (usize, usize) = (256, 3000);
        let s: Vec<f32> = (0..rows * k).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let kern = Kernels::detect();
        let mut part = vec![0f32; rows.div_ceil(TILE_ROWS) * k];
        let mut q = vec![0f32; rows * k];
        let u = vec![1.0 / 3000.0; k];
        let m = vec![1.0f32; k];
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for (st, mx) in s.chunks(TILE_ROWS * k).zip(part.chunks_mut(k)) {
                (kern.colmax)(st, k, mx);
            }
            print!("colmax {:?}", t.elapsed());
            for mode in [Mode::Exp, Mode::Sweep, Mode::Output] {
                let args = RowArgs { k, inv_eps: 20.0, inv_b: 1.0 / 256.0, colmax: &m, u: &u, mode };
                let t = std::time::Instant::now();
                for ((st, qt), p) in s.chunks(TILE_ROWS * k).zip(q.chunks_mut(TILE_ROWS * k)).zip(part.chunks_mut(k)) {
                    (kern.rows)(&args, st, qt, p);
                }
                print!(", {mode:?} {:?}", t.elapsed());
            }
            println!();
        }
    }
}
