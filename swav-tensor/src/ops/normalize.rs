//! Row-wise L2 normalisation, `y = x / max(||x||, 1e-12)` (PyTorch's `F.normalize(x, dim=1)`).
//! Backward (where `||x|| > 1e-12`): `dx = (dy - y (y . dy)) / ||x||`; below the clamp the map is a
//! plain scaling, `dx = dy / 1e-12`.

use crate::error::shape_err;
use crate::{Result, Tensor};

/// The clamp of the norm (`F.normalize`'s `eps`): a row is divided by `max(||x||, NORM_EPS)`, so an
/// all-zero row stays zero instead of becoming NaN.
pub const NORM_EPS: f32 = 1e-12;

/// Returns `y` and the norms (`[rows]`, before clamping) for the backward.
pub fn l2_normalize_forward(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let &[rows, d] = x.shape() else {
        return Err(shape_err("l2_normalize", format!("input {:?} must be 2-D", x.shape())));
    };
    if let Some(rt) = x.runtime() {
        return super::normalize_cuda::forward_on(rt, x, rows, d);
    }
    let mut y = x.clone();
    let mut norms = Vec::with_capacity(x.dim(0));
    for row in y.as_mut_slice().chunks_exact_mut(d.max(1)) {
        let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() as f32;
        let inv = 1.0 / norm.max(NORM_EPS);
        row.iter_mut().for_each(|v| *v *= inv);
        norms.push(norm);
    }
    Ok((y, Tensor::from_vec(&[rows], norms)?))
}

/// `dx` from the forward's output `y`, its norms and `dy`.
pub fn l2_normalize_backward(y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.check_same_shape("l2_normalize_backward", dy)?;
    if norms.shape() != [y.dim(0)] {
        return Err(shape_err("l2_normalize_backward", format!("norms {:?} for {} rows", norms.shape(), y.dim(0))));
    }
    if let Some(rt) = y.runtime() {
        return super::normalize_cuda::backward_on(rt, y, norms, dy);
    }
    let norms = norms.as_slice();
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
