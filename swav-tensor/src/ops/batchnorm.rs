//! Batch normalisation over the last (channel) dimension, for NHWC `[n, h, w, c]` (BatchNorm2d) and
//! `[n, c]` (BatchNorm1d) alike: both are `rows x c` with statistics per channel.
//!
//! The forward optionally fuses what follows a BN in a ResNet, `y = relu(bn(x) [+ residual])`, because
//! on the CPU these elementwise passes cost as much memory traffic as the normalisation itself.
//! Training mode uses the batch statistics (biased variance) and updates the running statistics with
//! PyTorch's semantics: `running = (1 - momentum) running + momentum * stat`, the variance unbiased
//! (`* rows / (rows - 1)`). Statistics are accumulated in f64.
//!
//! Backward (with `xhat = (x - mean) * rstd` and `g = dy * [y > 0]` when the ReLU is fused):
//! `dgamma += sum g xhat`, `dbeta += sum g`, `dx = gamma rstd (g - mean(g) - xhat mean(g xhat))`,
//! and `dresidual = g`.

use rayon::prelude::*;

use crate::error::shape_err;
use crate::parallel::{rows_per_chunk, sum_rows};
use crate::{Result, Tensor};

/// Values per parallel chunk of the elementwise passes.
const CHUNK_VALUES: usize = 1 << 15;

/// What `y = act(bn(x) + residual)` adds after the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fused {
    pub residual: bool,
    pub relu: bool,
}

impl Fused {
    pub const NONE: Fused = Fused { residual: false, relu: false };
    pub const RELU: Fused = Fused { residual: false, relu: true };
    pub const RESIDUAL_RELU: Fused = Fused { residual: true, relu: true };
}

/// The parameters and running statistics of one BN layer (all `[c]`).
pub struct BnParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f32,
}

/// What the backward of a training-mode forward needs besides `x` and `y`.
#[derive(Clone, Debug)]
pub struct BnCache {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

fn channels(x: &Tensor, p: &BnParams<'_>) -> Result<(usize, usize)> {
    let c = *x.shape().last().ok_or_else(|| shape_err("batchnorm", "scalar input"))?;
    if p.gamma.shape() != [c] || p.beta.shape() != [c] {
        return Err(shape_err("batchnorm", format!("{c} channels but gamma {:?}, beta {:?}", p.gamma.shape(), p.beta.shape())));
    }
    Ok((x.len() / c.max(1), c))
}

/// Training-mode forward: normalises with the batch statistics, updates the running statistics, and
/// returns `y` with the cache for the backward.
pub fn batchnorm_train_forward(
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BnCache)> {
    let (rows, c) = channels(x, p)?;
    if rows < 2 {
        return Err(shape_err("batchnorm", format!("training mode needs more than one value per channel, got {rows}")));
    }
    let xs = x.as_slice();
    let chunk = rows_per_chunk(c, CHUNK_VALUES);
    let sums = sum_rows(rows, 2 * c, chunk, |r, acc| {
        let (s1, s2) = acc.split_at_mut(c);
        for row in xs[r.start * c..r.end * c].chunks_exact(c) {
            for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                let v = v as f64;
                *a += v;
                *b += v * v;
            }
        }
    });
    let n = rows as f64;
    let mut mean = vec![0.0f32; c];
    let mut rstd = vec![0.0f32; c];
    let (rm, rv) = (running_mean.as_mut_slice(), running_var.as_mut_slice());
    for ch in 0..c {
        let mu = sums[ch] / n;
        let var = (sums[c + ch] / n - mu * mu).max(0.0);
        mean[ch] = mu as f32;
        rstd[ch] = (1.0 / (var + p.eps as f64).sqrt()) as f32;
        rm[ch] = (1.0 - momentum) * rm[ch] + momentum * mu as f32;
        rv[ch] = (1.0 - momentum) * rv[ch] + momentum * (var * n / (n - 1.0)) as f32;
    }
    let y = normalize(x, p, &mean, &rstd, residual, relu)?;
    Ok((y, BnCache { mean, rstd }))
}

/// Evaluation-mode forward with the running statistics.
pub fn batchnorm_eval_forward(
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &Tensor,
    running_var: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let rstd: Vec<f32> = running_var.as_slice().iter().map(|&v| 1.0 / (v + p.eps).sqrt()).collect();
    normalize(x, p, running_mean.as_slice(), &rstd, residual, relu)
}

/// `y = act((x - mean) rstd gamma + beta [+ residual])` in one pass. The mean is subtracted before
/// scaling (not folded into a shift) because `x scale - mean scale` loses precision when |mean| >> std.
fn normalize(x: &Tensor, p: &BnParams<'_>, mean: &[f32], rstd: &[f32], residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let (_, c) = channels(x, p)?;
    if let Some(r) = residual {
        x.check_same_shape("batchnorm (residual)", r)?;
    }
    let (gamma, shift) = (p.gamma.as_slice(), p.beta.as_slice());
    let scale: Vec<f32> = (0..c).map(|i| rstd[i] * gamma[i]).collect();
    let mut y = Tensor::zeros(x.shape(), x.device());
    let chunk = rows_per_chunk(c, CHUNK_VALUES) * c;
    let xs = x.as_slice();
    let res = residual.map(|r| r.as_slice());
    y.as_mut_slice().par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
        let start = i * chunk;
        let xin = &xs[start..start + out.len()];
        for (o_row, x_row) in out.chunks_exact_mut(c).zip(xin.chunks_exact(c)) {
            for ((((o, &v), &m), &a), &b) in o_row.iter_mut().zip(x_row).zip(mean).zip(&scale).zip(shift) {
                *o = (v - m) * a + b;
            }
        }
        if let Some(res) = res {
            let len = out.len();
            for (o, &r) in out.iter_mut().zip(&res[start..start + len]) {
                *o += r;
            }
        }
        if relu {
            for o in out.iter_mut() {
                *o = o.max(0.0);
            }
        }
    });
    Ok(y)
}

/// Backward of the training-mode forward. `y` is the forward's output (only read for the ReLU mask).
/// Accumulates `dgamma`, `dbeta`; returns `dx` and, when the forward had a residual, its gradient.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    p: &BnParams<'_>,
    cache: &BnCache,
    fused: Fused,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, c) = channels(x, p)?;
    x.check_same_shape("batchnorm_backward (dy)", dy)?;
    x.check_same_shape("batchnorm_backward (y)", y)?;
    let (xs, ys) = (x.as_slice(), y.as_slice());
    let (mean, rstd) = (&cache.mean, &cache.rstd);
    // g = dy masked by the ReLU. It is materialised only when the residual's gradient needs it.
    let g: Option<Tensor> = fused.residual.then(|| {
        let mut g = dy.clone();
        if fused.relu {
            g.as_mut_slice().par_iter_mut().zip(ys.par_iter()).for_each(|(d, &yv)| {
                if yv <= 0.0 {
                    *d = 0.0;
                }
            });
        }
        g
    });
    let gs: &[f32] = g.as_ref().map_or(dy.as_slice(), |t| t.as_slice());
    let mask = fused.relu && g.is_none();
    let grad_row = |start: usize, out: &mut [f32]| {
        let len = out.len();
        out.copy_from_slice(&gs[start..start + len]);
        if mask {
            for (o, &yv) in out.iter_mut().zip(&ys[start..start + len]) {
                if yv <= 0.0 {
                    *o = 0.0;
                }
            }
        }
    };
    let chunk = rows_per_chunk(c, CHUNK_VALUES);
    let sums = sum_rows(rows, 2 * c, chunk, |r, acc| {
        let (sg, sgx) = acc.split_at_mut(c);
        let mut gv = vec![0.0f32; c];
        for row in r {
            grad_row(row * c, &mut gv);
            let xr = &xs[row * c..(row + 1) * c];
            for ch in 0..c {
                let xhat = (xr[ch] - mean[ch]) * rstd[ch];
                sg[ch] += gv[ch] as f64;
                sgx[ch] += (gv[ch] * xhat) as f64;
            }
        }
    });
    let gamma = p.gamma.as_slice();
    let (dga, dbe) = (dgamma.as_mut_slice(), dbeta.as_mut_slice());
    for ch in 0..c {
        dga[ch] += sums[c + ch] as f32;
        dbe[ch] += sums[ch] as f32;
    }
    let mean_g: Vec<f32> = (0..c).map(|ch| (sums[ch] / rows as f64) as f32).collect();
    let mean_gx: Vec<f32> = (0..c).map(|ch| (sums[c + ch] / rows as f64) as f32).collect();
    let k: Vec<f32> = (0..c).map(|ch| gamma[ch] * rstd[ch]).collect();
    let mut dx = Tensor::zeros(x.shape(), x.device());
    let chunk_vals = chunk * c;
    dx.as_mut_slice().par_chunks_mut(chunk_vals).enumerate().for_each(|(ci, out)| {
        let start = ci * chunk_vals;
        for (r, o_row) in out.chunks_exact_mut(c).enumerate() {
            let at = start + r * c;
            grad_row(at, o_row);
            let xr = &xs[at..at + c];
            for ch in 0..c {
                let xhat = (xr[ch] - mean[ch]) * rstd[ch];
                o_row[ch] = k[ch] * (o_row[ch] - mean_g[ch] - xhat * mean_gx[ch]);
            }
        }
    });
    Ok((dx, g))
}
