//! Sinkhorn-Knopp on the CPU: the same passes, tiles and reductions as the CUDA kernels
//! (`cuda/kernels.cu`), so each can stand in for the other when reading the code.
//!
//! * pass 0, `colstats`: per tile of `TILE_ROWS` rows, the column maximum and
//!   `sum_rows exp((x - tile max) / eps)`; the tiles are combined (max, rescaled sums in f64).
//! * passes 1..=iterations, `rows`: per row `a = x - m_k`, its maximum `A_b` (first pass only, stored),
//!   `e = exp((a - A_b) / eps)`, `c_b = sum_k e u_k`; then either the tile's column sums `sum_b e v_b` with
//!   `v_b = 1 / (B c_b)` (sweep), or the output row `q = e u / c_b` (last pass).
//!
//! The matrix is never written until the output: scaling lives in the vectors `u` (from the column sums)
//! and `v` (per row, used at once). Each pass reads the scores once; `exp` is recomputed rather than stored.
//! Tiles have a fixed size, so the result is bit-identical whatever the number of threads.

use crate::math::{clamp_scale, exp, not_finite, sanitize};
use crate::{Params, Problem, Reducer, SinkhornError};

/// Rows per tile (the unit of work and of partial column sums).
pub(crate) const TILE_ROWS: usize = 16;
/// Columns per chunk in `colstats`: a tile's chunk (16 x 256 floats) stays in L1 between its two sweeps.
const COL_CHUNK: usize = 256;
/// Below this many elements one thread is faster than starting more.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
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

    // Pass 0: column statistics per tile.
    let mut part_max = vec![0f32; tiles * k];
    let mut part_sum = vec![0f32; tiles * k];
    let mut bad = vec![false; tiles];
    {
        let items: Vec<_> = scores
            .chunks(TILE_ROWS * k)
            .zip(part_max.chunks_mut(k))
            .zip(part_sum.chunks_mut(k))
            .zip(bad.iter_mut())
            .collect();
        parallel(threads, items, 0, |(((s, mx), sm), b), _| *b = !(kern.colstats)(s, k, p.inv_eps, mx, sm));
    }
    // Combine the tiles: m_k = max over tiles, r_k = sum_j s_jk exp((M_jk - m_k) / eps). colmax[k] is the
    // "some score was not finite" flag, all-reduced (max) with the maxima so that every rank sees it.
    let local_bad = bad.iter().any(|&b| b);
    let mut colmax = vec![-f32::MAX; k + 1];
    for tile in part_max.chunks(k) {
        for (m, &t) in colmax.iter_mut().zip(tile) {
            *m = m.max(t);
        }
    }
    colmax[k] = if local_bad { 1.0 } else { 0.0 };
    let mut acc = vec![0f64; k];
    for (tmax, tsum) in part_max.chunks(k).zip(part_sum.chunks(k)) {
        for (((a, &m), &t), &s) in acc.iter_mut().zip(&colmax).zip(tmax).zip(tsum) {
            *a += (s * exp((t - m) * p.inv_eps)) as f64;
        }
    }
    let mut colsum: Vec<f32> = acc.iter().map(|&a| a as f32).collect();
    if p.world_size > 1 {
        let local_max = colmax[..k].to_vec();
        reducer.all_reduce_max(&mut colmax)?;
        if colmax[k] != 0.0 {
            return Err(SinkhornError::NonFinite { this_rank: local_bad });
        }
        // Sums were taken relative to this rank's maxima; move them to the global ones, then add up.
        for ((s, &l), &m) in colsum.iter_mut().zip(&local_max).zip(&colmax) {
            *s *= exp((l - m) * p.inv_eps);
        }
        reducer.all_reduce_sum(&mut colsum)?;
    } else if local_bad {
        return Err(SinkhornError::NonFinite { this_rank: true });
    }

    // Row passes.
    let mut rowmax = vec![0f32; rows];
    let mut u = vec![0f32; k];
    for pass in 1..=p.iterations {
        for (u, &r) in u.iter_mut().zip(&colsum) {
            *u = clamp_scale(p.inv_k / r);
        }
        let args = RowArgs { k, inv_eps: p.inv_eps, inv_b: p.inv_b, colmax: &colmax[..k], u: &u, first: pass == 1 };
        if pass == p.iterations {
            let items: Vec<_> =
                scores.chunks(TILE_ROWS * k).zip(rowmax.chunks_mut(TILE_ROWS)).zip(q.chunks_mut(TILE_ROWS * k)).collect();
            parallel(threads, items, k, |((s, rm), qt), e| (kern.rows)(&args, s, rm, RowOut::Output(qt), e));
        } else {
            let items: Vec<_> =
                scores.chunks(TILE_ROWS * k).zip(rowmax.chunks_mut(TILE_ROWS)).zip(part_sum.chunks_mut(k)).collect();
            parallel(threads, items, k, |((s, rm), ps), e| (kern.rows)(&args, s, rm, RowOut::Sweep(ps), e));
            acc.iter_mut().for_each(|a| *a = 0.0);
            for tile in part_sum.chunks(k) {
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

/// Runs `f(item, scratch)` on every item, on `threads` threads (contiguous runs of items per thread, the
/// calling thread taking the first run). Each thread has its own zeroed scratch of `scratch_len` floats.
fn parallel<T: Send, F: Fn(T, &mut [f32]) + Sync>(threads: usize, items: Vec<T>, scratch_len: usize, f: F) {
    let n = items.len();
    if threads <= 1 || n <= 1 {
        let mut scratch = vec![0f32; scratch_len];
        items.into_iter().for_each(|it| f(it, &mut scratch));
        return;
    }
    let threads = threads.min(n);
    let mut runs: Vec<Vec<T>> = (0..threads).map(|_| Vec::with_capacity(n / threads + 1)).collect();
    for (i, it) in items.into_iter().enumerate() {
        runs[i * threads / n].push(it);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut runs = runs.into_iter();
        let mine = runs.next().unwrap_or_default();
        for run in runs {
            scope.spawn(move || {
                let mut scratch = vec![0f32; scratch_len];
                run.into_iter().for_each(|it| f(it, &mut scratch));
            });
        }
        let mut scratch = vec![0f32; scratch_len];
        mine.into_iter().for_each(|it| f(it, &mut scratch));
    });
}

pub(crate) struct RowArgs<'a> {
    k: usize,
    inv_eps: f32,
    inv_b: f32,
    colmax: &'a [f32],
    u: &'a [f32],
    first: bool,
}

pub(crate) enum RowOut<'a> {
    /// This tile's column sums `sum_b e_bk v_b` (length k).
    Sweep(&'a mut [f32]),
    /// The tile's output rows (`rows x k`).
    Output(&'a mut [f32]),
}

type ColstatsFn = fn(&[f32], usize, f32, &mut [f32], &mut [f32]) -> bool;
type RowsFn = fn(&RowArgs, &[f32], &mut [f32], RowOut, &mut [f32]);

/// The two tile kernels, compiled twice: for the baseline target and, on x86-64, for AVX2 (chosen at run
/// time). Both give bit-identical results (same operations, no fused multiply-add).
#[derive(Clone, Copy)]
struct Kernels {
    colstats: ColstatsFn,
    rows: RowsFn,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernels { colstats: avx2::colstats, rows: avx2::rows };
            }
        }
        Kernels { colstats: colstats_tile, rows: rows_tile }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2")]
    unsafe fn colstats_avx2(s: &[f32], k: usize, inv_eps: f32, tmax: &mut [f32], tsum: &mut [f32]) -> bool {
        colstats_tile(s, k, inv_eps, tmax, tsum)
    }
    #[target_feature(enable = "avx2")]
    unsafe fn rows_avx2(a: &RowArgs, s: &[f32], rowmax: &mut [f32], out: RowOut, e: &mut [f32]) {
        rows_tile(a, s, rowmax, out, e)
    }
    pub(super) fn colstats(s: &[f32], k: usize, inv_eps: f32, tmax: &mut [f32], tsum: &mut [f32]) -> bool {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { colstats_avx2(s, k, inv_eps, tmax, tsum) }
    }
    pub(super) fn rows(a: &RowArgs, s: &[f32], rowmax: &mut [f32], out: RowOut, e: &mut [f32]) {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { rows_avx2(a, s, rowmax, out, e) }
    }
}

/// Pass 0 on one tile (`s` = its rows): column maxima into `tmax`, `sum exp((x - max) / eps)` into `tsum`.
/// Returns true when every score is finite.
#[inline(always)]
fn colstats_tile(s: &[f32], k: usize, inv_eps: f32, tmax: &mut [f32], tsum: &mut [f32]) -> bool {
    let n_rows = s.len() / k;
    let mut bad = 0u32;
    let mut c0 = 0;
    while c0 < k {
        let c1 = (c0 + COL_CHUNK).min(k);
        let mx = &mut tmax[c0..c1];
        mx.fill(-f32::MAX);
        for r in 0..n_rows {
            for (m, &x) in mx.iter_mut().zip(&s[r * k + c0..r * k + c1]) {
                bad |= not_finite(x) as u32;
                *m = m.max(sanitize(x));
            }
        }
        let sm = &mut tsum[c0..c1];
        sm.fill(0.0);
        for r in 0..n_rows {
            for ((acc, &m), &x) in sm.iter_mut().zip(mx.iter()).zip(&s[r * k + c0..r * k + c1]) {
                *acc += exp((sanitize(x) - m) * inv_eps);
            }
        }
        c0 = c1;
    }
    bad == 0
}

/// A row pass on one tile. `e` is scratch of at least k floats.
#[inline(always)]
fn rows_tile(a: &RowArgs, s: &[f32], rowmax: &mut [f32], mut out: RowOut, e: &mut [f32]) {
    let k = a.k;
    let e = &mut e[..k];
    let m = &a.colmax[..k];
    let u = &a.u[..k];
    if let RowOut::Sweep(part) = &mut out {
        part.fill(0.0);
    }
    for (r, x) in s.chunks_exact(k).enumerate() {
        // a = x - m_k (never -inf), and the row maximum A_b.
        let mut mx = [-f32::MAX; LANES];
        {
            let mut ec = e.chunks_exact_mut(LANES);
            let mut xc = x.chunks_exact(LANES);
            let mut mc = m.chunks_exact(LANES);
            for ((ei, xi), mi) in (&mut ec).zip(&mut xc).zip(&mut mc) {
                for l in 0..LANES {
                    let v = (sanitize(xi[l]) - mi[l]).max(-f32::MAX);
                    ei[l] = v;
                    mx[l] = mx[l].max(v);
                }
            }
            for (l, ((ei, &xi), &mi)) in
                ec.into_remainder().iter_mut().zip(xc.remainder()).zip(mc.remainder()).enumerate()
            {
                let v = (sanitize(xi) - mi).max(-f32::MAX);
                *ei = v;
                mx[l] = mx[l].max(v);
            }
        }
        let amax = if a.first {
            let v = mx.iter().fold(-f32::MAX, |acc, &x| acc.max(x));
            rowmax[r] = v;
            v
        } else {
            rowmax[r]
        };
        // e = exp((a - A_b) / eps) (1 at the row maximum), c_b = sum_k e u_k >= SCALE_MIN.
        let mut acc = [0f32; LANES];
        {
            let mut ec = e.chunks_exact_mut(LANES);
            let mut uc = u.chunks_exact(LANES);
            for (ei, ui) in (&mut ec).zip(&mut uc) {
                for l in 0..LANES {
                    let v = exp((ei[l] - amax) * a.inv_eps);
                    ei[l] = v;
                    acc[l] += v * ui[l];
                }
            }
            for (l, (ei, &ui)) in ec.into_remainder().iter_mut().zip(uc.remainder()).enumerate() {
                let v = exp((*ei - amax) * a.inv_eps);
                *ei = v;
                acc[l] += v * ui;
            }
        }
        let c = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        match &mut out {
            RowOut::Sweep(part) => {
                let v = clamp_scale(a.inv_b / c);
                for (p, &ei) in part.iter_mut().zip(e.iter()) {
                    *p += ei * v;
                }
            }
            RowOut::Output(qt) => {
                let w = 1.0 / c;
                for ((qi, &ei), &ui) in qt[r * k..(r + 1) * k].iter_mut().zip(e.iter()).zip(u) {
                    *qi = ei * ui * w;
                }
            }
        }
    }
}
