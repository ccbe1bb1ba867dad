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
//! and `dresidual = g`. Without a residual, the mask `y > 0` is recomputed from `x` (the forward's
//! own expression, so the same bits) instead of read from `y`: one stream of memory less.
//! The per-row loops are compiled per instruction set (`simd_fn!`), with the same bits at every level.

use rayon::prelude::*;
use swav_core::simd_fn;

use crate::collective::Collective;
use crate::error::shape_err;
use crate::parallel::{rows_per_chunk, sum_rows};
use crate::TensorError;
use crate::{Result, Tensor};

/// Values per parallel chunk of the elementwise passes.
const CHUNK_VALUES: usize = 1 << 15;

/// Rows summed in f32 before the partial sums are added to the f64 totals.
const SUM_BLOCK: usize = 32;

/// Adds two f32 block sums into the f64 accumulator `[first | second]` and clears them.
#[inline(always)]
fn flush(first: &mut [f32], second: &mut [f32], acc: &mut [f64]) {
    let c = first.len();
    for ch in 0..c {
        acc[ch] += first[ch] as f64;
        acc[c + ch] += second[ch] as f64;
        first[ch] = 0.0;
        second[ch] = 0.0;
    }
}

/// What `y = act(bn(x) + residual)` adds after the normalisation: the backward must be told what its
/// forward fused (the forwards take the same two choices as `residual: Option<..>` and `relu: bool`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fused {
    /// A residual was added after the normalisation; the backward then returns its gradient too.
    pub residual: bool,
    /// A ReLU followed; the backward masks the gradient where the output `y` is not positive.
    pub relu: bool,
}

impl Fused {
    /// `y = bn(x)`.
    pub const NONE: Fused = Fused { residual: false, relu: false };
    /// `y = relu(bn(x))`.
    pub const RELU: Fused = Fused { residual: false, relu: true };
    /// `y = relu(bn(x) + residual)`: the end of a ResNet block.
    pub const RESIDUAL_RELU: Fused = Fused { residual: true, relu: true };
}

/// The learned parameters of one BN layer and its epsilon; the running statistics are passed to the
/// forwards separately, since only the training forward updates them.
pub struct BnParams<'a> {
    /// Per-channel scale, `[c]` (PyTorch's `weight`).
    pub gamma: &'a Tensor,
    /// Per-channel shift, `[c]` (PyTorch's `bias`).
    pub beta: &'a Tensor,
    /// Added to the variance before the square root (PyTorch's default is 1e-5).
    pub eps: f32,
}

/// What the backward of a training-mode forward needs besides `x` and `y`: the batch mean and
/// `1 / sqrt(var + eps)` per channel (`[c]`, f32), on the device of the activations.
#[derive(Clone, Debug)]
pub struct BnCache {
    /// The batch mean of each channel, `[c]`.
    pub mean: Tensor,
    /// `1 / sqrt(var + eps)` of each channel with the biased batch variance, `[c]`.
    pub rstd: Tensor,
}

pub(crate) fn channels(x: &Tensor, p: &BnParams<'_>) -> Result<(usize, usize)> {
    let c = *x.shape().last().ok_or_else(|| shape_err("batchnorm", "scalar input"))?;
    if p.gamma.shape() != [c] || p.beta.shape() != [c] {
        return Err(shape_err(
            "batchnorm",
            format!("{c} channels but gamma {:?}, beta {:?}", p.gamma.shape(), p.beta.shape()),
        ));
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
    train_forward(x, p, running_mean, running_var, momentum, residual, relu, None)
}

/// [`batchnorm_train_forward`] with the batch statistics of every rank of `group` (SyncBatchNorm):
/// the per-channel sums and the row counts are all-reduced, so every rank normalises with the
/// statistics of the group's whole batch. On a CUDA device the per-channel sums come to the host
/// for the exchange (one round trip per batch norm).
#[allow(clippy::too_many_arguments)]
pub fn sync_batchnorm_train_forward(
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    residual: Option<&Tensor>,
    relu: bool,
    group: &dyn Collective,
) -> Result<(Tensor, BnCache)> {
    train_forward(x, p, running_mean, running_var, momentum, residual, relu, Some(group))
}

/// The group to synchronise over: none for a group of one rank.
fn group_of(group: Option<&dyn Collective>) -> Option<&dyn Collective> {
    group.filter(|g| g.world_size() > 1)
}

/// Sums `[sums | rows]` over the group, in place; returns the group's row count.
pub(crate) fn reduce_over_group(sums: &mut Vec<f64>, rows: usize, group: Option<&dyn Collective>) -> Result<f64> {
    let Some(group) = group else { return Ok(rows as f64) };
    sums.push(rows as f64);
    group.all_reduce_sum_f64(sums).map_err(|e| TensorError::Collective(e.to_string()))?;
    Ok(sums.pop().expect("pushed"))
}

#[allow(clippy::too_many_arguments)]
fn train_forward(
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    residual: Option<&Tensor>,
    relu: bool,
    group: Option<&dyn Collective>,
) -> Result<(Tensor, BnCache)> {
    let _p = crate::profile::scope("bn forward");
    let group = group_of(group);
    if let Some(rt) = x.runtime() {
        return match group {
            Some(g) => super::batchnorm_cuda::sync_train_forward_on(
                rt,
                x,
                p,
                running_mean,
                running_var,
                momentum,
                residual,
                relu,
                g,
            ),
            None => {
                super::batchnorm_cuda::train_forward_on(rt, x, p, running_mean, running_var, momentum, residual, relu)
            }
        };
    }
    let (rows, c) = channels(x, p)?;
    let xs = x.as_slice();
    let chunk = rows_per_chunk(c, CHUNK_VALUES);
    let mut sums = sum_rows(rows, 2 * c, chunk, |r, acc| moments(&xs[r.start * c..r.end * c], c, acc));
    let n = reduce_over_group(&mut sums, rows, group)?;
    let (mean, rstd) =
        batch_statistics(&sums, n, p.eps, momentum, running_mean.as_mut_slice(), running_var.as_mut_slice())?;
    let y = normalize(x, p, &mean, &rstd, residual, relu)?;
    Ok((y, BnCache { mean: Tensor::from_vec(&[c], mean)?, rstd: Tensor::from_vec(&[c], rstd)? }))
}

/// Mean and `1 / sqrt(var + eps)` per channel from the sums `[sum x | sum x^2]` of `n` rows, and the
/// running statistics `rm`, `rv` updated (PyTorch: the unbiased variance, `momentum` of the new one).
pub(crate) fn batch_statistics(
    sums: &[f64],
    n: f64,
    eps: f32,
    momentum: f32,
    rm: &mut [f32],
    rv: &mut [f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    if n < 2.0 {
        return Err(shape_err("batchnorm", format!("training mode needs more than one value per channel, got {n}")));
    }
    let c = rm.len();
    let mut mean = vec![0.0f32; c];
    let mut rstd = vec![0.0f32; c];
    for ch in 0..c {
        let mu = sums[ch] / n;
        let var = (sums[c + ch] / n - mu * mu).max(0.0);
        mean[ch] = mu as f32;
        rstd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
        rm[ch] = (1.0 - momentum) * rm[ch] + momentum * mu as f32;
        rv[ch] = (1.0 - momentum) * rv[ch] + momentum * (var * n / (n - 1.0)) as f32;
    }
    Ok((mean, rstd))
}

simd_fn! {
    /// Adds `[sum x | sum x^2]` per channel (f64) of the `c`-wide rows `xs` into `acc`.
    fn moments(xs: &[f32], c: usize, acc: &mut [f64]) {
        let (s1, s2) = acc.split_at_mut(c);
        for row in xs.chunks_exact(c) {
            for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                let v = v as f64;
                *a += v;
                *b += v * v;
            }
        }
    }
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
    if let Some(rt) = x.runtime() {
        return super::batchnorm_cuda::eval_forward_on(rt, x, p, running_mean, running_var, residual, relu);
    }
    let rstd: Vec<f32> = running_var.as_slice().iter().map(|&v| 1.0 / (v + p.eps).sqrt()).collect();
    normalize(x, p, running_mean.as_slice(), &rstd, residual, relu)
}

/// `y = act((x - mean) rstd gamma + beta [+ residual])` in one pass. The mean is subtracted before
/// scaling (not folded into a shift) because `x scale - mean scale` loses precision when |mean| >> std.
fn normalize(
    x: &Tensor,
    p: &BnParams<'_>,
    mean: &[f32],
    rstd: &[f32],
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let (_, c) = channels(x, p)?;
    if let Some(r) = residual {
        x.check_same_shape("batchnorm (residual)", r)?;
    }
    let shift = p.beta.as_slice();
    let scale = scales(rstd, p.gamma.as_slice());
    let mut y = Tensor::for_overwrite(x.shape(), x.device());
    let chunk = rows_per_chunk(c, CHUNK_VALUES) * c;
    let xs = x.as_slice();
    let res = residual.map(|r| r.as_slice());
    y.as_mut_slice().par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
        let start = i * chunk;
        let (xin, rin) = (&xs[start..start + out.len()], res.map(|r| &r[start..start + out.len()]));
        normalize_rows(out, xin, rin, Affine { mean, scale: &scale, shift }, relu);
    });
    Ok(y)
}

/// `rstd gamma` per channel: the forward's scale, which the backward recomputes for its mask.
fn scales(rstd: &[f32], gamma: &[f32]) -> Vec<f32> {
    rstd.iter().zip(gamma).map(|(&r, &g)| r * g).collect()
}

/// `(x - mean) scale + shift`: the one expression of the normalisation, so that the backward's mask
/// recomputed from `x` has the forward's bits.
#[inline(always)]
fn affine(x: f32, mean: f32, scale: f32, shift: f32) -> f32 {
    (x - mean) * scale + shift
}

/// `y = (x - mean) scale + shift` per channel.
#[derive(Clone, Copy)]
struct Affine<'a> {
    mean: &'a [f32],
    scale: &'a [f32],
    shift: &'a [f32],
}

simd_fn! {
    /// [`normalize`] on whole rows: `out = act((x - mean) scale + shift [+ res])`.
    fn normalize_rows(out: &mut [f32], xin: &[f32], res: Option<&[f32]>, k: Affine<'_>, relu: bool) {
        let c = k.mean.len();
        for (o_row, x_row) in out.chunks_exact_mut(c).zip(xin.chunks_exact(c)) {
            for ((((o, &v), &m), &a), &b) in o_row.iter_mut().zip(x_row).zip(k.mean).zip(k.scale).zip(k.shift) {
                *o = affine(v, m, a, b);
            }
        }
        if let Some(res) = res {
            for (o, &r) in out.iter_mut().zip(res) {
                *o += r;
            }
        }
        if relu {
            for o in out.iter_mut() {
                *o = o.max(0.0);
            }
        }
    }
}

/// Backward of the training-mode forward. `y` is the forward's output (only read for the ReLU mask
/// after a residual); `p` must hold the forward's parameters (without a residual, the mask is
/// recomputed from `x` with them).
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
    backward(x, y, dy, p, cache, fused, dgamma, dbeta, None)
}

/// Backward of [`sync_batchnorm_train_forward`]: the sums of the gradient that `dx` needs are
/// all-reduced over `group` (each rank's loss then gets its share of every rank's gradient, as
/// PyTorch's SyncBatchNorm); `dgamma` and `dbeta` get the group's sums divided by the group's size,
/// whose mean over the ranks (the gradient averaging that follows) is the mean of the ranks' shares.
#[allow(clippy::too_many_arguments)]
pub fn sync_batchnorm_backward(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    p: &BnParams<'_>,
    cache: &BnCache,
    fused: Fused,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
    group: &dyn Collective,
) -> Result<(Tensor, Option<Tensor>)> {
    backward(x, y, dy, p, cache, fused, dgamma, dbeta, Some(group))
}

#[allow(clippy::too_many_arguments)]
fn backward(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    p: &BnParams<'_>,
    cache: &BnCache,
    fused: Fused,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
    group: Option<&dyn Collective>,
) -> Result<(Tensor, Option<Tensor>)> {
    let _p = crate::profile::scope("bn backward");
    let group = group_of(group);
    if let Some(rt) = x.runtime() {
        return match group {
            Some(g) => super::batchnorm_cuda::sync_backward_on(rt, x, y, dy, p, cache, fused, dgamma, dbeta, g),
            None => super::batchnorm_cuda::backward_on(rt, x, y, dy, p, cache, fused, dgamma, dbeta),
        };
    }
    let (rows, c) = channels(x, p)?;
    x.check_same_shape("batchnorm_backward (dy)", dy)?;
    x.check_same_shape("batchnorm_backward (y)", y)?;
    let (xs, ys, dys) = (x.as_slice(), y.as_slice(), dy.as_slice());
    let (mean, rstd) = (&cache.mean.as_slice()[..c], &cache.rstd.as_slice()[..c]);
    let scale = scales(rstd, p.gamma.as_slice());
    let k = Affine { mean, scale: &scale, shift: p.beta.as_slice() };
    let mask = Mask::of(fused);
    // Pass 1: per-channel sums of g and g (x - mean), g = dy masked by the ReLU. Rows are summed in
    // f32 over short blocks (vectorised), the blocks in f64.
    let chunk = rows_per_chunk(c, CHUNK_VALUES);
    let mut sums = sum_rows(rows, 2 * c, chunk, |r, acc| {
        let at = r.start * c..r.end * c;
        let src = Rows { xs: &xs[at.clone()], ys: &ys[at.clone()], dys: &dys[at] };
        grad_sums(&src, k, mask, acc)
    });
    let n = reduce_over_group(&mut sums, rows, group)?;
    let coef =
        backward_coefficients(&sums, n, group, rstd, p.gamma.as_slice(), dgamma.as_mut_slice(), dbeta.as_mut_slice());
    // Pass 2: dx, and the residual's gradient (= g) in the same sweep.
    let mut dx = Tensor::for_overwrite(x.shape(), x.device());
    let mut g = fused.residual.then(|| Tensor::for_overwrite(x.shape(), x.device()));
    let chunk_vals = chunk * c;
    let pass2 = |start: usize, out: &mut [f32], gout: Option<&mut [f32]>| {
        let src = Rows {
            xs: &xs[start..start + out.len()],
            ys: &ys[start..start + out.len()],
            dys: &dys[start..start + out.len()],
        };
        input_grad(&src, k, &coef, mask, out, gout)
    };
    match &mut g {
        Some(gt) => dx
            .as_mut_slice()
            .par_chunks_mut(chunk_vals)
            .zip(gt.as_mut_slice().par_chunks_mut(chunk_vals))
            .enumerate()
            .for_each(|(i, (out, gout))| pass2(i * chunk_vals, out, Some(gout))),
        None => dx
            .as_mut_slice()
            .par_chunks_mut(chunk_vals)
            .enumerate()
            .for_each(|(i, out)| pass2(i * chunk_vals, out, None)),
    }
    Ok((dx, g))
}

/// Where the backward finds the ReLU's mask.
#[derive(Clone, Copy)]
enum Mask {
    /// No ReLU: `g = dy` everywhere.
    None,
    /// After a residual: where the forward's output `y` is positive.
    FromY,
    /// Without a residual, `y > 0` exactly where `(x - mean) scale + shift > 0`, the forward's own
    /// float expression with the same operands: recomputing it is cheaper than reading `y`, one
    /// stream of memory less in both passes.
    FromX,
}

impl Mask {
    fn of(fused: Fused) -> Mask {
        match (fused.relu, fused.residual) {
            (false, _) => Mask::None,
            (true, true) => Mask::FromY,
            (true, false) => Mask::FromX,
        }
    }
}

const MASK_NONE: u8 = 0;
const MASK_Y: u8 = 1;
const MASK_X: u8 = 2;

/// `g = dy` where the mask `M` (one of the `MASK_*` constants) lets it through, with the channel's
/// `mean`, `scale` and `shift` for `MASK_X`. A compile-time choice, so that the mask is a vector
/// blend, not a branch mispredicted on half the values.
#[inline(always)]
fn masked<const M: u8>(x: f32, y: f32, dy: f32, mean: f32, scale: f32, shift: f32) -> f32 {
    let live = match M {
        MASK_Y => y > 0.0,
        MASK_X => affine(x, mean, scale, shift) > 0.0,
        _ => true,
    };
    if live {
        dy
    } else {
        0.0
    }
}

simd_fn! {
    /// Pass 1 of the backward over whole rows: adds `[sum g | sum g (x - mean)]` into `acc`.
    fn grad_sums(src: &Rows<'_>, k: Affine<'_>, mask: Mask, acc: &mut [f64]) {
        match mask {
            Mask::None => grad_sums_rows::<MASK_NONE>(src, &k, acc),
            Mask::FromY => grad_sums_rows::<MASK_Y>(src, &k, acc),
            Mask::FromX => grad_sums_rows::<MASK_X>(src, &k, acc),
        }
    }
}

/// Rows summed into f32 sums, every `SUM_BLOCK` rows into the f64 totals.
#[inline(always)]
fn grad_sums_rows<const M: u8>(src: &Rows<'_>, k: &Affine<'_>, acc: &mut [f64]) {
    let c = k.mean.len();
    let (mean, scale, shift) = (&k.mean[..c], &k.scale[..c], &k.shift[..c]);
    let mut sg = vec![0.0f32; c];
    let mut sgx = vec![0.0f32; c];
    let rows = src.xs.chunks_exact(c).zip(src.ys.chunks_exact(c)).zip(src.dys.chunks_exact(c));
    for (b, ((xr, yr), dr)) in rows.enumerate() {
        let (sg, sgx) = (&mut sg[..c], &mut sgx[..c]);
        for ch in 0..c {
            let g = masked::<M>(xr[ch], yr[ch], dr[ch], mean[ch], scale[ch], shift[ch]);
            sg[ch] += g;
            sgx[ch] += g * (xr[ch] - mean[ch]);
        }
        if (b + 1) % SUM_BLOCK == 0 {
            flush(sg, sgx, acc);
        }
    }
    flush(&mut sg, &mut sgx, acc);
}

/// Per-channel coefficients of `dx = a g + b + e (x - mean)`.
pub(crate) struct Coefficients {
    pub(crate) a: Vec<f32>,
    pub(crate) b: Vec<f32>,
    pub(crate) e: Vec<f32>,
}

/// From the sums `[sum g | sum g (x - mean)]` of `n` rows: accumulates `dgamma` and `dbeta`, and
/// returns the coefficients of `dx = a g + b + e (x - mean)`.
pub(crate) fn backward_coefficients(
    sums: &[f64],
    n: f64,
    group: Option<&dyn Collective>,
    rstd: &[f32],
    gamma: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Coefficients {
    let c = rstd.len();
    // With a group, every rank takes 1/size of the group's dgamma and dbeta: once the gradients are
    // averaged over the ranks, that equals the mean of the ranks' own shares, without the rounding of
    // adding per-rank partial sums that nearly cancel.
    let share = group.map_or(1.0, |g| 1.0 / g.world_size() as f64);
    // dx = gamma rstd (g - mean(g) - xhat mean(g xhat)) = a g + b + e (x - mean).
    let mut coef = Coefficients { a: vec![0.0; c], b: vec![0.0; c], e: vec![0.0; c] };
    for ch in 0..c {
        let r = rstd[ch] as f64;
        let (sum_g, sum_gxhat) = (sums[ch], sums[c + ch] * r);
        dgamma[ch] += (sum_gxhat * share) as f32;
        dbeta[ch] += (sum_g * share) as f32;
        let k = gamma[ch] as f64 * r;
        coef.a[ch] = k as f32;
        coef.b[ch] = (-k * sum_g / n) as f32;
        coef.e[ch] = (-k * r * sum_gxhat / n) as f32;
    }
    coef
}

/// The same rows of the forward's input, output and the incoming gradient.
struct Rows<'a> {
    xs: &'a [f32],
    ys: &'a [f32],
    dys: &'a [f32],
}

simd_fn! {
    /// Pass 2 of the backward: `dx` (and `g`, the residual's gradient) for a run of whole rows.
    fn input_grad(src: &Rows<'_>, k: Affine<'_>, coef: &Coefficients, mask: Mask, out: &mut [f32], gout: Option<&mut [f32]>) {
        match mask {
            Mask::None => input_grad_rows::<MASK_NONE>(src, &k, coef, out, gout),
            Mask::FromY => input_grad_rows::<MASK_Y>(src, &k, coef, out, gout),
            Mask::FromX => input_grad_rows::<MASK_X>(src, &k, coef, out, gout),
        }
    }
}

#[inline(always)]
fn input_grad_rows<const M: u8>(
    src: &Rows<'_>,
    k: &Affine<'_>,
    coef: &Coefficients,
    out: &mut [f32],
    mut gout: Option<&mut [f32]>,
) {
    let c = k.mean.len();
    let (a, b, e) = (&coef.a[..c], &coef.b[..c], &coef.e[..c]);
    let (mean, scale, shift) = (&k.mean[..c], &k.scale[..c], &k.shift[..c]);
    for (row, o) in out.chunks_exact_mut(c).enumerate() {
        let at = row * c;
        let (xr, yr, dr) = (&src.xs[at..at + c], &src.ys[at..at + c], &src.dys[at..at + c]);
        for ch in 0..c {
            let g = masked::<M>(xr[ch], yr[ch], dr[ch], mean[ch], scale[ch], shift[ch]);
            o[ch] = a[ch] * g + b[ch] + e[ch] * (xr[ch] - mean[ch]);
        }
        if let Some(gout) = gout.as_deref_mut() {
            let gr = &mut gout[at..at + c];
            for ch in 0..c {
                gr[ch] = masked::<M>(xr[ch], yr[ch], dr[ch], mean[ch], scale[ch], shift[ch]);
            }
        }
    }
}
