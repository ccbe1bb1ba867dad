//! The device path of the linear layer (`linear.rs`): GEMMs through cuBLAS, described as
//! [`GemmCall`]s (the row-major `[rows, cols]` matrices of the engine are column-major `cols x rows`
//! to cuBLAS), and the bias through two small kernels (`ew_add_rows_f32`, `ew_col_sum_add_f32`).
//! The head and the prototype scores run in fp32: they are a sliver of the step's work, and the loss
//! and Sinkhorn need fp32 scores.

use std::sync::Arc;

use crate::cuda::calls::GemmCall;
use crate::cuda::runtime::DeviceRuntime;
use crate::error::shape_err;
use crate::ops::{check_device, elementwise_cuda as ew};
use crate::{DType, Result, Tensor};

fn f32_only(tensors: &[&Tensor]) -> Result<()> {
    if tensors.iter().any(|t| t.dtype() != DType::F32) {
        return Err(shape_err("linear (cuda)", "linear layers run in f32"));
    }
    Ok(())
}

/// `y = x w^T (+ b)`.
pub(crate) fn forward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (rows, fin, fout): (usize, usize, usize),
) -> Result<Tensor> {
    check_device("linear (cuda)", rt, &[x, w])?;
    f32_only(&[x, w])?;
    let y = Tensor::device_uninit(rt, &[rows, fout], DType::F32)?;
    if rows == 0 || fout == 0 {
        return Ok(y);
    }
    let call = GemmCall::linear_forward(rows, fin, fout, DType::F32, DType::F32);
    rt.backend().gemm(&call, w.ptr(), x.ptr(), y.ptr())?;
    if let Some(b) = b {
        check_device("linear (cuda)", rt, &[b])?;
        rt.run(&ew::SOURCE, &ew::add_rows(rows, fout)?, &[(ew::Y, y.ptr()), (ew::X, b.ptr())])?;
    }
    Ok(y)
}

/// Accumulates `dw` (and `db`); returns `dx` when asked.
pub(crate) fn backward_on(
    rt: &Arc<DeviceRuntime>,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
    want_dx: bool,
) -> Result<Option<Tensor>> {
    let (rows, fin, fout) = (x.dim(0), x.dim(1), w.dim(0));
    check_device("linear_backward (cuda)", rt, &[x, w, dy, dw])?;
    f32_only(&[x, w, dy, dw])?;
    if rows > 0 {
        let call = GemmCall::linear_weight_grad(rows, fin, fout, DType::F32);
        rt.backend().gemm(&call, x.ptr(), dy.ptr(), dw.ptr())?;
    }
    if let Some(db) = db {
        check_device("linear_backward (cuda)", rt, &[db])?;
        if rows > 0 {
            rt.run(&ew::SOURCE, &ew::col_sum_add(rows, fout)?, &[(ew::X, dy.ptr()), (ew::Y, db.ptr())])?;
        }
    }
    if !want_dx {
        return Ok(None);
    }
    let dx = Tensor::device_uninit(rt, &[rows, fin], DType::F32)?;
    if rows > 0 && fin > 0 {
        let call = GemmCall::linear_data_grad(rows, fin, fout, DType::F32, DType::F32);
        rt.backend().gemm(&call, w.ptr(), dy.ptr(), dx.ptr())?;
    }
    Ok(Some(dx))
}

/// `max(x, 0)`.
pub(crate) fn relu_on(rt: &Arc<DeviceRuntime>, x: &Tensor) -> Result<Tensor> {
    f32_only(&[x])?;
    let y = Tensor::device_uninit(rt, x.shape(), DType::F32)?;
    if !x.is_empty() {
        rt.run(&ew::SOURCE, &ew::relu(x.len())?, &[(ew::X, x.ptr()), (ew::Y, y.ptr())])?;
    }
    Ok(y)
}

/// `dy * [y > 0]`.
pub(crate) fn relu_backward_on(rt: &Arc<DeviceRuntime>, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_device("relu_backward (cuda)", rt, &[y, dy])?;
    f32_only(&[y, dy])?;
    let dx = Tensor::device_uninit(rt, y.shape(), DType::F32)?;
    if !y.is_empty() {
        rt.run(&ew::SOURCE, &ew::relu_backward(y.len())?, &[(ew::X, y.ptr()), (ew::DY, dy.ptr()), (ew::Y, dx.ptr())])?;
    }
    Ok(dx)
}
