//! The device path of the convolution (`conv.rs`): the three passes through cuDNN, described as
//! [`ConvCall`]s (NHWC activations, KRSC = OHWI filters, fp32 accumulation, tensor-op math).
//!
//! Precision: activations and the filter in one dtype (f32, or bf16 under mixed precision, where the
//! caller passes the bf16 copy of the fp32 master weight). The weight gradient always accumulates into
//! an fp32 tensor: directly (`beta = 1`) in f32, through a bf16 temporary, widened and added, in bf16
//! (cuDNN wants the filter gradient in the filter's type).

use std::sync::Arc;

use crate::cuda::calls::{ConvCall, ConvPass};
use crate::cuda::runtime::{ConvPtrs, DeviceRuntime};
use crate::error::shape_err;
use crate::ops::check_device;
use crate::ops::conv::{ConvGeom, ConvParams};
use crate::{DType, Result, Tensor};

fn geom(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<ConvGeom> {
    if x.dtype() != w.dtype() {
        return Err(shape_err("conv2d (cuda)", format!("input in {:?}, filter in {:?}", x.dtype(), w.dtype())));
    }
    ConvGeom::new(x.shape(), w.shape(), p.stride, p.pad)
}

/// `y = conv(x, w)`.
pub(crate) fn forward_on(rt: &Arc<DeviceRuntime>, x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    check_device("conv2d (cuda)", rt, &[x, w])?;
    let g = geom(x, w, p)?;
    let y = Tensor::device_uninit(rt, &g.out_shape(), x.dtype())?;
    let call = ConvCall::new(&g, ConvPass::Forward, x.dtype());
    rt.backend().conv(&call, ConvPtrs { x: x.ptr(), w: w.ptr(), y: y.ptr() })?;
    Ok(y)
}

/// Accumulates `dweight` (f32) and returns `dx` when asked.
pub(crate) fn backward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: ConvParams,
    dweight: &mut Tensor,
    want_dx: bool,
) -> Result<Option<Tensor>> {
    check_device("conv2d_backward (cuda)", rt, &[x, w, dy, dweight])?;
    let g = geom(x, w, p)?;
    if dy.shape() != g.out_shape() || dy.dtype() != x.dtype() {
        return Err(shape_err(
            "conv2d_backward (cuda)",
            format!("dy {:?} {:?} for output {:?}", dy.shape(), dy.dtype(), g.out_shape()),
        ));
    }
    if dweight.dtype() != DType::F32 || dweight.shape() != w.shape() {
        return Err(shape_err(
            "conv2d_backward (cuda)",
            "the weight gradient must be an f32 tensor of the weight's shape",
        ));
    }
    let filter = ConvCall::new(&g, ConvPass::BackwardFilter, x.dtype());
    match x.dtype() {
        DType::F32 => rt.backend().conv(&filter, ConvPtrs { x: x.ptr(), w: dweight.ptr(), y: dy.ptr() })?,
        DType::Bf16 => {
            let tmp = Tensor::device_uninit(rt, w.shape(), DType::Bf16)?;
            rt.backend().conv(&ConvCall { beta: 0.0, ..filter }, ConvPtrs { x: x.ptr(), w: tmp.ptr(), y: dy.ptr() })?;
            dweight.add_assign(&tmp.to_dtype(DType::F32)?)?;
        }
    }
    if !want_dx {
        return Ok(None);
    }
    let dx = Tensor::device_uninit(rt, x.shape(), x.dtype())?;
    let data = ConvCall::new(&g, ConvPass::BackwardData, x.dtype());
    rt.backend().conv(&data, ConvPtrs { x: dx.ptr(), w: w.ptr(), y: dy.ptr() })?;
    Ok(Some(dx))
}
