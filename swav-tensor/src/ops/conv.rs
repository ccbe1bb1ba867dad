//! 2-D convolution without bias: NHWC input `[n, h, w, cin]`, OHWI weight `[cout, kh, kw, cin]`,
//! NHWC output `[n, oh, ow, cout]`, `oh = (h + 2 pad - kh) / stride + 1`.
//!
//! CPU strategy: every pass is a GEMM over tiles of pixels, with the tile's im2col (or gather) matrix
//! built in a per-thread scratch buffer that stays in cache; tiles run in parallel, each GEMM serially.
//! - forward: `y[tile] = col(x)[tile] (m x kh*kw*cin) . w^T`
//! - weight: `dw += dy[tile]^T . col(x)[tile]`, partial sums per fixed chunk of rows, added in
//!   chunk order (deterministic run to run); with fewer chunks than twice the threads, each chunk's
//!   products are spread over the pool as well
//! - data: `dx[pixel]` = sum over the taps that reach it of `dy[tap's output pixel] . w[tap]`.
//!   With stride s the input pixels split into s*s classes by `(i + pad) mod s`; in a class every pixel
//!   is reached by the same taps, so each class is one dense GEMM with no multiplications by zero
//!   (stride 1: one class, all taps; a 1x1 stride-2 conv: one class with one tap, three with none).
//!
//! Where the weight outweighs the tiles (few pixels, many channels: the late stages), every tile would
//! pack the whole weight again; there the whole im2col (or gather) matrix is built at once and
//! multiplied in one GEMM over the pool.
//!
//! 1x1 stride-1 convolutions need no im2col: they are a single GEMM on the activations.
//! 3x3 stride-1 convolutions with enough channels use Winograd's algorithm instead (`winograd.rs`),
//! which needs 2.25x to 4x fewer multiplications.

use rayon::prelude::*;

use super::scratch::{with_scratch, SharedMut};
use super::winograd::{self, add_parts_into, ConvAlgorithm};
use crate::error::shape_err;
use crate::matmul::{matmul_in, MatMut, MatRef, MulPrecision, Threads};
use crate::{Result, Tensor};

/// Sizes of one convolution: input `[n, h, w, cin]`, weight `[cout, kh, kw, cin]`, output
/// `[n, oh, ow, cout]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images in the batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels (filters).
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Step between output pixels, in input pixels, along both axes.
    pub stride: usize,
    /// Zero padding on every side of the input.
    pub pad: usize,
    /// Output height, `(h + 2 pad - kh) / stride + 1`.
    pub oh: usize,
    /// Output width, `(w + 2 pad - kw) / stride + 1`.
    pub ow: usize,
}

impl ConvGeom {
    /// The geometry of a convolution of an NHWC input of shape `x_shape` by an OHWI weight of shape
    /// `w_shape`; [`TensorError::Shape`](crate::TensorError::Shape) if either is not 4-D, their channel
    /// counts differ, the stride is 0, or the padded input is smaller than the kernel.
    pub fn new(x_shape: &[usize], w_shape: &[usize], stride: usize, pad: usize) -> Result<ConvGeom> {
        let (&[n, h, w, cin], &[cout, kh, kw, wcin]) = (x_shape, w_shape) else {
            return Err(shape_err("conv2d", format!("input {x_shape:?} must be NHWC and weight {w_shape:?} OHWI")));
        };
        if cin != wcin {
            return Err(shape_err("conv2d", format!("input has {cin} channels, weight expects {wcin}")));
        }
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            return Err(shape_err("conv2d", format!("kernel {kh}x{kw} stride {stride} pad {pad} on a {h}x{w} input")));
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Ok(ConvGeom { n, h, w, cin, cout, kh, kw, stride, pad, oh, ow })
    }

    /// Columns of the im2col matrix.
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    /// Output pixels of the whole batch, `n * oh * ow`: the rows of the im2col matrix.
    pub fn out_pixels(&self) -> usize {
        self.n * self.oh * self.ow
    }

    /// The output shape, `[n, oh, ow, cout]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.cout]
    }

    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.out_pixels() * self.k() * self.cout
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// How a convolution slides and computes: stride, zero padding on every side, and the algorithms it
/// may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    /// Step between output pixels, in input pixels, along both axes (at least 1).
    pub stride: usize,
    /// Zero padding on every side of the input, in pixels.
    pub pad: usize,
    /// Which algorithms the CPU may use (Winograd or im2col GEMM; CUDA convolutions run cuDNN and ignore
    /// it). Every choice computes the same convolution, up to float rounding.
    pub algo: ConvAlgorithm,
    /// What the CPU's products multiply: f32, or factors rounded to bf16 with fp32 accumulation (for
    /// Winograd F(2,3), the transformed tiles and weights; F(4,3) stays f32: [`winograd::products`]).
    pub precision: MulPrecision,
}

impl ConvParams {
    /// Stride and padding with the default algorithm choice.
    pub fn new(stride: usize, pad: usize) -> ConvParams {
        ConvParams { stride, pad, algo: ConvAlgorithm::default(), precision: MulPrecision::F32 }
    }
}

/// Rows of a tile whose im2col matrix is `k` wide: large enough to amortise packing the weights in
/// the GEMM, small enough to stay in cache.
fn tile_rows(k: usize, total: usize) -> usize {
    let rows = ((1usize << 18) / k.max(1)).clamp(64, 1024);
    // Keep enough tiles to feed every thread.
    let per_thread = total.div_ceil(4 * rayon::current_num_threads()).max(16);
    rows.min(per_thread)
}

/// Most values of a whole im2col (or gather) matrix built at once.
const WHOLE_MAX_VALUES: usize = 1 << 24;

/// Whether a product of `rows x k` pixels by a `k x n` weight should be one product over the pool
/// instead of tiles of `tile` rows: each tile packs the whole weight again, so where the weight
/// outweighs the tiles (few pixels, many channels: the late stages) building the whole im2col matrix,
/// one trip through memory, costs less than packing the weight tile after tile.
fn weights_outweigh_tiles(rows: usize, tile: usize, k: usize, n: usize) -> bool {
    let repacked = rows.div_ceil(tile) * k * n;
    repacked > 2 * rows * k && rows * k <= WHOLE_MAX_VALUES
}

/// Rows `[r0, r0 + rows)` of the im2col matrix of `x`, built over the pool in a pooled buffer.
fn im2col_rows(x: &[f32], g: &ConvGeom, r0: usize, rows: usize) -> Vec<f32> {
    const PART: usize = 32;
    let k = g.k();
    let mut col = crate::alloc::take(rows * k);
    col.par_chunks_mut(PART * k).enumerate().for_each(|(i, part)| im2col(x, g, r0 + i * PART, part.len() / k, part));
    col
}

/// The convolution of `x: [n, h, w, cin]` (NHWC) by `weight: [cout, kh, kw, cin]` (OHWI), without bias:
/// `[n, oh, ow, cout]` on the device of `x`. Shapes that do not fit are
/// [`TensorError::Shape`](crate::TensorError::Shape).
pub fn conv2d_forward(x: &Tensor, weight: &Tensor, p: ConvParams) -> Result<Tensor> {
    if let Some(rt) = x.runtime() {
        return super::conv_cuda::forward_on(rt, x, weight, p);
    }
    let ConvParams { stride, pad, algo, precision } = p;
    let _p = crate::profile::scope("conv forward");
    let g = ConvGeom::new(x.shape(), weight.shape(), stride, pad)?;
    let mut y = Tensor::for_overwrite(&g.out_shape(), x.device());
    let (xs, ws) = (x.as_slice(), weight.as_slice());
    if let Some(v) = winograd::choose(&g, algo) {
        winograd::forward(xs, ws, &g, y.as_mut_slice(), v, precision);
        return Ok(y);
    }
    let (m_total, k) = (g.out_pixels(), g.k());
    if g.is_pointwise() {
        let out = MatMut::new(y.as_mut_slice(), m_total, g.cout);
        matmul_in(precision, out, MatRef::new(xs, m_total, k), MatRef::new(ws, g.cout, k).t(), false, Threads::Pool);
        return Ok(y);
    }
    let tile = tile_rows(k, m_total);
    if weights_outweigh_tiles(m_total, tile, k, g.cout) {
        let col = im2col_rows(xs, &g, 0, m_total);
        let out = MatMut::new(y.as_mut_slice(), m_total, g.cout);
        matmul_in(precision, out, MatRef::new(&col, m_total, k), MatRef::new(ws, g.cout, k).t(), false, Threads::Pool);
        crate::alloc::give(col);
        return Ok(y);
    }
    y.as_mut_slice().par_chunks_mut(tile * g.cout).enumerate().for_each(|(t, out)| {
        let rows = out.len() / g.cout;
        with_scratch(rows * k, 0, |col, _| {
            im2col(xs, &g, t * tile, rows, col);
            let out = MatMut::new(out, rows, g.cout);
            matmul_in(
                precision,
                out,
                MatRef::new(col, rows, k),
                MatRef::new(ws, g.cout, k).t(),
                false,
                Threads::Serial,
            );
        });
    });
    Ok(y)
}

/// Backward of [`conv2d_forward`]: accumulates the weight gradient into `dweight` and returns the
/// input gradient when `want_dx` (the first layer of a network does not need it).
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    p: ConvParams,
    dweight: &mut Tensor,
    want_dx: bool,
) -> Result<Option<Tensor>> {
    if let Some(rt) = x.runtime() {
        return super::conv_cuda::backward_on(rt, x, weight, dy, p, dweight, want_dx);
    }
    let ConvParams { stride, pad, algo, precision } = p;
    let g = ConvGeom::new(x.shape(), weight.shape(), stride, pad)?;
    if dy.shape() != g.out_shape() {
        return Err(shape_err("conv2d_backward", format!("dy {:?} but output is {:?}", dy.shape(), g.out_shape())));
    }
    weight.check_same_shape("conv2d_backward (dweight)", dweight)?;
    let wino = winograd::choose(&g, algo);
    match wino {
        Some(v) => {
            let _p = crate::profile::scope("conv weight grad");
            winograd::weight_grad(x.as_slice(), dy.as_slice(), &g, dweight.as_mut_slice(), v, precision)
        }
        None => weight_grad(x.as_slice(), dy.as_slice(), &g, dweight.as_mut_slice(), precision),
    }
    if !want_dx {
        return Ok(None);
    }
    let every_class_reached = g.stride <= g.kh && g.stride <= g.kw;
    let mut dx = if every_class_reached {
        Tensor::for_overwrite(x.shape(), x.device())
    } else {
        Tensor::zeros(x.shape(), x.device())
    };
    if let Some(v) = wino {
        let _p = crate::profile::scope("conv data grad");
        winograd::data_grad(dy.as_slice(), weight.as_slice(), &g, dx.as_mut_slice(), v, precision);
    } else if g.is_pointwise() {
        let _p = crate::profile::scope("conv data grad");
        let out = MatMut::new(dx.as_mut_slice(), g.out_pixels(), g.cin);
        let w = MatRef::new(weight.as_slice(), g.cout, g.cin);
        matmul_in(precision, out, MatRef::new(dy.as_slice(), g.out_pixels(), g.cout), w, false, Threads::Pool);
    } else {
        data_grad(dy.as_slice(), weight.as_slice(), &g, dx.as_mut_slice(), precision);
    }
    Ok(Some(dx))
}

/// Rows `[r0, r0 + rows)` of the im2col matrix of `x`: row = output pixel, columns = (ky, kx, ci).
fn im2col(x: &[f32], g: &ConvGeom, r0: usize, rows: usize, col: &mut [f32]) {
    let k = g.k();
    let run = g.kw * g.cin;
    for i in 0..rows {
        let r = r0 + i;
        let (b, rem) = (r / (g.oh * g.ow), r % (g.oh * g.ow));
        let (oy, ox) = (rem / g.ow, rem % g.ow);
        let dst = &mut col[i * k..(i + 1) * k];
        // Valid kx form one contiguous run of input pixels in the row: copy it in one piece.
        let ix0 = (ox * g.stride) as isize - g.pad as isize;
        let kx_lo = (-ix0).max(0) as usize;
        let kx_hi = ((g.w as isize - ix0).max(0) as usize).min(g.kw);
        for ky in 0..g.kh {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            let seg = &mut dst[ky * run..(ky + 1) * run];
            if iy < 0 || iy >= g.h as isize || kx_lo >= kx_hi {
                seg.fill(0.0);
                continue;
            }
            seg[..kx_lo * g.cin].fill(0.0);
            seg[kx_hi * g.cin..].fill(0.0);
            let src = ((b * g.h + iy as usize) * g.w + (ix0 + kx_lo as isize) as usize) * g.cin;
            seg[kx_lo * g.cin..kx_hi * g.cin].copy_from_slice(&x[src..src + (kx_hi - kx_lo) * g.cin]);
        }
    }
}

fn weight_grad(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32], precision: MulPrecision) {
    let _p = crate::profile::scope("conv weight grad");
    let (m_total, k) = (g.out_pixels(), g.k());
    // Fixed chunking, partial sums added in chunk order: the bits do not depend on which thread
    // finishes first.
    let chunks = (m_total / 512).clamp(1, 8);
    let chunk = m_total.div_ceil(chunks);
    // Rows `[start, end)` of the product into `acc`, which they overwrite (the first product does not
    // add), in tiles whose im2col matrix stays in cache (a pointwise convolution needs no im2col: its
    // rows are one product of the whole depth).
    let tile = tile_rows(k, chunk);
    let rows_into = |acc: &mut [f32], start: usize, end: usize, threads: Threads| {
        if start >= end {
            acc.fill(0.0);
            return;
        }
        // Every chunk may hold its whole im2col matrix at once: within the budget of one.
        let whole = weights_outweigh_tiles(end - start, tile, k, g.cout) && m_total * k <= WHOLE_MAX_VALUES;
        // Serial chunks take it too in bf16: that kernel adds into the gradient once per 256 rows, so
        // short tiles send the whole `cout x k` gradient through memory again and again (2.2x slower
        // weight gradient on 4x4 maps of 512 channels; the fp32 GEMM measured no gain from it).
        if !g.is_pointwise() && whole && (threads == Threads::Pool || precision == MulPrecision::Bf16) {
            let col = im2col_rows(x, g, start, end - start);
            let dyt = MatRef::new(&dy[start * g.cout..end * g.cout], end - start, g.cout).t();
            matmul_in(precision, MatMut::new(acc, g.cout, k), dyt, MatRef::new(&col, end - start, k), false, threads);
            crate::alloc::give(col);
            return;
        }
        let tile = if g.is_pointwise() { end - start } else { tile };
        let mut r = start;
        while r < end {
            let rows = tile.min(end - r);
            let add = r > start;
            let dyt = MatRef::new(&dy[r * g.cout..(r + rows) * g.cout], rows, g.cout).t();
            if g.is_pointwise() {
                let xt = MatRef::new(&x[r * k..(r + rows) * k], rows, k);
                matmul_in(precision, MatMut::new(acc, g.cout, k), dyt, xt, add, threads);
            } else if threads == Threads::Pool {
                // Not in the thread's scratch: while the product runs over the pool, this thread may
                // pick up another chunk, whose tiles need the scratch.
                let col = im2col_rows(x, g, r, rows);
                matmul_in(precision, MatMut::new(acc, g.cout, k), dyt, MatRef::new(&col, rows, k), add, threads);
                crate::alloc::give(col);
            } else {
                with_scratch(rows * k, 0, |col, _| {
                    im2col(x, g, r, rows, col);
                    matmul_in(precision, MatMut::new(acc, g.cout, k), dyt, MatRef::new(col, rows, k), add, threads);
                });
            }
            r += rows;
        }
    };
    // Too few chunks to keep every thread busy (the late stages' small maps): each chunk's products
    // are spread over the pool as well (same bits: the pool splits a product by its output).
    let threads = if chunks < 2 * rayon::current_num_threads() { Threads::Pool } else { Threads::Serial };
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = crate::alloc::take(g.cout * k);
            rows_into(&mut acc, c * chunk, ((c + 1) * chunk).min(m_total), threads);
            acc
        })
        .collect();
    add_parts_into(dw, partials);
}

/// One class of input pixels for the data gradient: the rows/columns `i` with `(i + pad) % s == c`,
/// and the kernel taps `k % s == c` that reach them (x taps in decreasing order, so that the output
/// pixels they read are consecutive in memory).
struct Class {
    ys: Vec<usize>,
    xs: Vec<usize>,
    kys: Vec<usize>,
    kxs: Vec<usize>,
}

fn data_grad(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32], precision: MulPrecision) {
    let _p = crate::profile::scope("conv data grad");
    let s = g.stride;
    let dx_ptr = SharedMut(dx.as_mut_ptr());
    for cy in 0..s {
        for cx in 0..s {
            let class = Class {
                ys: (0..g.h).filter(|i| (i + g.pad) % s == cy).collect(),
                xs: (0..g.w).filter(|i| (i + g.pad) % s == cx).collect(),
                kys: (0..g.kh).filter(|k| k % s == cy).collect(),
                kxs: (0..g.kw).rev().filter(|k| k % s == cx).collect(),
            };
            if class.ys.is_empty() || class.xs.is_empty() || class.kys.is_empty() || class.kxs.is_empty() {
                continue; // no tap reaches these pixels: their gradient stays zero
            }
            data_grad_class(dy, w, g, &class, dx_ptr, precision);
        }
    }
}

fn data_grad_class(dy: &[f32], w: &[f32], g: &ConvGeom, c: &Class, dx: SharedMut, precision: MulPrecision) {
    let kc = c.kys.len() * c.kxs.len() * g.cout;
    // The class's weight matrix, rows (tap, co), columns ci.
    let mut wc = Vec::with_capacity(kc * g.cin);
    for &ky in &c.kys {
        for &kx in &c.kxs {
            for co in 0..g.cout {
                let src = ((co * g.kh + ky) * g.kw + kx) * g.cin;
                wc.extend_from_slice(&w[src..src + g.cin]);
            }
        }
    }
    let per_image = c.ys.len() * c.xs.len();
    let pixels = g.n * per_image;
    let tile = tile_rows(kc, pixels);
    // Where input pixel `p` of the class sits in `dx`.
    let dst_of = |p: usize| {
        let (b, rem) = (p / per_image, p % per_image);
        let (iy, ix) = (c.ys[rem / c.xs.len()], c.xs[rem % c.xs.len()]);
        ((b * g.h + iy) * g.w + ix) * g.cin
    };
    if weights_outweigh_tiles(pixels, tile, kc, g.cin) {
        const PART: usize = 32;
        let mut gather = crate::alloc::take(pixels * kc);
        gather.par_chunks_mut(PART * kc).enumerate().for_each(|(i, part)| {
            for (j, row) in part.chunks_mut(kc).enumerate() {
                gather_row(dy, g, c, i * PART + j, row);
            }
        });
        let mut out = crate::alloc::take(pixels * g.cin);
        let (a, w) = (MatRef::new(&gather, pixels, kc), MatRef::new(&wc, kc, g.cin));
        matmul_in(precision, MatMut::new(&mut out, pixels, g.cin), a, w, false, Threads::Pool);
        out.par_chunks(g.cin).enumerate().for_each(|(p, row)| {
            // SAFETY: every input pixel belongs to exactly one class and appears once in it, so no two
            // writers touch the same `cin` values, and `dst + cin <= dx.len()` by construction.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dx.get().add(dst_of(p)), g.cin) };
        });
        crate::alloc::give(gather);
        crate::alloc::give(out);
        return;
    }
    let tiles = pixels.div_ceil(tile);
    (0..tiles).into_par_iter().for_each(|t| {
        let p0 = t * tile;
        let rows = tile.min(pixels - p0);
        with_scratch(rows * kc, rows * g.cin, |gather, out| {
            for i in 0..rows {
                gather_row(dy, g, c, p0 + i, &mut gather[i * kc..(i + 1) * kc]);
            }
            matmul_in(
                precision,
                MatMut::new(out, rows, g.cin),
                MatRef::new(gather, rows, kc),
                MatRef::new(&wc, kc, g.cin),
                false,
                Threads::Serial,
            );
            for i in 0..rows {
                // SAFETY: every input pixel belongs to exactly one class and one tile, so no two
                // writers touch the same `cin` values, and `dst + cin <= dx.len()` by construction.
                unsafe {
                    std::ptr::copy_nonoverlapping(out[i * g.cin..].as_ptr(), dx.get().add(dst_of(p0 + i)), g.cin)
                };
            }
        });
    });
}

/// The gather row of input pixel `p` of a class: for each tap, the `cout` gradients of the output
/// pixel that tap connects it to (zeros where that output pixel does not exist).
fn gather_row(dy: &[f32], g: &ConvGeom, c: &Class, p: usize, row: &mut [f32]) {
    let per_image = c.ys.len() * c.xs.len();
    let (b, rem) = (p / per_image, p % per_image);
    let (iy, ix) = (c.ys[rem / c.xs.len()], c.xs[rem % c.xs.len()]);
    let run = c.kxs.len() * g.cout;
    // Taps are ordered by decreasing kx, so output columns increase by one along the run.
    let ox_first = (ix + g.pad) as isize - c.kxs[0] as isize; // numerator for the largest kx
    let ox0 = ox_first.div_euclid(g.stride as isize);
    // For tap j the output column is ox0 + j (exact division: the class guarantees divisibility).
    let j_lo = (-ox0).max(0) as usize;
    let j_hi = ((g.ow as isize - ox0).max(0) as usize).min(c.kxs.len());
    for (ty, &ky) in c.kys.iter().enumerate() {
        let seg = &mut row[ty * run..(ty + 1) * run];
        let num = (iy + g.pad) as isize - ky as isize;
        let oy = num / g.stride as isize;
        if num < 0 || oy >= g.oh as isize || j_lo >= j_hi {
            seg.fill(0.0);
            continue;
        }
        seg[..j_lo * g.cout].fill(0.0);
        seg[j_hi * g.cout..].fill(0.0);
        let src = ((b * g.oh + oy as usize) * g.ow + (ox0 + j_lo as isize) as usize) * g.cout;
        seg[j_lo * g.cout..j_hi * g.cout].copy_from_slice(&dy[src..src + (j_hi - j_lo) * g.cout]);
    }
}
