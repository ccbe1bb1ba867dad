//! Launch plans of the batch-norm kernels (`batchnorm.cu`; the formulas are in its header and in
//! `batchnorm.rs`, the CPU twin).
//!
//! Buffers (names in [`buf`]): activations `x`, `y`, `residual`, `dy`, `dx`, `dresidual` in the storage
//! type, `rows x channels`; everything per channel is fp32 `[channels]`; `partials` is
//! `[tiles, 2 channels]` and `coef` `[3 channels]` of scratch.

#![warn(missing_docs)]

use crate::collective::Collective;
use crate::cuda::plan::{elementwise_grid, Arg, BufId, DType, Plan, Role, Storage, ELEMENTWISE_BLOCK};
use crate::cuda::runtime::DeviceRuntime;
use crate::cuda::Source;
use crate::error::shape_err;
use crate::ops::batchnorm::{channels, BnCache, BnParams, Fused};
use crate::ops::check_device;
use crate::{Result, Tensor};
use std::sync::Arc;

/// The kernel file.
pub const SOURCE: Source = Source { name: "batchnorm.cu", code: include_str!("batchnorm.cu") };

/// Buffer names of the batch-norm plans.
pub mod buf {
    use crate::cuda::plan::BufId;
    /// Input activation.
    pub const X: BufId = BufId("x");
    /// Added before the ReLU when fused.
    pub const RESIDUAL: BufId = BufId("residual");
    /// Scale, `[c]`.
    pub const GAMMA: BufId = BufId("gamma");
    /// Shift, `[c]`.
    pub const BETA: BufId = BufId("beta");
    /// Running mean, `[c]`.
    pub const RUNNING_MEAN: BufId = BufId("running_mean");
    /// Running (unbiased) variance, `[c]`.
    pub const RUNNING_VAR: BufId = BufId("running_var");
    /// Batch mean saved by the training forward for the backward, `[c]`.
    pub const MEAN: BufId = BufId("mean");
    /// `1 / sqrt(var + eps)` saved by the training forward, `[c]`.
    pub const RSTD: BufId = BufId("rstd");
    /// Output activation.
    pub const Y: BufId = BufId("y");
    /// Gradient of `y`.
    pub const DY: BufId = BufId("dy");
    /// Gradient of `x`.
    pub const DX: BufId = BufId("dx");
    /// Gradient of the residual (`= dy` masked by the ReLU).
    pub const DRESIDUAL: BufId = BufId("dresidual");
    /// Gradient of gamma, accumulated, `[c]`.
    pub const DGAMMA: BufId = BufId("dgamma");
    /// Gradient of beta, accumulated, `[c]`.
    pub const DBETA: BufId = BufId("dbeta");
    /// Per-tile partial sums (scratch).
    pub const PARTIALS: BufId = BufId("partials");
    /// dx coefficients (scratch).
    pub const COEF: BufId = BufId("coef");
}
use buf::*;

/// Channels per block and row lanes per block of the reduction kernels (`BN_CH`, `BN_LANES`).
const CHANNELS_PER_BLOCK: usize = 32;
const ROW_LANES: u32 = 8;
/// Tiles per channel group at most (fewer partials to combine) and rows per tile at least (enough work
/// per block).
const MAX_TILES: usize = 512;
const MIN_TILE_ROWS: usize = 64;

/// A `rows x channels` activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    /// `n h w` for BatchNorm2d, `n` for BatchNorm1d.
    pub rows: usize,
    /// Channels (the last dimension).
    pub channels: usize,
}

impl BnShape {
    fn check(&self) -> Result<()> {
        if self.channels == 0 || self.rows == 0 || self.rows > i32::MAX as usize || self.channels > i32::MAX as usize {
            return Err(shape_err("batchnorm (cuda)", format!("{} rows x {} channels", self.rows, self.channels)));
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.rows * self.channels
    }

    /// Rows per tile and number of tiles: from the shape only, so results do not depend on the GPU.
    pub fn tiling(&self) -> (usize, usize) {
        let tile_rows = self.rows.div_ceil(MAX_TILES).max(MIN_TILE_ROWS);
        (tile_rows, self.rows.div_ceil(tile_rows))
    }

    fn reduce_grid(&self) -> [u32; 3] {
        let (_, tiles) = self.tiling();
        [self.channels.div_ceil(CHANNELS_PER_BLOCK) as u32, tiles as u32, 1]
    }

    fn combine_grid(&self) -> [u32; 3] {
        [self.channels.div_ceil(CHANNELS_PER_BLOCK) as u32, 1, 1]
    }
}

const REDUCE_BLOCK: [u32; 3] = [CHANNELS_PER_BLOCK as u32, ROW_LANES, 1];

fn activation_buffers(plan: &mut Plan, s: BnShape, storage: Storage, fused: Fused) {
    plan.buffer(X, storage.dtype(), s.len(), Role::In);
    if fused.residual {
        plan.buffer(RESIDUAL, storage.dtype(), s.len(), Role::In);
    }
    plan.buffer(GAMMA, DType::F32, s.channels, Role::In);
    plan.buffer(BETA, DType::F32, s.channels, Role::In);
}

fn apply(plan: &mut Plan, s: BnShape, storage: Storage, fused: Fused, mean: BufId) {
    let residual = if fused.residual { Arg::Buf(RESIDUAL) } else { Arg::Null };
    plan.buffer(Y, storage.dtype(), s.len(), Role::Out);
    plan.launch(
        storage.pick("bn_apply_f32", "bn_apply_bf16"),
        elementwise_grid(s.len()),
        [ELEMENTWISE_BLOCK, 1, 1],
        vec![
            Arg::Buf(X),
            residual,
            Arg::Buf(mean),
            Arg::Buf(RSTD),
            Arg::Buf(GAMMA),
            Arg::Buf(BETA),
            Arg::I64(s.len() as i64),
            Arg::I32(s.channels as i32),
            Arg::I32(fused.relu as i32),
            Arg::Buf(Y),
        ],
    );
}

/// Training-mode forward: batch statistics (saved in `mean`, `rstd`), running statistics updated,
/// `y = relu?(bn(x) [+ residual])`. Needs at least two rows, like the CPU op.
pub fn train_forward(s: BnShape, storage: Storage, fused: Fused, momentum: f32, eps: f32) -> Result<Plan> {
    s.check()?;
    if s.rows < 2 {
        return Err(shape_err(
            "batchnorm (cuda)",
            format!("training mode needs more than one value per channel, got {}", s.rows),
        ));
    }
    let (_, tiles) = s.tiling();
    let c = s.channels;
    let mut plan = Plan::default();
    activation_buffers(&mut plan, s, storage, fused);
    plan.buffer(RUNNING_MEAN, DType::F32, c, Role::InOut)
        .buffer(RUNNING_VAR, DType::F32, c, Role::InOut)
        .buffer(MEAN, DType::F32, c, Role::Out)
        .buffer(RSTD, DType::F32, c, Role::Out)
        .buffer(PARTIALS, DType::F32, 2 * c * tiles, Role::Scratch);
    stats_partial(&mut plan, s, storage);
    plan.launch(
        storage.pick("bn_stats_combine_f32", "bn_stats_combine_bf16"),
        s.combine_grid(),
        REDUCE_BLOCK,
        vec![
            Arg::Buf(X),
            Arg::Buf(PARTIALS),
            Arg::I32(tiles as i32),
            Arg::I32(s.rows as i32),
            Arg::I32(c as i32),
            Arg::F32(momentum),
            Arg::F32(eps),
            Arg::Buf(MEAN),
            Arg::Buf(RSTD),
            Arg::Buf(RUNNING_MEAN),
            Arg::Buf(RUNNING_VAR),
        ],
    );
    apply(&mut plan, s, storage, fused, MEAN);
    Ok(plan)
}

/// Evaluation-mode forward with the running statistics (`rstd` is scratch here).
pub fn eval_forward(s: BnShape, storage: Storage, fused: Fused, eps: f32) -> Result<Plan> {
    s.check()?;
    let c = s.channels;
    let mut plan = Plan::default();
    activation_buffers(&mut plan, s, storage, fused);
    plan.buffer(RUNNING_MEAN, DType::F32, c, Role::In).buffer(RUNNING_VAR, DType::F32, c, Role::In).buffer(
        RSTD,
        DType::F32,
        c,
        Role::Scratch,
    );
    plan.launch(
        "bn_rstd_from_var",
        [c.div_ceil(ELEMENTWISE_BLOCK as usize) as u32, 1, 1],
        [ELEMENTWISE_BLOCK, 1, 1],
        vec![Arg::Buf(RUNNING_VAR), Arg::I32(c as i32), Arg::F32(eps), Arg::Buf(RSTD)],
    );
    apply(&mut plan, s, storage, fused, RUNNING_MEAN);
    Ok(plan)
}

/// Backward of the training forward: `dx` (and `dresidual` when the forward had a residual);
/// `dgamma`, `dbeta` accumulated. Reads the forward's `x`, `y`, `mean`, `rstd`.
pub fn backward(s: BnShape, storage: Storage, fused: Fused) -> Result<Plan> {
    s.check()?;
    let (_, tiles) = s.tiling();
    let (c, act) = (s.channels, storage.dtype());
    let mut plan = Plan::default();
    plan.buffer(X, act, s.len(), Role::In)
        .buffer(Y, act, s.len(), Role::In)
        .buffer(DY, act, s.len(), Role::In)
        .buffer(MEAN, DType::F32, c, Role::In)
        .buffer(RSTD, DType::F32, c, Role::In)
        .buffer(GAMMA, DType::F32, c, Role::In)
        .buffer(DGAMMA, DType::F32, c, Role::InOut)
        .buffer(DBETA, DType::F32, c, Role::InOut)
        .buffer(DX, act, s.len(), Role::Out)
        .buffer(PARTIALS, DType::F32, 2 * c * tiles, Role::Scratch)
        .buffer(COEF, DType::F32, 3 * c, Role::Scratch);
    if fused.residual {
        plan.buffer(DRESIDUAL, act, s.len(), Role::Out);
    }
    backward_partial(&mut plan, s, storage, fused);
    plan.launch(
        "bn_backward_combine",
        s.combine_grid(),
        REDUCE_BLOCK,
        vec![
            Arg::Buf(PARTIALS),
            Arg::I32(tiles as i32),
            Arg::I32(s.rows as i32),
            Arg::I32(c as i32),
            Arg::Buf(RSTD),
            Arg::Buf(GAMMA),
            Arg::Buf(DGAMMA),
            Arg::Buf(DBETA),
            Arg::Buf(COEF),
        ],
    );
    backward_dx(&mut plan, s, storage, fused);
    Ok(plan)
}

/// Pass 1 of the backward: per-tile `[sum g | sum g (x - mean)]` into `partials`.
fn backward_partial(plan: &mut Plan, s: BnShape, storage: Storage, fused: Fused) {
    let (tile_rows, _) = s.tiling();
    plan.launch(
        storage.pick("bn_backward_partial_f32", "bn_backward_partial_bf16"),
        s.reduce_grid(),
        REDUCE_BLOCK,
        vec![
            Arg::Buf(X),
            Arg::Buf(Y),
            Arg::Buf(DY),
            Arg::Buf(MEAN),
            Arg::I32(s.rows as i32),
            Arg::I32(s.channels as i32),
            Arg::I32(tile_rows as i32),
            Arg::I32(fused.relu as i32),
            Arg::Buf(PARTIALS),
        ],
    );
}

/// Pass 2 of the backward: `dx` (and `dresidual`) from the coefficients.
fn backward_dx(plan: &mut Plan, s: BnShape, storage: Storage, fused: Fused) {
    plan.launch(
        storage.pick("bn_backward_dx_f32", "bn_backward_dx_bf16"),
        elementwise_grid(s.len()),
        [ELEMENTWISE_BLOCK, 1, 1],
        vec![
            Arg::Buf(X),
            Arg::Buf(Y),
            Arg::Buf(DY),
            Arg::Buf(MEAN),
            Arg::Buf(COEF),
            Arg::I64(s.len() as i64),
            Arg::I32(s.channels as i32),
            Arg::I32(fused.relu as i32),
            Arg::Buf(DX),
            if fused.residual { Arg::Buf(DRESIDUAL) } else { Arg::Null },
        ],
    );
}

/// The forward's per-tile shifted sums `[sum d | sum d^2]`, `d = x - x[0]`, into `partials`.
fn stats_partial(plan: &mut Plan, s: BnShape, storage: Storage) {
    let (tile_rows, _) = s.tiling();
    plan.launch(
        storage.pick("bn_stats_partial_f32", "bn_stats_partial_bf16"),
        s.reduce_grid(),
        REDUCE_BLOCK,
        vec![
            Arg::Buf(X),
            Arg::I32(s.rows as i32),
            Arg::I32(s.channels as i32),
            Arg::I32(tile_rows as i32),
            Arg::Buf(PARTIALS),
        ],
    );
}

/// SyncBN's first half of the forward: only the per-tile shifted sums (`partials`, out), which the
/// host combines with the other ranks'.
pub fn sync_stats(s: BnShape, storage: Storage) -> Result<Plan> {
    s.check()?;
    let (_, tiles) = s.tiling();
    let mut plan = Plan::default();
    plan.buffer(X, storage.dtype(), s.len(), Role::In).buffer(PARTIALS, DType::F32, 2 * s.channels * tiles, Role::Out);
    stats_partial(&mut plan, s, storage);
    Ok(plan)
}

/// SyncBN's second half of the forward: `y` with the group's `mean` and `rstd` (in).
pub fn sync_apply(s: BnShape, storage: Storage, fused: Fused) -> Result<Plan> {
    s.check()?;
    let mut plan = Plan::default();
    activation_buffers(&mut plan, s, storage, fused);
    plan.buffer(MEAN, DType::F32, s.channels, Role::In).buffer(RSTD, DType::F32, s.channels, Role::In);
    apply(&mut plan, s, storage, fused, MEAN);
    Ok(plan)
}

/// SyncBN's first half of the backward: the per-tile gradient sums (`partials`, out).
pub fn sync_backward_sums(s: BnShape, storage: Storage, fused: Fused) -> Result<Plan> {
    s.check()?;
    let (_, tiles) = s.tiling();
    let act = storage.dtype();
    let mut plan = Plan::default();
    plan.buffer(X, act, s.len(), Role::In)
        .buffer(Y, act, s.len(), Role::In)
        .buffer(DY, act, s.len(), Role::In)
        .buffer(MEAN, DType::F32, s.channels, Role::In)
        .buffer(PARTIALS, DType::F32, 2 * s.channels * tiles, Role::Out);
    backward_partial(&mut plan, s, storage, fused);
    Ok(plan)
}

/// SyncBN's second half of the backward: `dx` (and `dresidual`) from the coefficients the host
/// made of the group's sums (`coef`, in).
pub fn sync_backward_dx(s: BnShape, storage: Storage, fused: Fused) -> Result<Plan> {
    s.check()?;
    let act = storage.dtype();
    let mut plan = Plan::default();
    plan.buffer(X, act, s.len(), Role::In)
        .buffer(Y, act, s.len(), Role::In)
        .buffer(DY, act, s.len(), Role::In)
        .buffer(MEAN, DType::F32, s.channels, Role::In)
        .buffer(COEF, DType::F32, 3 * s.channels, Role::In)
        .buffer(DX, act, s.len(), Role::Out);
    if fused.residual {
        plan.buffer(DRESIDUAL, act, s.len(), Role::Out);
    }
    backward_dx(&mut plan, s, storage, fused);
    Ok(plan)
}

/// The shape of a forward's activation, once `x`, the parameters, `stats` and the residual are
/// checked to be on `rt` and to fit.
fn forward_shape(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    p: &BnParams<'_>,
    stats: &[&Tensor],
    residual: Option<&Tensor>,
) -> Result<BnShape> {
    let (rows, channels) = channels(x, p)?;
    check_device("batchnorm (cuda)", rt, &[x, p.gamma, p.beta])?;
    check_device("batchnorm (cuda)", rt, stats)?;
    if let Some(r) = residual {
        x.check_same_shape("batchnorm (residual)", r)?;
        check_device("batchnorm (cuda)", rt, &[r])?;
    }
    Ok(BnShape { rows, channels })
}

/// The shape of a backward's activations, once `x`, `y`, `dy` (one dtype), gamma and `per_channel`
/// are checked to be on `rt` and to fit.
fn backward_shape(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    p: &BnParams<'_>,
    per_channel: &[&Tensor],
) -> Result<BnShape> {
    let (rows, channels) = channels(x, p)?;
    x.check_same_shape("batchnorm_backward (dy)", dy)?;
    x.check_same_shape("batchnorm_backward (y)", y)?;
    check_device("batchnorm_backward (cuda)", rt, &[x, y, dy, p.gamma])?;
    check_device("batchnorm_backward (cuda)", rt, per_channel)?;
    if dy.dtype() != x.dtype() || y.dtype() != x.dtype() {
        return Err(shape_err("batchnorm_backward (cuda)", "x, y and dy must have one dtype"));
    }
    Ok(BnShape { rows, channels })
}

/// The device path of [`crate::ops::batchnorm::batchnorm_train_forward`]: batch statistics and the
/// normalised output on the device of `x` (its dtype); running statistics updated in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_forward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BnCache)> {
    let s = forward_shape(rt, x, p, &[running_mean, running_var], residual)?;
    let c = s.channels;
    let fused = Fused { residual: residual.is_some(), relu };
    let plan = train_forward(s, x.dtype(), fused, momentum, p.eps)?;
    let y = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let mean = Tensor::device_uninit(rt, &[c], Storage::F32)?;
    let rstd = Tensor::device_uninit(rt, &[c], Storage::F32)?;
    let mut bind = vec![
        (X, x.ptr()),
        (GAMMA, p.gamma.ptr()),
        (BETA, p.beta.ptr()),
        (RUNNING_MEAN, running_mean.ptr()),
        (RUNNING_VAR, running_var.ptr()),
        (MEAN, mean.ptr()),
        (RSTD, rstd.ptr()),
        (Y, y.ptr()),
    ];
    bind.extend(residual.map(|r| (RESIDUAL, r.ptr())));
    rt.run(&SOURCE, &plan, &bind)?;
    Ok((y, BnCache { mean, rstd }))
}

/// The device path of [`crate::ops::batchnorm::batchnorm_eval_forward`].
pub(crate) fn eval_forward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &Tensor,
    running_var: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let s = forward_shape(rt, x, p, &[running_mean, running_var], residual)?;
    let fused = Fused { residual: residual.is_some(), relu };
    let plan = eval_forward(s, x.dtype(), fused, p.eps)?;
    let y = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let mut bind = vec![
        (X, x.ptr()),
        (GAMMA, p.gamma.ptr()),
        (BETA, p.beta.ptr()),
        (RUNNING_MEAN, running_mean.ptr()),
        (RUNNING_VAR, running_var.ptr()),
        (Y, y.ptr()),
    ];
    bind.extend(residual.map(|r| (RESIDUAL, r.ptr())));
    rt.run(&SOURCE, &plan, &bind)?;
    Ok(y)
}

/// The device path of [`crate::ops::batchnorm::batchnorm_backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    p: &BnParams<'_>,
    cache: &BnCache,
    fused: Fused,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let s = backward_shape(rt, x, y, dy, p, &[&cache.mean, &cache.rstd, dgamma, dbeta])?;
    let plan = backward(s, x.dtype(), fused)?;
    let dx = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let dres = if fused.residual { Some(Tensor::device_uninit(rt, x.shape(), x.dtype())?) } else { None };
    let mut bind = vec![
        (X, x.ptr()),
        (Y, y.ptr()),
        (DY, dy.ptr()),
        (MEAN, cache.mean.ptr()),
        (RSTD, cache.rstd.ptr()),
        (GAMMA, p.gamma.ptr()),
        (DGAMMA, dgamma.ptr()),
        (DBETA, dbeta.ptr()),
        (DX, dx.ptr()),
    ];
    bind.extend(dres.as_ref().map(|d| (DRESIDUAL, d.ptr())));
    rt.run(&SOURCE, &plan, &bind)?;
    Ok((dx, dres))
}

/// A new f32 device tensor holding `values`, on the device of `like`.
fn upload_f32(like: &Tensor, shape: &[usize], values: &[f32]) -> Result<Tensor> {
    Tensor::from_slice(shape, values)?.to_device(like.device())
}

/// Per-channel f64 sums `[first | second]` of a `[tiles, 2c]` partials buffer, tiles in order.
fn sum_tiles(partials: &[f32], c: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; 2 * c];
    for tile in partials.chunks_exact(2 * c) {
        for (s, &v) in sums.iter_mut().zip(tile) {
            *s += v as f64;
        }
    }
    sums
}

/// The device path of [`crate::ops::batchnorm::sync_batchnorm_train_forward`]: the device sums its
/// rows (shifted by the first row, as the plain forward), the host turns them into plain sums in f64,
/// all-reduces them over `group` and makes the statistics exactly as the CPU op does, and the device
/// normalises with them. One device-host round trip per call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sync_train_forward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    p: &BnParams<'_>,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    residual: Option<&Tensor>,
    relu: bool,
    group: &dyn Collective,
) -> Result<(Tensor, BnCache)> {
    let s = forward_shape(rt, x, p, &[running_mean, running_var], residual)?;
    let (rows, c) = (s.rows, s.channels);
    let (_, tiles) = s.tiling();
    let partials = Tensor::device_uninit(rt, &[2 * c * tiles], Storage::F32)?;
    rt.run(&SOURCE, &sync_stats(s, x.dtype())?, &[(X, x.ptr()), (PARTIALS, partials.ptr())])?;
    let shifted = sum_tiles(&partials.to_vec(), c);
    // The shift of the device's sums: the first row of `x`.
    let shift = x.leading_values(c)?;
    // sum x = S1 + n k, sum x^2 = S2 + 2 k S1 + n k^2 for the shift k.
    let n = rows as f64;
    let mut sums = vec![0.0f64; 2 * c];
    for ch in 0..c {
        let (k, s1, s2) = (shift[ch] as f64, shifted[ch], shifted[c + ch]);
        sums[ch] = s1 + n * k;
        sums[c + ch] = s2 + 2.0 * k * s1 + n * k * k;
    }
    let n = crate::ops::batchnorm::reduce_over_group(&mut sums, rows, Some(group))?;
    let (mut rm, mut rv) = (running_mean.to_vec(), running_var.to_vec());
    let (mean, rstd) = crate::ops::batchnorm::batch_statistics(&sums, n, p.eps, momentum, &mut rm, &mut rv)?;
    running_mean.write_f32(&rm)?;
    running_var.write_f32(&rv)?;
    let (mean, rstd) = (upload_f32(x, &[c], &mean)?, upload_f32(x, &[c], &rstd)?);
    let fused = Fused { residual: residual.is_some(), relu };
    let y = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let mut bind = vec![
        (X, x.ptr()),
        (GAMMA, p.gamma.ptr()),
        (BETA, p.beta.ptr()),
        (MEAN, mean.ptr()),
        (RSTD, rstd.ptr()),
        (Y, y.ptr()),
    ];
    bind.extend(residual.map(|r| (RESIDUAL, r.ptr())));
    rt.run(&SOURCE, &sync_apply(s, x.dtype(), fused)?, &bind)?;
    Ok((y, BnCache { mean, rstd }))
}

/// The device path of [`crate::ops::batchnorm::sync_batchnorm_backward`]: the device sums the
/// gradient, the host all-reduces the sums over `group` and makes the coefficients (and the shares of
/// `dgamma`, `dbeta`) as the CPU op does, and the device writes `dx`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sync_backward_on(
    rt: &Arc<DeviceRuntime>,
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
    let s = backward_shape(rt, x, y, dy, p, &[&cache.mean, &cache.rstd, dgamma, dbeta])?;
    let (rows, c) = (s.rows, s.channels);
    let (_, tiles) = s.tiling();
    let partials = Tensor::device_uninit(rt, &[2 * c * tiles], Storage::F32)?;
    let bind = [(X, x.ptr()), (Y, y.ptr()), (DY, dy.ptr()), (MEAN, cache.mean.ptr()), (PARTIALS, partials.ptr())];
    rt.run(&SOURCE, &sync_backward_sums(s, x.dtype(), fused)?, &bind)?;
    let mut sums = sum_tiles(&partials.to_vec(), c);
    let n = crate::ops::batchnorm::reduce_over_group(&mut sums, rows, Some(group))?;
    let (mut dga, mut dbe) = (dgamma.to_vec(), dbeta.to_vec());
    let (rstd, gamma) = (cache.rstd.to_vec(), p.gamma.to_vec());
    let coef = crate::ops::batchnorm::backward_coefficients(&sums, n, Some(group), &rstd, &gamma, &mut dga, &mut dbe);
    dgamma.write_f32(&dga)?;
    dbeta.write_f32(&dbe)?;
    let coef = upload_f32(x, &[3 * c], &[coef.a, coef.b, coef.e].concat())?;
    let dx = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let dres = if fused.residual { Some(Tensor::device_uninit(rt, x.shape(), x.dtype())?) } else { None };
    let mut bind =
        vec![(X, x.ptr()), (Y, y.ptr()), (DY, dy.ptr()), (MEAN, cache.mean.ptr()), (COEF, coef.ptr()), (DX, dx.ptr())];
    bind.extend(dres.as_ref().map(|d| (DRESIDUAL, d.ptr())));
    rt.run(&SOURCE, &sync_backward_dx(s, x.dtype(), fused)?, &bind)?;
    Ok((dx, dres))
}
