//! Elementwise ops: ReLU and the residual add. In the ResNets both are fused into the batch norm
//! that precedes them (see `batchnorm.rs`); these standalone forms serve other networks and tests.

use rayon::prelude::*;
use swav_core::simd_fn;

use crate::{Result, Tensor};

const CHUNK: usize = 1 << 15;

/// `max(x, 0)`.
pub fn relu_forward(x: &Tensor) -> Result<Tensor> {
    if let Some(rt) = x.runtime() {
        return super::linear_cuda::relu_on(rt, x);
    }
    let mut y = x.clone();
    y.as_mut_slice().par_chunks_mut(CHUNK).for_each(relu_in_place);
    Ok(y)
}

/// `dx = dy * [y > 0]`, where `y` is the forward's output.
pub fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.check_same_shape("relu_backward", dy)?;
    if let Some(rt) = y.runtime() {
        return super::linear_cuda::relu_backward_on(rt, y, dy);
    }
    let mut dx = dy.clone();
    dx.as_mut_slice().par_chunks_mut(CHUNK).zip(y.as_slice().par_chunks(CHUNK)).for_each(|(d, y)| mask_by(d, y));
    Ok(dx)
}

/// `a + b`; its backward passes `dy` to both inputs unchanged.
pub fn add_forward(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.check_same_shape("add", b)?;
    let mut y = a.clone();
    y.add_assign(b)?;
    Ok(y)
}

/// `y += b` over the pool (the CPU side of [`Tensor::add_assign`]: the residual gradients of a ResNet's
/// backward are whole activations, too large for one thread).
pub(crate) fn add_assign_cpu(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(y, b)| add_in_place(y, b));
}

simd_fn! {
    fn relu_in_place(x: &mut [f32]) {
        x.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

simd_fn! {
    /// `d = 0` where `y <= 0` (a blend, not a branch).
    fn mask_by(d: &mut [f32], y: &[f32]) {
        for (d, &y) in d.iter_mut().zip(y) {
            *d = if y <= 0.0 { 0.0 } else { *d };
        }
    }
}

simd_fn! {
    fn add_in_place(y: &mut [f32], b: &[f32]) {
        for (y, &b) in y.iter_mut().zip(b) {
            *y += b;
        }
    }
}
