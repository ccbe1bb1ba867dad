//! Winograd convolution (Lavin & Gray 2016) for 3x3, stride-1, padding-1 layers, which hold most of a
//! ResNet's multiplications. An output tile of `m x m` pixels comes from an `a x a` input tile
//! (`a = m + 2`):  `Y = A^T [ (G g G^T) . (B^T d B) ] A`,  so each of the `a^2` positions of the
//! transformed tile is one GEMM over channels, and a tile costs `a^2` instead of `9 m^2`
//! multiplications per channel pair: 2.25x fewer with F(2x2, 3x3), 4x with F(4x4, 3x3).
//!
//! All three passes use it:
//! - forward: `V = B^T d B` per input tile, `M[p] = V[p] . U[p]` (U = transformed weights, one
//!   `cin x cout` matrix per position p), `Y = A^T M A`;
//! - data gradient: the forward with the kernel flipped and in/out swapped (stride 1, padding 1);
//! - weight gradient: `dU[p] += V[p]^T . dM[p]` with `dM = A dY A^T` per output tile, then
//!   `dg = G^T dU G`.
//!
//! Tiles are processed in blocks whose transformed matrices stay in cache; blocks run in parallel and
//! weight-gradient partial sums are combined in a fixed order (deterministic). Where the transformed
//! weights outweigh the tiles (few pixels, many channels), all tiles are transformed first and each
//! position is one GEMM over all of them instead, so that the weights are packed once.
//! The transforms are written once and compiled per instruction set (`simd_fn!`): every level gives
//! the same bits, and the tests compare each with the baseline.
//! Accuracy: F(2,3) is within float32 rounding of direct convolution; F(4,3) loses about one more
//! decimal digit (its transforms have coefficients up to 8), still well within the reference
//! tolerances.

use rayon::prelude::*;
use swav_core::simd_fn;

use super::conv::ConvGeom;
use super::conv_plan::{ConvKernel, ConvPlan, ConvShape};
use super::scratch::{with_scratch, SharedMut};
use crate::matmul::{matmul_in, MatMut, MatRef, MulPrecision, Threads};

/// Transform matrices of one F(m x m, 3 x 3) variant (row-major).
pub struct Variant {
    /// Output tile size.
    pub m: usize,
    /// Input tile size, m + 2.
    pub a: usize,
    /// `a x a`
    bt: &'static [f64],
    /// `a x 3`
    g: &'static [f64],
    /// `m x a`
    at: &'static [f64],
}

/// F(2x2, 3x3): 2x2 output tiles from 4x4 input tiles, 16 instead of 36 multiplications per tile and
/// channel pair (2.25x fewer), within float32 rounding of a direct convolution.
pub static F2: Variant = Variant {
    m: 2,
    a: 4,
    bt: &[1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 1.0, 0.0, -1.0],
    g: &[1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0.0, 0.0, 1.0],
    at: &[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, -1.0, -1.0],
};

/// F(4x4, 3x3): 4x4 output tiles from 6x6 input tiles, 36 instead of 144 multiplications per tile and
/// channel pair (4x fewer), about one decimal digit less accurate than F(2x2, 3x3).
pub static F4: Variant = Variant {
    m: 4,
    a: 6,
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0, //
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0, //
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0, //
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0, //
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0, //
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    g: &[
        1.0 / 4.0,
        0.0,
        0.0, //
        -1.0 / 6.0,
        -1.0 / 6.0,
        -1.0 / 6.0, //
        -1.0 / 6.0,
        1.0 / 6.0,
        -1.0 / 6.0, //
        1.0 / 24.0,
        1.0 / 12.0,
        1.0 / 6.0, //
        1.0 / 24.0,
        -1.0 / 12.0,
        1.0 / 6.0, //
        0.0,
        0.0,
        1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0, //
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0, //
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0, //
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

/// Fewest input and output channels for which Winograd is used.
pub const MIN_CHANNELS: usize = 32;

/// Which convolution algorithms a convolution may use; each call is given one (the layers carry it,
/// and a training run records it in its configuration, because results differ in the last bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConvAlgorithm {
    /// Winograd F(4,3) or F(2,3) where it needs fewer multiplications, im2col GEMM elsewhere.
    #[default]
    Auto,
    /// Only Winograd F(2,3) (more accurate than F(4,3)), im2col GEMM elsewhere.
    Winograd2,
    /// im2col GEMM everywhere: the float32 arithmetic of a direct convolution.
    Direct,
    /// One kernel wherever it applies, im2col GEMM elsewhere.
    Only(ConvKernel),
    /// Chosen by measurement on this machine: a training run measures its layers' shapes once
    /// ([`conv_plan`](super::conv_plan)), records the plan and gives its layers `Planned`. A convolution
    /// given `Measured` itself chooses as `Auto`.
    Measured,
    /// A measured plan; shapes it does not hold choose as `Auto`.
    Planned(&'static ConvPlan),
}

impl ConvAlgorithm {
    /// The name used on the command line and in configurations.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgorithm::Auto => "auto",
            ConvAlgorithm::Winograd2 => "winograd2",
            ConvAlgorithm::Direct => "direct",
            ConvAlgorithm::Only(k) => k.name(),
            ConvAlgorithm::Measured | ConvAlgorithm::Planned(_) => "measured",
        }
    }
}

impl std::fmt::Display for ConvAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ConvAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ConvAlgorithm::Auto),
            "winograd2" => Ok(ConvAlgorithm::Winograd2),
            "direct" => Ok(ConvAlgorithm::Direct),
            "measured" => Ok(ConvAlgorithm::Measured),
            other => other.parse::<ConvKernel>().map(ConvAlgorithm::Only).map_err(|_| {
                format!(
                    "unknown convolution algorithm `{other}` (auto, winograd2, direct, measured, im2col, winograd-f2, \
                     winograd-f4)"
                )
            }),
        }
    }
}

/// The cheapest way to compute a convolution allowed by `algorithm`: Winograd F(2,3) or F(4,3), or
/// `None` (im2col GEMM). Counts the multiplications of each, with a margin for
/// Winograd's transforms, and requires enough channels for its per-position GEMMs to be efficient.
pub fn choose(g: &ConvGeom, algorithm: ConvAlgorithm) -> Option<&'static Variant> {
    let winograd_shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1;
    let only = |k: ConvKernel| match k {
        ConvKernel::Im2col => None,
        ConvKernel::WinogradF2 => winograd_shape.then_some(&F2),
        ConvKernel::WinogradF4 => winograd_shape.then_some(&F4),
    };
    match algorithm {
        ConvAlgorithm::Only(k) => return only(k),
        ConvAlgorithm::Planned(plan) => {
            if let Some(k) = plan.kernel(&ConvShape::from(g)) {
                return only(k);
            }
        }
        _ => {}
    }
    // Below 32 channels the per-position GEMMs are too thin and the transforms dominate (measured:
    // slower than im2col on 16-channel layers).
    if !winograd_shape || g.cin < MIN_CHANNELS || g.cout < MIN_CHANNELS {
        return None;
    }
    let variants: &[&'static Variant] = match algorithm {
        ConvAlgorithm::Auto | ConvAlgorithm::Measured | ConvAlgorithm::Planned(_) => &[&F4, &F2],
        ConvAlgorithm::Winograd2 => &[&F2],
        ConvAlgorithm::Direct => return None,
        ConvAlgorithm::Only(_) => unreachable!("handled above"),
    };
    let direct = (g.oh * g.ow * 9) as f64;
    let cost = |v: &Variant| (g.oh.div_ceil(v.m) * g.ow.div_ceil(v.m) * v.a * v.a) as f64 * 1.3;
    variants
        .iter()
        .map(|&v| (cost(v), v))
        .filter(|(c, _)| *c < direct)
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v)
}

struct Tiles {
    th: usize,
    tw: usize,
    total: usize,
}

fn tiles(g: &ConvGeom, v: &Variant) -> Tiles {
    let (th, tw) = (g.oh.div_ceil(v.m), g.ow.div_ceil(v.m));
    Tiles { th, tw, total: g.n * th * tw }
}

/// Tiles per block: the block's transformed input and output (`a^2 x tiles x channels` each) should
/// stay in cache, but the per-position GEMMs need enough rows to amortise packing their weights.
fn block_tiles(v: &Variant, cin: usize, cout: usize, total: usize) -> usize {
    let per_tile = v.a * v.a * (cin + cout);
    let rows = ((1usize << 19) / per_tile).clamp(64, 512);
    rows.min(total.div_ceil(2 * rayon::current_num_threads()).max(16))
}

/// How a layer's tiles meet its per-position GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    /// Blocks of tiles in parallel, each running all `a^2` GEMMs on its own tiles: the transformed
    /// tiles stay in cache, but every block packs the whole of `U` again.
    Blocks,
    /// Every tile transformed first, then one GEMM per position over all tiles (spread over the
    /// pool): `U` is packed once per position at the cost of one trip of the transformed tiles
    /// through memory. Wins when `U` outweighs the tiles (the late stages: few pixels, many channels).
    Positions,
}

/// Most values the `Positions` schedule keeps transformed at once (input and output tiles together).
const POSITIONS_MAX_VALUES: usize = 1 << 25;

fn schedule(v: &Variant, cin: usize, cout: usize, total: usize) -> Schedule {
    let blocks = total.div_ceil(block_tiles(v, cin, cout, total));
    let repacked = blocks * cin * cout; // values of U packed per position, over all blocks
    let round_trip = 2 * total * (cin + cout); // values of the tiles written and read back, per position
    let held = v.a * v.a * total * (cin + cout);
    if repacked > round_trip && held <= POSITIONS_MAX_VALUES {
        Schedule::Positions
    } else {
        Schedule::Blocks
    }
}

/// Values of a weight plane transformed at a time: the pieces of all the planes a transform reads and
/// writes for that many channel pairs stay in cache (whole 512 x 512 planes do not: streaming them
/// through memory plane after plane cost more than the convolution itself on the late stages).
const PLANE_CHUNK: usize = 2048;

/// Runs `f(lo, hi, pieces)` on consecutive ranges of a plane of `plane` values, in parallel, where
/// `pieces[i]` is the range `[lo, hi)` of plane `i` of `out` (`count` planes).
fn by_plane_chunks(out: &mut [f32], count: usize, plane: usize, f: impl Fn(usize, usize, &mut [&mut [f32]]) + Sync) {
    assert_eq!(out.len(), count * plane);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..plane.div_ceil(PLANE_CHUNK)).into_par_iter().for_each(|c| {
        let (lo, hi) = (c * PLANE_CHUNK, ((c + 1) * PLANE_CHUNK).min(plane));
        // SAFETY: chunk c covers values [lo, hi) of every plane and no other chunk does, so the
        // slices are disjoint, and they lie inside `out` (checked above).
        let mut pieces: Vec<&mut [f32]> = (0..count)
            .map(|i| unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(i * plane + lo), hi - lo) })
            .collect();
        f(lo, hi, &mut pieces);
    });
}

/// `U[p] = (G g G^T)[p]` for every (row, column) channel pair at once: `planes` holds the nine
/// kernel taps `g[ky][kx]` as `rows x cols` matrices; the result is `a^2` such matrices. Both
/// stages are multiply-adds of whole planes (vectorised), a chunk of channel pairs at a time.
fn transform_weights(planes: &[f32], plane: usize, v: &Variant) -> Vec<f32> {
    let a = v.a;
    let mut u = crate::alloc::take(a * a * plane);
    by_plane_chunks(&mut u, a * a, plane, |lo, hi, out| {
        let len = hi - lo;
        let piece = |tap: usize| &planes[tap * plane + lo..tap * plane + hi];
        // t[i][kx] = sum_ky G[i][ky] g[ky][kx], then U[i][j] = sum_kx G[j][kx] t[i][kx].
        with_scratch(a * 3 * len, 0, |t, _| {
            for i in 0..a {
                for kx in 0..3 {
                    let dst = &mut t[(i * 3 + kx) * len..(i * 3 + kx + 1) * len];
                    combine_planes(dst, &terms((0..3).map(|ky| (v.g[i * 3 + ky], piece(ky * 3 + kx)))));
                }
            }
            for i in 0..a {
                for j in 0..a {
                    let terms = terms((0..3).map(|kx| (v.g[j * 3 + kx], row(t, i * 3 + kx, len))));
                    combine_planes(out[i * a + j], &terms);
                }
            }
        });
    });
    u
}

/// Block edge of the transposes between OHWI weights and `cin x cout` planes: a block's rows and
/// columns both stay in cache, where a plain loop would write (or read) one value per cache line.
const TRANSPOSE_BLOCK: usize = 16;

/// The nine taps of an OHWI 3x3 weight as `cin x cout` matrices (forward), or, rotated by 180 degrees,
/// as `cout x cin` matrices (the data gradient's convolution).
fn weight_planes(w: &[f32], cin: usize, cout: usize, rotated: bool) -> Vec<f32> {
    let plane = cin * cout;
    let mut out = crate::alloc::take(9 * plane);
    if rotated {
        for co in 0..cout {
            for tap in 0..9 {
                let src = &w[(co * 9 + tap) * cin..(co * 9 + tap + 1) * cin];
                let dst = (8 - tap) * plane + co * cin;
                out[dst..dst + cin].copy_from_slice(src);
            }
        }
        return out;
    }
    out.par_chunks_mut(plane).enumerate().for_each(|(tap, dst)| {
        for ci0 in (0..cin).step_by(TRANSPOSE_BLOCK) {
            let ci1 = (ci0 + TRANSPOSE_BLOCK).min(cin);
            for co0 in (0..cout).step_by(TRANSPOSE_BLOCK) {
                let co1 = (co0 + TRANSPOSE_BLOCK).min(cout);
                for ci in ci0..ci1 {
                    let dst = &mut dst[ci * cout + co0..ci * cout + co1];
                    for (co, d) in (co0..co1).zip(dst) {
                        *d = w[(co * 9 + tap) * cin + ci];
                    }
                }
            }
        }
    });
    out
}

simd_fn! {
/// Writes `V[p][slot][:] = (B^T d B)[p]` for the input tile `tile`: `v` is `a^2` planes of `plane` values.
#[allow(clippy::too_many_arguments)]
fn input_tile(
    x: &[f32],
    g: &ConvGeom,
    v: &Variant,
    t: &Tiles,
    tile: usize,
    d: &mut [f32],
    tmp: &mut [f32],
    out: &mut [f32],
    plane: usize,
    slot: usize,
) {
    let (a, c) = (v.a, g.cin);
    let (b, rem) = (tile / (t.th * t.tw), tile % (t.th * t.tw));
    let (y0, x0) = ((rem / t.tw * v.m) as isize - 1, (rem % t.tw * v.m) as isize - 1);
    // d: the a x a input pixels (zero outside the image).
    for i in 0..a {
        let iy = y0 + i as isize;
        for j in 0..a {
            let ix = x0 + j as isize;
            let dst = &mut d[(i * a + j) * c..(i * a + j + 1) * c];
            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                dst.fill(0.0);
            } else {
                let src = ((b * g.h + iy as usize) * g.w + ix as usize) * c;
                dst.copy_from_slice(&x[src..src + c]);
            }
        }
    }
    // tmp = B^T d, then V = tmp B.
    for i in 0..a {
        for j in 0..a {
            combine(
                &mut tmp[(i * a + j) * c..(i * a + j + 1) * c],
                (0..a).map(|k| (v.bt[i * a + k], row(d, k * a + j, c))),
            );
        }
    }
    for i in 0..a {
        for j in 0..a {
            let p = i * a + j;
            let acc = &mut out[p * plane + slot * c..p * plane + (slot + 1) * c];
            combine(acc, (0..a).map(|k| (v.bt[j * a + k], row(tmp, i * a + k, c))));
        }
    }
}
}

#[inline(always)]
fn axpy(acc: &mut [f32], coef: f32, x: &[f32]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o += coef * v;
    }
}

/// Vector `idx` of a buffer of `len`-long vectors.
#[inline(always)]
fn row(buf: &[f32], idx: usize, len: usize) -> &[f32] {
    &buf[idx * len..(idx + 1) * len]
}

/// `out = sum_k coef_k x_k` over vectors (channels, or whole weight planes), skipping zero
/// coefficients: every stage of every transform is this product of a small constant matrix with a
/// column of vectors.
#[inline(always)]
fn combine<'x>(out: &mut [f32], terms: impl Iterator<Item = (f64, &'x [f32])>) {
    out.fill(0.0);
    for (coef, x) in terms {
        if coef != 0.0 {
            axpy(out, coef as f32, x);
        }
    }
}

/// At most `a` (<= 6) terms of a [`combine`] over whole weight planes, collected so that they can cross
/// into a per-instruction-set kernel.
fn terms<'x>(it: impl Iterator<Item = (f64, &'x [f32])>) -> Vec<(f64, &'x [f32])> {
    it.collect()
}

simd_fn! {
    /// [`combine`] over large vectors (weight planes), compiled per instruction set.
    fn combine_planes(out: &mut [f32], terms: &[(f64, &[f32])]) {
        combine(out, terms.iter().copied());
    }
}

simd_fn! {
    /// `acc += x`.
    fn add_into(acc: &mut [f32], x: &[f32]) {
        axpy(acc, 1.0, x);
    }
}

/// `acc += parts[0]`, then `+= parts[1]`, and so on: for every value the same additions in the same
/// order as one `add_into` per part, but over the pool, a slice of `acc` at a time (partial sums of
/// weight gradients reach megabytes). The parts go back to the buffer pool.
pub(super) fn add_parts_into(acc: &mut [f32], parts: Vec<Vec<f32>>) {
    const SLICE: usize = 1 << 14;
    acc.par_chunks_mut(SLICE).enumerate().for_each(|(i, a)| {
        for p in &parts {
            add_into(a, &p[i * SLICE..i * SLICE + a.len()]);
        }
    });
    for p in parts {
        crate::alloc::give(p);
    }
}

/// What variant `v`'s products multiply when the convolution asks for `precision`: F(4,3) keeps f32
/// whatever is asked, because its transforms magnify bf16's rounding about tenfold (relative error of
/// 3x3 convolutions against f64, 64 to 512 channels: bf16 im2col 2.1e-3 to 2.3e-3, bf16 F(2,3) 3.3e-3
/// to 4.2e-3, bf16 F(4,3) 1.5e-2 to 3.0e-2; f32 F(4,3) 1e-6 to 5e-6).
pub fn products(v: &Variant, precision: MulPrecision) -> MulPrecision {
    if v.m == 4 {
        MulPrecision::F32
    } else {
        precision
    }
}

/// `y = conv3x3(x, w)` (stride 1, padding 1, OHWI weight) by Winograd; `y` is fully overwritten.
pub fn forward(x: &[f32], w: &[f32], g: &ConvGeom, y: &mut [f32], v: &Variant, precision: MulPrecision) {
    let precision = products(v, precision);
    let planes = weight_planes(w, g.cin, g.cout, false);
    let u = transform_weights(&planes, g.cin * g.cout, v);
    crate::alloc::give(planes);
    forward_transformed(x, &u, g, y, v, precision);
    crate::alloc::give(u);
}

/// The forward with the weights already transformed (`u`: `a^2` matrices `cin x cout`).
fn forward_transformed(x: &[f32], u: &[f32], g: &ConvGeom, y: &mut [f32], v: &Variant, precision: MulPrecision) {
    match schedule(v, g.cin, g.cout, tiles(g, v).total) {
        Schedule::Blocks => forward_blocks(x, u, g, y, v, precision),
        Schedule::Positions => forward_positions(x, u, g, y, v, precision),
    }
}

/// Every input tile transformed into `a^2` vectors of `cin` values, tile after tile (`[tile][p][ci]`).
fn transform_all_inputs(x: &[f32], g: &ConvGeom, v: &Variant, t: &Tiles) -> Vec<f32> {
    let (a2, cin) = (v.a * v.a, g.cin);
    let mut vbuf = crate::alloc::take(t.total * a2 * cin);
    vbuf.par_chunks_mut(a2 * cin).enumerate().for_each(|(tile, out)| {
        with_scratch(2 * a2 * cin, 0, |s, _| {
            let (d, tmp) = s.split_at_mut(a2 * cin);
            input_tile(x, g, v, t, tile, d, tmp, out, cin, 0);
        });
    });
    vbuf
}

/// The `Positions` schedule of the forward: all input tiles, one GEMM per position, all output tiles.
fn forward_positions(x: &[f32], u: &[f32], g: &ConvGeom, y: &mut [f32], v: &Variant, precision: MulPrecision) {
    let t = tiles(g, v);
    let (a2, cin, cout) = (v.a * v.a, g.cin, g.cout);
    let vbuf = transform_all_inputs(x, g, v, &t);
    let mut mbuf = crate::alloc::take(t.total * a2 * cout);
    for p in 0..a2 {
        // Position p of every tile: rows `a^2 * c` values apart in the tile-major buffers.
        let vm = MatRef::strided(&vbuf[p * cin..], t.total, cin, (a2 * cin) as isize, 1);
        let um = MatRef::new(&u[p * cin * cout..(p + 1) * cin * cout], cin, cout);
        matmul_in(
            precision,
            MatMut::strided(&mut mbuf[p * cout..], t.total, cout, a2 * cout),
            vm,
            um,
            false,
            Threads::Pool,
        );
    }
    crate::alloc::give(vbuf);
    let y_ptr = SharedMut(y.as_mut_ptr());
    mbuf.par_chunks(a2 * cout).enumerate().for_each(|(tile, m)| {
        with_scratch(2 * a2 * cout, 0, |s, _| {
            let (tmp, res) = s.split_at_mut(a2 * cout);
            // SAFETY: each output tile is written by exactly one iteration.
            unsafe { output_tile(m, cout, 0, g, v, &t, tile, tmp, res, y_ptr) };
        });
    });
    crate::alloc::give(mbuf);
}

/// The `Blocks` schedule of the forward.
fn forward_blocks(x: &[f32], u: &[f32], g: &ConvGeom, y: &mut [f32], v: &Variant, precision: MulPrecision) {
    let t = tiles(g, v);
    let (a2, cin, cout) = (v.a * v.a, g.cin, g.cout);
    let tb = block_tiles(v, cin, cout, t.total);
    let y_ptr = SharedMut(y.as_mut_ptr());
    let blocks = t.total.div_ceil(tb);
    (0..blocks).into_par_iter().for_each(|blk| {
        let first = blk * tb;
        let n = tb.min(t.total - first);
        with_scratch(a2 * n * cin + 2 * a2 * cin.max(cout), a2 * n * cout, |s1, mbuf| {
            let (vbuf, rest) = s1.split_at_mut(a2 * n * cin);
            let (d, tmp) = rest.split_at_mut(a2 * cin.max(cout));
            for i in 0..n {
                input_tile(x, g, v, &t, first + i, d, tmp, vbuf, n * cin, i);
            }
            for p in 0..a2 {
                let vm = MatRef::new(&vbuf[p * n * cin..(p + 1) * n * cin], n, cin);
                let um = MatRef::new(&u[p * cin * cout..(p + 1) * cin * cout], cin, cout);
                matmul_in(
                    precision,
                    MatMut::new(&mut mbuf[p * n * cout..(p + 1) * n * cout], n, cout),
                    vm,
                    um,
                    false,
                    Threads::Serial,
                );
            }
            for i in 0..n {
                // SAFETY: output tiles do not overlap and each belongs to exactly one block, so the
                // pixels written here are written by no other thread.
                unsafe { output_tile(mbuf, n * cout, i, g, v, &t, first + i, d, tmp, y_ptr) };
            }
        });
    });
}

simd_fn! {
    /// `res = A^T M A` for one tile: its `m x m` output pixels of `c` channels, including any that
    /// fall outside the image (the caller skips those).
    fn output_transform(mbuf: &[f32], plane: usize, slot: usize, v: &Variant, c: usize, tmp: &mut [f32], res: &mut [f32]) {
        let (a, m) = (v.a, v.m);
        let at_ = |p: usize| &mbuf[p * plane + slot * c..p * plane + (slot + 1) * c];
        // tmp = A^T M  (m x a), res = tmp A (m x m).
        for i in 0..m {
            for j in 0..a {
                combine(&mut tmp[(i * a + j) * c..(i * a + j + 1) * c], (0..a).map(|k| (v.at[i * a + k], at_(k * a + j))));
            }
        }
        for i in 0..m {
            for j in 0..m {
                combine(
                    &mut res[(i * m + j) * c..(i * m + j + 1) * c],
                    (0..a).map(|k| (v.at[j * a + k], &tmp[(i * a + k) * c..(i * a + k + 1) * c])),
                );
            }
        }
    }
}

/// `Y = A^T M A` for one tile, written to the output pixels inside the image.
///
/// # Safety
/// `y` must point to the `n * oh * ow * cout` output, and no other thread may write this tile.
#[allow(clippy::too_many_arguments)]
unsafe fn output_tile(
    mbuf: &[f32],
    plane: usize,
    slot: usize,
    g: &ConvGeom,
    v: &Variant,
    t: &Tiles,
    tile: usize,
    tmp: &mut [f32],
    res: &mut [f32],
    y: SharedMut,
) {
    let (m, c) = (v.m, g.cout);
    output_transform(mbuf, plane, slot, v, c, tmp, res);
    let (b, rem) = (tile / (t.th * t.tw), tile % (t.th * t.tw));
    let (y0, x0) = (rem / t.tw * m, rem % t.tw * m);
    for i in 0..m {
        for j in 0..m {
            if y0 + i >= g.oh || x0 + j >= g.ow {
                continue;
            }
            let dst = ((b * g.oh + y0 + i) * g.ow + x0 + j) * c;
            std::ptr::copy_nonoverlapping(res[(i * m + j) * c..].as_ptr(), y.get().add(dst), c);
        }
    }
}

/// `dx` of a 3x3 stride-1 padding-1 convolution: the forward convolution of `dy` with the kernel
/// rotated by 180 degrees and its channels swapped. `dx` is fully overwritten.
pub fn data_grad(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32], v: &Variant, precision: MulPrecision) {
    let precision = products(v, precision);
    let planes = weight_planes(w, g.cin, g.cout, true);
    let u = transform_weights(&planes, g.cin * g.cout, v);
    crate::alloc::give(planes);
    let back = ConvGeom { h: g.oh, w: g.ow, cin: g.cout, cout: g.cin, oh: g.h, ow: g.w, ..*g };
    forward_transformed(dy, &u, &back, dx, v, precision);
    crate::alloc::give(u);
}

/// Accumulates the weight gradient (OHWI) of a 3x3 stride-1 padding-1 convolution into `dw`.
pub fn weight_grad(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32], v: &Variant, precision: MulPrecision) {
    let precision = products(v, precision);
    let du = match schedule(v, g.cin, g.cout, tiles(g, v).total) {
        Schedule::Blocks => transformed_weight_grad_blocks(x, dy, g, v, precision),
        Schedule::Positions => transformed_weight_grad_positions(x, dy, g, v, precision),
    };
    add_weight_grad(&du, g, dw, v);
    crate::alloc::give(du);
}

/// `dU[p] = V[p]^T . dM[p]` over all tiles, one GEMM of the whole depth per position.
fn transformed_weight_grad_positions(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    v: &Variant,
    precision: MulPrecision,
) -> Vec<f32> {
    let t = tiles(g, v);
    let (a2, cin, cout) = (v.a * v.a, g.cin, g.cout);
    let vbuf = transform_all_inputs(x, g, v, &t);
    let mut dmbuf = crate::alloc::take(t.total * a2 * cout);
    dmbuf.par_chunks_mut(a2 * cout).enumerate().for_each(|(tile, out)| {
        with_scratch(a2 * cout + v.a * v.m * cout, 0, |s, _| {
            let (d, tmp) = s.split_at_mut(v.m * v.m * cout);
            output_grad_tile(dy, g, v, &t, tile, d, tmp, out, cout, 0);
        });
    });
    let mut du = crate::alloc::take(a2 * cin * cout);
    for p in 0..a2 {
        let vt = MatRef::strided(&vbuf[p * cin..], t.total, cin, (a2 * cin) as isize, 1).t();
        let dm = MatRef::strided(&dmbuf[p * cout..], t.total, cout, (a2 * cout) as isize, 1);
        matmul_in(
            precision,
            MatMut::new(&mut du[p * cin * cout..(p + 1) * cin * cout], cin, cout),
            vt,
            dm,
            false,
            Threads::Pool,
        );
    }
    crate::alloc::give(vbuf);
    crate::alloc::give(dmbuf);
    du
}

/// `dU[p]` summed over blocks of tiles: partial sums per fixed chunk of blocks, added in order.
fn transformed_weight_grad_blocks(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    v: &Variant,
    precision: MulPrecision,
) -> Vec<f32> {
    let t = tiles(g, v);
    let (a2, cin, cout) = (v.a * v.a, g.cin, g.cout);
    let tb = block_tiles(v, cin, cout, t.total);
    let blocks = t.total.div_ceil(tb);
    // Fixed chunking (partial dU per chunk, added in order): deterministic whatever the thread count,
    // with the partials' memory bounded.
    let per_partial = a2 * cin * cout;
    let chunks = blocks.min(8).min(((1usize << 26) / per_partial).max(1));
    let per_chunk = blocks.div_ceil(chunks);
    let chunks = blocks.div_ceil(per_chunk); // none left empty
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|ch| {
            let own = ch * per_chunk..((ch + 1) * per_chunk).min(blocks);
            // The chunk's first block overwrites `du`.
            let mut du = crate::alloc::take(per_partial);
            for blk in own.clone() {
                let add = blk > own.start;
                let first = blk * tb;
                let n = tb.min(t.total - first);
                with_scratch(a2 * n * cin + 2 * a2 * cin.max(cout), a2 * n * cout, |s1, dmbuf| {
                    let (vbuf, rest) = s1.split_at_mut(a2 * n * cin);
                    let (d, tmp) = rest.split_at_mut(a2 * cin.max(cout));
                    for i in 0..n {
                        input_tile(x, g, v, &t, first + i, d, tmp, vbuf, n * cin, i);
                        output_grad_tile(dy, g, v, &t, first + i, d, tmp, dmbuf, n * cout, i);
                    }
                    for p in 0..a2 {
                        let vt = MatRef::new(&vbuf[p * n * cin..(p + 1) * n * cin], n, cin).t();
                        let dm = MatRef::new(&dmbuf[p * n * cout..(p + 1) * n * cout], n, cout);
                        matmul_in(
                            precision,
                            MatMut::new(&mut du[p * cin * cout..(p + 1) * cin * cout], cin, cout),
                            vt,
                            dm,
                            add,
                            Threads::Serial,
                        );
                    }
                });
            }
            du
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut du = parts.next().expect("at least one chunk");
    add_parts_into(&mut du, parts.collect());
    du
}

/// `dg = G^T dU G` for every channel pair (planes of `cin x cout`, a chunk of pairs at a time), added
/// into the OHWI gradient.
fn add_weight_grad(du: &[f32], g: &ConvGeom, dw: &mut [f32], v: &Variant) {
    let (a, cin, cout) = (v.a, g.cin, g.cout);
    let plane = cin * cout;
    let mut taps = crate::alloc::take(9 * plane);
    by_plane_chunks(&mut taps, 9, plane, |lo, hi, out| {
        let len = hi - lo;
        let piece = |p: usize| &du[p * plane + lo..p * plane + hi];
        // t2[ky][j] = sum_i G[i][ky] dU[i][j], then tap[ky][kx] = sum_j G[j][kx] t2[ky][j].
        with_scratch(3 * a * len, 0, |t2, _| {
            for ky in 0..3 {
                for j in 0..a {
                    let dst = &mut t2[(ky * a + j) * len..(ky * a + j + 1) * len];
                    combine_planes(dst, &terms((0..a).map(|i| (v.g[i * 3 + ky], piece(i * a + j)))));
                }
            }
            for ky in 0..3 {
                for kx in 0..3 {
                    let terms = terms((0..a).map(|j| (v.g[j * 3 + kx], row(t2, ky * a + j, len))));
                    combine_planes(out[ky * 3 + kx], &terms);
                }
            }
        });
    });
    dw.par_chunks_mut(9 * cin).enumerate().for_each(|(co, dst)| {
        for tap in 0..9 {
            let src = &taps[tap * plane..(tap + 1) * plane];
            for (ci, d) in dst[tap * cin..(tap + 1) * cin].iter_mut().enumerate() {
                *d += src[ci * cout + co];
            }
        }
    });
    crate::alloc::give(taps);
}

simd_fn! {
/// Writes `dM[p][slot][:] = (A dY A^T)[p]` for output tile `tile` (dY is zero outside the output).
#[allow(clippy::too_many_arguments)]
fn output_grad_tile(
    dy: &[f32],
    g: &ConvGeom,
    v: &Variant,
    t: &Tiles,
    tile: usize,
    d: &mut [f32],
    tmp: &mut [f32],
    out: &mut [f32],
    plane: usize,
    slot: usize,
) {
    let (a, m, c) = (v.a, v.m, g.cout);
    let (b, rem) = (tile / (t.th * t.tw), tile % (t.th * t.tw));
    let (y0, x0) = (rem / t.tw * m, rem % t.tw * m);
    for i in 0..m {
        for j in 0..m {
            let dst = &mut d[(i * m + j) * c..(i * m + j + 1) * c];
            if y0 + i >= g.oh || x0 + j >= g.ow {
                dst.fill(0.0);
            } else {
                let src = ((b * g.oh + y0 + i) * g.ow + x0 + j) * c;
                dst.copy_from_slice(&dy[src..src + c]);
            }
        }
    }
    // tmp = A dY (a x m), then dM = tmp A^T (a x a); A = (A^T)^T, so A[k][i] = at[i][k].
    for k in 0..a {
        for j in 0..m {
            combine(
                &mut tmp[(k * m + j) * c..(k * m + j + 1) * c],
                (0..m).map(|i| (v.at[i * a + k], row(d, i * m + j, c))),
            );
        }
    }
    for k in 0..a {
        for l in 0..a {
            let p = k * a + l;
            let acc = &mut out[p * plane + slot * c..p * plane + (slot + 1) * c];
            combine(acc, (0..m).map(|j| (v.at[j * a + l], row(tmp, k * m + j, c))));
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, w: usize, cin: usize, cout: usize, stride: usize) -> ConvGeom {
        ConvGeom::new(&[2, h, w, cin], &[cout, 3, 3, cin], stride, 1).unwrap()
    }

    #[test]
    fn the_cost_model_picks_the_expected_variant() {
        let auto = |g| choose(&g, ConvAlgorithm::Auto).map(|v| v.m);
        assert_eq!(auto(geom(28, 28, 32, 64, 1)), Some(4));
        assert!(auto(geom(28, 28, 16, 16, 1)).is_none(), "too few channels");
        assert_eq!(auto(geom(7, 7, 64, 64, 1)), Some(4));
        assert_eq!(auto(geom(2, 2, 64, 64, 1)), Some(2));
        assert!(auto(geom(1, 1, 64, 64, 1)).is_none(), "one pixel: direct is cheaper");
        assert!(auto(geom(28, 28, 64, 64, 2)).is_none(), "strided");
        assert!(auto(geom(28, 28, 3, 64, 1)).is_none(), "too few input channels");
        assert_eq!(choose(&geom(28, 28, 64, 64, 1), ConvAlgorithm::Winograd2).map(|v| v.m), Some(2));
        assert!(choose(&geom(28, 28, 64, 64, 1), ConvAlgorithm::Direct).is_none());
        assert_eq!("winograd2".parse::<ConvAlgorithm>().map(|a| a.to_string()), Ok("winograd2".to_string()));
    }

    #[test]
    fn both_schedules_compute_the_same_convolution_and_gradients() {
        // Small maps with many channels take `Positions`, large maps with few take `Blocks`; each
        // schedule is run on each shape and the two compared (the direct-loop comparison of every
        // path is in the integration tests).
        let cases = [(6, 3, 3, 64, 96), (2, 7, 7, 64, 64), (3, 14, 13, 32, 48), (2, 28, 28, 32, 32)];
        for (n, h, w, cin, cout) in cases {
            let g = ConvGeom::new(&[n, h, w, cin], &[cout, 3, 3, cin], 1, 1).unwrap();
            let wave = |len: usize, f: f32| (0..len).map(|i| ((i as f32) * f).sin()).collect::<Vec<f32>>();
            let x = wave(n * h * w * cin, 0.37);
            let wt = wave(cout * 9 * cin, 0.91);
            let dy = wave(n * h * w * cout, 0.53);
            for v in [&F2, &F4] {
                let u = transform_weights(&weight_planes(&wt, cin, cout, false), cin * cout, v);
                let (mut y1, mut y2) = (vec![0.0; dy.len()], vec![0.0; dy.len()]);
                let f32p = MulPrecision::F32;
                forward_blocks(&x, &u, &g, &mut y1, v, f32p);
                forward_positions(&x, &u, &g, &mut y2, v, f32p);
                let du1 = transformed_weight_grad_blocks(&x, &dy, &g, v, f32p);
                let du2 = transformed_weight_grad_positions(&x, &dy, &g, v, f32p);
                for (name, a, b) in [("forward", &y1, &y2), ("weight gradient", &du1, &du2)] {
                    let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                    for (p, q) in a.iter().zip(b.iter()) {
                        assert!(
                            (p - q).abs() <= 1e-5 * scale,
                            "{name} F({}) {n}x{h}x{w} {cin}->{cout}: {p} vs {q}",
                            v.m
                        );
                    }
                }
            }
        }
        let chosen = |n: usize, h: usize, c: usize| {
            let g = ConvGeom::new(&[n, h, h, c], &[c, 3, 3, c], 1, 1).unwrap();
            schedule(&F2, c, c, tiles(&g, &F2).total)
        };
        assert_eq!(chosen(6, 3, 64), Schedule::Positions);
        assert_eq!(chosen(16, 7, 512), Schedule::Positions);
        assert_eq!(chosen(2, 28, 32), Schedule::Blocks);
        assert_eq!(chosen(16, 56, 64), Schedule::Blocks);
    }

    #[test]
    fn transforms_reproduce_a_single_tile_convolution() {
        // One 1-channel tile: Winograd equals the direct sum for every variant.
        for v in [&F2, &F4] {
            let g = ConvGeom::new(&[1, v.m, v.m, 1], &[1, 3, 3, 1], 1, 1).unwrap();
            let x: Vec<f32> = (0..v.m * v.m).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..9).map(|i| (i as f32 * 0.91).cos()).collect();
            let mut y = vec![0.0; v.m * v.m];
            forward(&x, &w, &g, &mut y, v, MulPrecision::F32);
            for oy in 0..v.m {
                for ox in 0..v.m {
                    let mut want = 0.0f64;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                            if iy >= 0 && ix >= 0 && (iy as usize) < v.m && (ix as usize) < v.m {
                                want += x[iy as usize * v.m + ix as usize] as f64 * w[ky * 3 + kx] as f64;
                            }
                        }
                    }
                    assert!((y[oy * v.m + ox] as f64 - want).abs() < 1e-5, "F({}) at ({oy},{ox})", v.m);
                }
            }
        }
    }
}
