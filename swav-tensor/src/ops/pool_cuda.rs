//! Launch plans of the pooling kernels (`pool.cu`; semantics in its header and in `pool.rs`).
//!
//! Buffers: max-pool `x` `[n, h, w, c]`, `y` and `dy` `[n, oh, ow, c]` in the storage type, `idx` u32
//! like `y`, `dx` like `x`; average pool `x` / `dx` `[n, h, w, c]` in the storage type, `y` / `dy` fp32
//! `[n, c]`.

#![warn(missing_docs)]

use crate::cuda::plan::{elementwise_grid, Arg, BufId, DType, Plan, Role, Storage, ELEMENTWISE_BLOCK};
use crate::cuda::runtime::{DeviceBuffer, DeviceRuntime};
use crate::cuda::Source;
use crate::error::shape_err;
use crate::ops::check_device;
use crate::ops::pool::PoolGeom;
use crate::ops::pool::{Indices, PoolIndices};
use crate::Result;
use crate::Tensor;
use std::sync::Arc;

/// The kernel file.
pub const SOURCE: Source = Source { name: "pool.cu", code: include_str!("pool.cu") };

/// Input activation.
pub const X: BufId = BufId("x");
/// Output.
pub const Y: BufId = BufId("y");
/// Max-pool argmax: flat input index per output value.
pub const IDX: BufId = BufId("idx");
/// Gradient of the output.
pub const DY: BufId = BufId("dy");
/// Gradient of the input.
pub const DX: BufId = BufId("dx");

const POOL_CHANNELS: usize = 32;
const POOL_LANES: u32 = 8;

fn geometry_args(g: &PoolGeom) -> Vec<Arg> {
    [g.n, g.h, g.w, g.c, g.oh, g.ow, g.k, g.stride, g.pad].iter().map(|&v| Arg::I32(v as i32)).collect()
}

fn check_geometry(g: &PoolGeom) -> Result<()> {
    if g.n * g.h * g.w * g.c > u32::MAX as usize - 1 {
        return Err(shape_err("max_pool (cuda)", "input of 2^32 values or more (indices are u32)"));
    }
    Ok(())
}

/// Max-pool forward on `[n, h, w, c]` (`x_shape`) with a `k x k` window: `y` and the argmax `idx`.
pub fn max_pool_forward(x_shape: &[usize], k: usize, stride: usize, pad: usize, storage: Storage) -> Result<Plan> {
    let g = PoolGeom::new(x_shape, k, stride, pad)?;
    check_geometry(&g)?;
    let (input, output) = (g.n * g.h * g.w * g.c, g.n * g.oh * g.ow * g.c);
    let mut plan = Plan::default();
    plan.buffer(X, storage.dtype(), input, Role::In).buffer(Y, storage.dtype(), output, Role::Out).buffer(
        IDX,
        DType::U32,
        output,
        Role::Out,
    );
    let mut args = vec![Arg::Buf(X)];
    args.extend(geometry_args(&g));
    args.extend([Arg::Buf(Y), Arg::Buf(IDX)]);
    plan.launch(
        storage.pick("maxpool_forward_f32", "maxpool_forward_bf16"),
        elementwise_grid(output),
        [ELEMENTWISE_BLOCK, 1, 1],
        args,
    );
    Ok(plan)
}

/// Max-pool backward (a gather over the outputs whose window holds each input): `dx` from `dy`, `idx`.
pub fn max_pool_backward(x_shape: &[usize], k: usize, stride: usize, pad: usize, storage: Storage) -> Result<Plan> {
    let g = PoolGeom::new(x_shape, k, stride, pad)?;
    check_geometry(&g)?;
    let (input, output) = (g.n * g.h * g.w * g.c, g.n * g.oh * g.ow * g.c);
    let mut plan = Plan::default();
    plan.buffer(DY, storage.dtype(), output, Role::In).buffer(IDX, DType::U32, output, Role::In).buffer(
        DX,
        storage.dtype(),
        input,
        Role::Out,
    );
    let mut args = vec![Arg::Buf(DY), Arg::Buf(IDX)];
    args.extend(geometry_args(&g));
    args.push(Arg::Buf(DX));
    plan.launch(
        storage.pick("maxpool_backward_f32", "maxpool_backward_bf16"),
        elementwise_grid(input),
        [ELEMENTWISE_BLOCK, 1, 1],
        args,
    );
    Ok(plan)
}

fn nhwc(x_shape: &[usize]) -> Result<(usize, usize, usize)> {
    let &[n, h, w, c] = x_shape else {
        return Err(shape_err("global_avg_pool (cuda)", format!("input {x_shape:?} must be NHWC")));
    };
    if n == 0 || h * w == 0 || c == 0 || n > 65535 || h * w * c > i32::MAX as usize {
        return Err(shape_err("global_avg_pool (cuda)", format!("input {x_shape:?}")));
    }
    Ok((n, h * w, c))
}

/// Global average pool `[n, h, w, c] -> [n, c]` (fp32 output).
pub fn global_avg_pool_forward(x_shape: &[usize], storage: Storage) -> Result<Plan> {
    let (n, hw, c) = nhwc(x_shape)?;
    let mut plan = Plan::default();
    plan.buffer(X, storage.dtype(), n * hw * c, Role::In).buffer(Y, DType::F32, n * c, Role::Out);
    plan.launch(
        storage.pick("avgpool_forward_f32", "avgpool_forward_bf16"),
        [c.div_ceil(POOL_CHANNELS) as u32, n as u32, 1],
        [POOL_CHANNELS as u32, POOL_LANES, 1],
        vec![Arg::Buf(X), Arg::I32(hw as i32), Arg::I32(c as i32), Arg::Buf(Y)],
    );
    Ok(plan)
}

/// Its backward: `dx = dy / (h w)` on every pixel.
pub fn global_avg_pool_backward(x_shape: &[usize], storage: Storage) -> Result<Plan> {
    let (n, hw, c) = nhwc(x_shape)?;
    let mut plan = Plan::default();
    plan.buffer(DY, DType::F32, n * c, Role::In).buffer(DX, storage.dtype(), n * hw * c, Role::Out);
    plan.launch(
        storage.pick("avgpool_backward_f32", "avgpool_backward_bf16"),
        elementwise_grid(n * hw * c),
        [ELEMENTWISE_BLOCK, 1, 1],
        vec![Arg::Buf(DY), Arg::I32(n as i32), Arg::I32(hw as i32), Arg::I32(c as i32), Arg::Buf(DX)],
    );
    Ok(plan)
}

/// The device path of [`crate::ops::pool::max_pool_forward`] (activations in their dtype).
pub(crate) fn max_pool_forward_on(rt: &Arc<DeviceRuntime>, x: &Tensor, g: &PoolGeom) -> Result<(Tensor, PoolIndices)> {
    let plan = max_pool_forward(x.shape(), g.k, g.stride, g.pad, x.dtype())?;
    let out = g.n * g.oh * g.ow * g.c;
    let y = Tensor::device_uninit(rt, &[g.n, g.oh, g.ow, g.c], x.dtype())?;
    let idx = rt.alloc(out * 4)?;
    rt.run(&SOURCE, &plan, &[(X, x.ptr()), (Y, y.ptr()), (IDX, idx.ptr())])?;
    Ok((y, PoolIndices(Indices::Cuda { buf: idx, len: out, k: g.k, stride: g.stride, pad: g.pad })))
}

/// The device path of [`crate::ops::pool::max_pool_backward`]: a gather, deterministic.
pub(crate) fn max_pool_backward_on(
    idx: &DeviceBuffer,
    x_shape: &[usize],
    (k, stride, pad): (usize, usize, usize),
    dy: &Tensor,
) -> Result<Tensor> {
    let rt = idx.runtime();
    check_device("max_pool_backward (cuda)", rt, &[dy])?;
    let plan = max_pool_backward(x_shape, k, stride, pad, dy.dtype())?;
    let dx = Tensor::device_uninit(rt, x_shape, dy.dtype())?;
    rt.run(&SOURCE, &plan, &[(DY, dy.ptr()), (IDX, idx.ptr()), (DX, dx.ptr())])?;
    Ok(dx)
}

/// The device path of [`crate::ops::pool::global_avg_pool_forward`]: f32 features whatever the
/// activations' dtype.
pub(crate) fn avg_pool_forward_on(rt: &Arc<DeviceRuntime>, x: &Tensor) -> Result<Tensor> {
    let plan = global_avg_pool_forward(x.shape(), x.dtype())?;
    let y = Tensor::device_uninit(rt, &[x.dim(0), x.dim(3)], Storage::F32)?;
    rt.run(&SOURCE, &plan, &[(X, x.ptr()), (Y, y.ptr())])?;
    Ok(y)
}

/// The device path of [`crate::ops::pool::global_avg_pool_backward`]: `dx` in the dtype of the
/// forward's input `x` (`dy` is f32).
pub(crate) fn avg_pool_backward_on(rt: &Arc<DeviceRuntime>, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_device("global_avg_pool_backward (cuda)", rt, &[x, dy])?;
    let plan = global_avg_pool_backward(x.shape(), x.dtype())?;
    let dx = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    rt.run(&SOURCE, &plan, &[(DY, dy.ptr()), (DX, dx.ptr())])?;
    Ok(dx)
}
