//! Pooling on NHWC tensors: max-pool (any window and stride; padding never wins, as in PyTorch) and
//! global average pooling `[n, h, w, c] -> [n, c]`.
//!
//! The max-pool forward records, for each output value, the flat input index of its maximum (the
//! first one in window order on ties, as PyTorch); the backward adds each gradient there. Images are
//! independent, so both run in parallel over the batch.

use rayon::prelude::*;
use swav_core::simd_fn;

use crate::error::shape_err;
use crate::{Result, Tensor};

/// Sizes of one max-pool: input `[n, h, w, c]`, square `k x k` window, output `[n, oh, ow, c]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Images in the batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels (pooled independently).
    pub c: usize,
    /// Window side.
    pub k: usize,
    /// Step between windows, in pixels, along both axes.
    pub stride: usize,
    /// Implicit padding on every side (never selected as a maximum); at most `k / 2`, as in PyTorch.
    pub pad: usize,
    /// Output height, `(h + 2 pad - k) / stride + 1`.
    pub oh: usize,
    /// Output width, `(w + 2 pad - k) / stride + 1`.
    pub ow: usize,
}

impl PoolGeom {
    /// The geometry of a `k x k` max-pool with `stride` and `pad` on an NHWC input of shape `x_shape`;
    /// [`TensorError::Shape`](crate::TensorError::Shape) if the input is not 4-D, the stride or window
    /// is 0, `pad > k / 2`, or the padded input is smaller than the window.
    pub fn new(x_shape: &[usize], k: usize, stride: usize, pad: usize) -> Result<PoolGeom> {
        let &[n, h, w, c] = x_shape else {
            return Err(shape_err("max_pool", format!("input {x_shape:?} must be NHWC")));
        };
        if stride == 0 || k == 0 || 2 * pad > k || h + 2 * pad < k || w + 2 * pad < k {
            return Err(shape_err("max_pool", format!("window {k} stride {stride} pad {pad} on {h}x{w}")));
        }
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        Ok(PoolGeom { n, h, w, c, k, stride, pad, oh, ow })
    }
}

/// The argmax of each output of a max-pool forward (a flat index into its input), on the device of
/// the pooled tensor: what its backward needs.
#[derive(Debug)]
pub struct PoolIndices(pub(crate) Indices);

#[derive(Debug)]
pub(crate) enum Indices {
    Cpu(Vec<u32>),
    /// u32 indices on the device, with the window the backward's gather needs.
    Cuda {
        buf: crate::cuda::runtime::DeviceBuffer,
        len: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
}

impl PoolIndices {
    /// Number of indices (= outputs).
    pub fn len(&self) -> usize {
        match &self.0 {
            Indices::Cpu(v) => v.len(),
            Indices::Cuda { len, .. } => *len,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indices of a CPU max-pool.
    pub fn as_cpu(&self) -> Option<&[u32]> {
        match &self.0 {
            Indices::Cpu(v) => Some(v),
            Indices::Cuda { .. } => None,
        }
    }
}

/// Returns the pooled tensor and the argmax indices (into the input) for the backward.
pub fn max_pool_forward(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<(Tensor, PoolIndices)> {
    let _p = crate::profile::scope("max pool");
    let g = PoolGeom::new(x.shape(), k, stride, pad)?;
    if x.len() > u32::MAX as usize {
        return Err(shape_err("max_pool", "input larger than 2^32 values"));
    }
    if let Some(rt) = x.runtime() {
        return super::pool_cuda::max_pool_forward_on(rt, x, &g);
    }
    let mut y = Tensor::for_overwrite(&[g.n, g.oh, g.ow, g.c], x.device());
    let mut idx = vec![0u32; y.len()];
    let xs = x.as_slice();
    let per_out = g.oh * g.ow * g.c;
    y.as_mut_slice()
        .par_chunks_mut(per_out)
        .zip(idx.par_chunks_mut(per_out))
        .enumerate()
        .for_each(|(b, (yo, io))| max_pool_image(xs, &g, b, yo, io));
    Ok((y, PoolIndices(Indices::Cpu(idx))))
}

simd_fn! {
    /// The max-pool of image `b` into its outputs `yo` and argmax indices `io`.
    fn max_pool_image(xs: &[f32], g: &PoolGeom, b: usize, yo: &mut [f32], io: &mut [u32]) {
        yo.fill(f32::NEG_INFINITY);
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let o = (oy * g.ow + ox) * g.c;
                for ky in 0..g.k {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    for kx in 0..g.k {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix < 0 || ix >= g.w as isize {
                            continue;
                        }
                        let src = ((b * g.h + iy as usize) * g.w + ix as usize) * g.c;
                        let pixel = xs[src..src + g.c].iter().zip(&mut yo[o..o + g.c]).zip(&mut io[o..o + g.c]);
                        for (ch, ((&v, best), at)) in pixel.enumerate() {
                            // `>` keeps the first maximum; NaN propagates like PyTorch's max-pool. Both
                            // stores are selects, so that the loop vectorises.
                            let take = v > *best || v.is_nan();
                            *best = if take { v } else { *best };
                            *at = if take { (src + ch) as u32 } else { *at };
                        }
                    }
                }
            }
        }
    }
}

/// Adds each output gradient to the input its forward chose.
pub fn max_pool_backward(x_shape: &[usize], idx: &PoolIndices, dy: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope("max pool");
    if idx.len() != dy.len() {
        return Err(shape_err("max_pool_backward", format!("{} indices for {} gradients", idx.len(), dy.len())));
    }
    let idx = match &idx.0 {
        Indices::Cpu(v) => v,
        Indices::Cuda { buf, k, stride, pad, .. } => {
            return super::pool_cuda::max_pool_backward_on(buf, x_shape, (*k, *stride, *pad), dy);
        }
    };
    let n = x_shape[0];
    // Each image's gradient is zeroed by the thread that scatters into it, while it is in that core's
    // cache (a zeroed tensor would be one serial pass over all images first).
    let mut dx = Tensor::for_overwrite(x_shape, dy.device());
    let per_in = dx.len() / n.max(1);
    let per_out = dy.len() / n.max(1);
    let dys = dy.as_slice();
    dx.as_mut_slice().par_chunks_mut(per_in.max(1)).enumerate().for_each(|(b, dxb)| {
        dxb.fill(0.0);
        let base = b * per_in;
        for o in b * per_out..(b + 1) * per_out {
            dxb[idx[o] as usize - base] += dys[o];
        }
    });
    Ok(dx)
}

/// `[n, h, w, c] -> [n, c]`, the mean over the pixels of each image.
pub fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope("avg pool");
    let &[n, h, w, c] = x.shape() else {
        return Err(shape_err("global_avg_pool", format!("input {:?} must be NHWC", x.shape())));
    };
    if let Some(rt) = x.runtime() {
        return super::pool_cuda::avg_pool_forward_on(rt, x);
    }
    let mut y = Tensor::zeros(&[n, c], x.device());
    let xs = x.as_slice();
    let inv = 1.0 / (h * w) as f32;
    y.as_mut_slice()
        .par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(b, yb)| mean_pixel(&xs[b * h * w * c..(b + 1) * h * w * c], inv, yb));
    Ok(y)
}

simd_fn! {
    /// `out = inv * sum of the c-wide pixels` (summed in f64).
    fn mean_pixel(pixels: &[f32], inv: f32, out: &mut [f32]) {
        let c = out.len();
        let mut acc = vec![0.0f64; c];
        for px in pixels.chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(px) {
                *a += v as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32 * inv;
        }
    }
}

/// Spreads each gradient evenly over the pixels of its image; `x` is the forward's input (its shape,
/// device and dtype are those of the result).
pub fn global_avg_pool_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope("avg pool");
    let x_shape = x.shape();
    let &[n, h, w, c] = x_shape else {
        return Err(shape_err("global_avg_pool_backward", format!("input shape {x_shape:?} must be NHWC")));
    };
    if dy.shape() != [n, c] {
        return Err(shape_err("global_avg_pool_backward", format!("dy {:?} for input {x_shape:?}", dy.shape())));
    }
    if let Some(rt) = dy.runtime() {
        return super::pool_cuda::avg_pool_backward_on(rt, x, dy);
    }
    let mut dx = Tensor::for_overwrite(x_shape, dy.device());
    let inv = 1.0 / (h * w) as f32;
    let dys = dy.as_slice();
    dx.as_mut_slice().par_chunks_mut((h * w * c).max(1)).enumerate().for_each(|(b, dxb)| {
        let g = &dys[b * c..(b + 1) * c];
        for px in dxb.chunks_exact_mut(c) {
            for (d, &v) in px.iter_mut().zip(g) {
                *d = v * inv;
            }
        }
    });
    Ok(dx)
}
