//! Sinkhorn-Knopp on the CPU: the same passes, tiles and reductions as the CUDA kernels
//! (`cuda/kernels.cu`), so each can stand in for the other when reading the code.
//!
//! * pass 0, `colstats`: per tile of `TILE_ROWS` rows, the column maximum and
//!   `sum_rows exp((x - tile max) / eps)`; the tiles are combined (max, rescaled sums in f64).
//! * passes 1..=iterations, `rows`: per row `a = x - m_k`, its maximum `A_b` and
//!   `e = exp((a - A_b) / eps)` (first pass), `c_b = sum_k e u_k`; then either the tile's column sums
//!   `sum_b e v_b` with `v_b = 1 / (B c_b)` (sweep), or the output row `q = e u / c_b` (last pass).
//!
//! Scaling lives in the vectors `u` (from the column sums) and `v` (per row, used at once); the matrix is
//! never rescaled. One difference from the GPU, where memory is the bottleneck and `exp` is nearly free:
//! here `exp` dominates, so the first row pass stores `e` in the output buffer and later passes read it
//! back instead of recomputing it from the scores (same values, same reductions).
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
        parallel(threads, items, |(((s, mx), sm), b)| *b = !(kern.colstats)(s, k, p.inv_eps, mx, sm));
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

    // Row passes. `q` holds e from the first pass on, and Q after the last.
    let mut u = vec![0f32; k];
    for pass in 1..=p.iterations {
        for (u, &r) in u.iter_mut().zip(&colsum) {
            *u = clamp_scale(p.inv_k / r);
        }
        let args = RowArgs { k, inv_eps: p.inv_eps, inv_b: p.inv_b, colmax: &colmax[..k], u: &u, first: pass == 1 };
        let output = pass == p.iterations;
        let items: Vec<_> =
            scores.chunks(TILE_ROWS * k).zip(q.chunks_mut(TILE_ROWS * k)).zip(part_sum.chunks_mut(k)).collect();
        parallel(threads, items, |((s, qt), ps)| (kern.rows)(&args, s, qt, if output { None } else { Some(ps) }));
        if !output {
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

/// Runs `f` on every item, on `threads` threads (contiguous runs of items per thread, the calling thread
/// taking the first run).
fn parallel<T: Send, F: Fn(T) + Sync>(threads: usize, items: Vec<T>, f: F) {
    let n = items.len();
    if threads <= 1 || n <= 1 {
        items.into_iter().for_each(f);
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
            scope.spawn(move || run.into_iter().for_each(f));
        }
        mine.into_iter().for_each(f);
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

type ColstatsFn = fn(&[f32], usize, f32, &mut [f32], &mut [f32]) -> bool;
type RowsFn = fn(&RowArgs, &[f32], &mut [f32], Option<&mut [f32]>);

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
    unsafe fn rows_avx2(a: &RowArgs, s: &[f32], qt: &mut [f32], part: Option<&mut [f32]>) {
        rows_tile(a, s, qt, part)
    }
    pub(super) fn colstats(s: &[f32], k: usize, inv_eps: f32, tmax: &mut [f32], tsum: &mut [f32]) -> bool {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { colstats_avx2(s, k, inv_eps, tmax, tsum) }
    }
    pub(super) fn rows(a: &RowArgs, s: &[f32], qt: &mut [f32], part: Option<&mut [f32]>) {
        // SAFETY: selected only after `is_x86_feature_detected!("avx2")`.
        unsafe { rows_avx2(a, s, qt, part) }
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

/// A row pass on one tile: `s` its scores, `qt` its rows of the output buffer (holding e after the first
/// pass), `part` its column sums (None on the last pass, which writes Q into `qt`).
#[inline(always)]
fn rows_tile(a: &RowArgs, s: &[f32], qt: &mut [f32], mut part: Option<&mut [f32]>) {
    let k = a.k;
    let m = &a.colmax[..k];
    let u = &a.u[..k];
    if let Some(part) = part.as_deref_mut() {
        part.fill(0.0);
    }
    for (x, e) in s.chunks_exact(k).zip(qt.chunks_exact_mut(k)) {
        if a.first {
            // a = x - m_k (never -inf), its maximum A_b, then e = exp((a - A_b) / eps), 1 at the maximum.
            // Element-wise loops and separate lane-wise reductions: what the compiler vectorises.
            for ((ei, &xi), &mi) in e.iter_mut().zip(x).zip(m) {
                *ei = (sanitize(xi) - mi).max(-f32::MAX);
            }
            let amax = lanes_max(e);
            for ei in e.iter_mut() {
                *ei = exp((*ei - amax) * a.inv_eps);
            }
        }
        // c_b = sum_k e u_k >= SCALE_MIN.
        let mut acc = [0f32; LANES];
        let mut ec = e.chunks_exact(LANES);
        let mut uc = u.chunks_exact(LANES);
        for (ei, ui) in (&mut ec).zip(&mut uc) {
            for l in 0..LANES {
                acc[l] += ei[l] * ui[l];
            }
        }
        for (l, (&ei, &ui)) in ec.remainder().iter().zip(uc.remainder()).enumerate() {
            acc[l] += ei * ui;
        }
        let c = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        match part.as_deref_mut() {
            Some(part) => {
                let v = clamp_scale(a.inv_b / c);
                for (p, &ei) in part.iter_mut().zip(e.iter()) {
                    *p += ei * v;
                }
            }
            None => {
                let w = 1.0 / c;
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
    #[test]
    #[ignore]
    fn time_passes() {
        let (rows, k): (usize, usize) = (256, 3000);
        let s: Vec<f32> = (0..rows * k).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let kern = Kernels::detect();
        let tiles = rows.div_ceil(TILE_ROWS);
        let mut pm = vec![0f32; tiles * k];
        let mut ps = vec![0f32; tiles * k];
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for ((st, mx), sm) in s.chunks(TILE_ROWS * k).zip(pm.chunks_mut(k)).zip(ps.chunks_mut(k)) {
                (kern.colstats)(st, k, 20.0, mx, sm);
            }
            println!("colstats {:?}", t.elapsed());
            let u = vec![1.0 / 3000.0; k];
            let m = vec![1.0f32; k];
            let mut q = vec![0f32; rows * k];
            for first in [true, false] {
                let args = RowArgs { k, inv_eps: 20.0, inv_b: 1.0 / 256.0, colmax: &m, u: &u, first };
                let t = std::time::Instant::now();
                for ((st, qt), p) in s.chunks(TILE_ROWS * k).zip(q.chunks_mut(TILE_ROWS * k)).zip(ps.chunks_mut(k)) {
                    (kern.rows)(&args, st, qt, Some(p));
                }
                println!("rows sweep (first {first}) {:?}", t.elapsed());
            }
            let args = RowArgs { k, inv_eps: 20.0, inv_b: 1.0 / 256.0, colmax: &m, u: &u, first: false };
            let t = std::time::Instant::now();
            for (st, qt) in s.chunks(TILE_ROWS * k).zip(q.chunks_mut(TILE_ROWS * k)) {
                (kern.rows)(&args, st, qt, None);
            }
            println!("rows output {:?}", t.elapsed());
        }
    }
}
