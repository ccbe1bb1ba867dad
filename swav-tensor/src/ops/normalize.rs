//! Row-wise L2 normalisation, `y = x / max(||x||, 1e-12)` (PyTorch's `F.normalize(x, dim=1)`).
//! Backward (where `||x|| > 1e-12`): `dx = (dy - y (y . dy)) / ||x||`; below the clamp the map is a
//! plain scaling, `dx = dy / 1e-12`.

use crate::error::shape_err;
use crate::{Result, Tensor};

pub const NORM_EPS: f32 = 1e-12;

/// Returns `y` and the norms (before clamping) for the backward.
pub fn l2_normalize_forward(x: &Tensor) -> Result<(Tensor, Vec<f32>)> {
    let &[_, d] = x.shape() else {
        return Err(shape_err("l2_normalize", format!("input {:?} must be 2-D", x.shape())));
    };
    let mut y = x.clone();
    let mut norms = Vec::with_capacity(x.dim(0));
    for row in y.as_mut_slice().chunks_exact_mut(d.max(1)) {
        let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() as f32;
        let inv = 1.0 / norm.max(NORM_EPS);
        row.iter_mut().for_each(|v| *v *= inv);
        norms.push(norm);
    }
    Ok((y, norms))
}

pub fn l2_normalize_backward(y: &Tensor, norms: &[f32], dy: &Tensor) -> Result<Tensor> {
    y.check_same_shape("l2_normalize_backward", dy)?;
    let d = y.dim(1).max(1);
    let mut dx = dy.clone();
    for ((row, yr), &norm) in dx.as_mut_slice().chunks_exact_mut(d).zip(y.as_slice().chunks_exact(d)).zip(norms) {
        if norm > NORM_EPS {
            let dot: f64 = row.iter().zip(yr).map(|(&g, &v)| g as f64 * v as f64).sum();
            let dot = dot as f32;
            for (g, &v) in row.iter_mut().zip(yr) {
                *g = (*g - v * dot) / norm;
            }
        } else {
            row.iter_mut().for_each(|g| *g /= NORM_EPS);
        }
    }
    Ok(dx)
}
