//! The device path of the linear layer (`linear.rs`): GEMMs through cuBLAS, described as
//! [`GemmCall`]s (the row-major `[rows, cols]` matrices of the engine are column-major `cols x rows`
//! to cuBLAS), and the bias through two small kernels (`ew_add_rows_f32`, `ew_col_sum_add_f32`).
//! Inputs and weight come in fp32 or, under mixed precision, both in bf16 (the layer casts them, as
//! PyTorch's autocast does for `linear`); products are accumulated in fp32 and every output (`y`,
//! `dx`, `dw`) is fp32, so the loss and Sinkhorn see fp32 scores and the master gradients stay fp32.
//! The bf16 backward multiplies a bf16 copy of `dy`, as autocast's backward does.

use std::sync::Arc;

use crate::cuda::calls::GemmCall;
use crate::cuda::runtime::DeviceRuntime;
use crate::error::shape_err;
use crate::ops::{check_device, elementwise_cuda as ew};
use crate::{DType, Result, Tensor};

fn f32_only(tensors: &[&Tensor]) -> Result<()> {
    if tensors.iter().any(|t| t.dtype() != DType::F32) {
        return Err(shape_err("linear (cuda)", "expected f32 tensors"));
    }
    Ok(())
}

/// The storage of the GEMM's inputs: that of `x` and `w`, which must agree.
fn input_storage(x: &Tensor, w: &Tensor) -> Result<DType> {
    if x.dtype() != w.dtype() {
        return Err(shape_err(
            "linear (cuda)",
            format!("input in {:?} and weight in {:?}: both f32 or both bf16", x.dtype(), w.dtype()),
        ));
    }
    Ok(x.dtype())
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
    let ab = input_storage(x, w)?;
    if let Some(b) = b {
        f32_only(&[b])?;
    }
    let y = Tensor::device_uninit(rt, &[rows, fout], DType::F32)?;
    if rows == 0 || fout == 0 {
        return Ok(y);
    }
    let call = GemmCall::linear_forward(rows, fin, fout, ab, DType::F32);
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
    let ab = input_storage(x, w)?;
    f32_only(&[dw])?;
    // The gradient in the inputs' storage for the GEMMs (the bias gradient sums the original).
    let dy_ab =
        if dy.dtype() == ab { std::borrow::Cow::Borrowed(dy) } else { std::borrow::Cow::Owned(dy.to_dtype(ab)?) };
    if rows > 0 {
        let call = GemmCall::linear_weight_grad(rows, fin, fout, ab);
        rt.backend().gemm(&call, x.ptr(), dy_ab.ptr(), dw.ptr())?;
    }
    if let Some(db) = db {
        check_device("linear_backward (cuda)", rt, &[db])?;
        f32_only(&[dy, db])?;
        if rows > 0 {
            rt.run(&ew::SOURCE, &ew::col_sum_add(rows, fout)?, &[(ew::X, dy.ptr()), (ew::Y, db.ptr())])?;
        }
    }
    if !want_dx {
        return Ok(None);
    }
    let dx = Tensor::device_uninit(rt, &[rows, fin], DType::F32)?;
    if rows > 0 && fin > 0 {
        let call = GemmCall::linear_data_grad(rows, fin, fout, ab, DType::F32);
        rt.backend().gemm(&call, w.ptr(), dy_ab.ptr(), dx.ptr())?;
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
