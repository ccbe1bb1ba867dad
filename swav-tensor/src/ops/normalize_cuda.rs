//! Launch plans of the L2-normalisation kernels (`normalize.cu`; semantics in `normalize.rs`).
//!
//! Buffers, all fp32: `x`, `y`, `dy`, `dx` `[rows, d]`, `norms` `[rows]`.

#![warn(missing_docs)]

use crate::cuda::plan::{Arg, BufId, DType, Plan, Role, Storage};
use crate::cuda::runtime::DeviceRuntime;
use crate::cuda::Source;
use crate::error::shape_err;
use crate::ops::check_device;
use crate::Result;
use crate::Tensor;
use std::sync::Arc;

/// The kernel file.
pub const SOURCE: Source = Source { name: "normalize.cu", code: include_str!("normalize.cu") };

/// Input rows.
pub const X: BufId = BufId("x");
/// Normalised rows.
pub const Y: BufId = BufId("y");
/// Row norms before clamping (saved by the forward).
pub const NORMS: BufId = BufId("norms");
/// Gradient of `y`.
pub const DY: BufId = BufId("dy");
/// Gradient of `x`.
pub const DX: BufId = BufId("dx");

/// Threads per row: the row length rounded up to a warp, between one warp and 256 threads.
pub fn row_block(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

fn check(rows: usize, d: usize) -> Result<()> {
    if rows == 0 || d == 0 || rows > i32::MAX as usize || d > i32::MAX as usize {
        return Err(shape_err("l2_normalize (cuda)", format!("{rows} rows of {d}")));
    }
    Ok(())
}

/// `y = x / max(||x||, 1e-12)` per row, and the norms.
pub fn forward(rows: usize, d: usize) -> Result<Plan> {
    check(rows, d)?;
    let mut plan = Plan::default();
    plan.buffer(X, DType::F32, rows * d, Role::In).buffer(Y, DType::F32, rows * d, Role::Out).buffer(
        NORMS,
        DType::F32,
        rows,
        Role::Out,
    );
    plan.launch(
        "l2norm_forward",
        [rows as u32, 1, 1],
        [row_block(d), 1, 1],
        vec![Arg::Buf(X), Arg::I32(d as i32), Arg::Buf(Y), Arg::Buf(NORMS)],
    );
    Ok(plan)
}

/// `dx` from `y`, the norms and `dy`.
pub fn backward(rows: usize, d: usize) -> Result<Plan> {
    check(rows, d)?;
    let mut plan = Plan::default();
    plan.buffer(Y, DType::F32, rows * d, Role::In)
        .buffer(NORMS, DType::F32, rows, Role::In)
        .buffer(DY, DType::F32, rows * d, Role::In)
        .buffer(DX, DType::F32, rows * d, Role::Out);
    plan.launch(
        "l2norm_backward",
        [rows as u32, 1, 1],
        [row_block(d), 1, 1],
        vec![Arg::Buf(Y), Arg::Buf(NORMS), Arg::Buf(DY), Arg::I32(d as i32), Arg::Buf(DX)],
    );
    Ok(plan)
}

/// The device path of [`crate::ops::normalize::l2_normalize_forward`] (f32).
pub(crate) fn forward_on(rt: &Arc<DeviceRuntime>, x: &Tensor, rows: usize, d: usize) -> Result<(Tensor, Tensor)> {
    let y = Tensor::device_uninit(rt, &[rows, d], Storage::F32)?;
    let norms = Tensor::device_uninit(rt, &[rows], Storage::F32)?;
    if rows > 0 && d > 0 {
        rt.run(&SOURCE, &forward(rows, d)?, &[(X, x.ptr()), (Y, y.ptr()), (NORMS, norms.ptr())])?;
    }
    Ok((y, norms))
}

/// The device path of [`crate::ops::normalize::l2_normalize_backward`] (f32).
pub(crate) fn backward_on(rt: &Arc<DeviceRuntime>, y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_device("l2_normalize_backward (cuda)", rt, &[y, norms, dy])?;
    let (rows, d) = (y.dim(0), y.dim(1));
    let dx = Tensor::device_uninit(rt, &[rows, d], Storage::F32)?;
    if rows > 0 && d > 0 {
        rt.run(&SOURCE, &backward(rows, d)?, &[(Y, y.ptr()), (NORMS, norms.ptr()), (DY, dy.ptr()), (DX, dx.ptr())])?;
    }
    Ok(dx)
}
