//! Fully connected layer, PyTorch's layout: `y = x w^T + b` with `x: [rows, in]`, `w: [out, in]`,
//! `b: [out]` (optional). Backward: `dx = dy w`, `dw += dy^T x`, `db += sum_rows dy`.

use crate::error::shape_err;
use crate::matmul::{matmul, MatMut, MatRef, Threads};
use crate::{Result, Tensor};

fn dims(x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    let (&[rows, fin], &[fout, win]) = (x.shape(), w.shape()) else {
        return Err(shape_err("linear", format!("input {:?} and weight {:?} must be 2-D", x.shape(), w.shape())));
    };
    if fin != win {
        return Err(shape_err("linear", format!("input has {fin} features, weight expects {win}")));
    }
    Ok((rows, fin, fout))
}

/// `y = x w^T + b` for `x: [rows, in]`, `w: [out, in]` (`torch.nn.Linear`'s layout) and an optional
/// `b: [out]`; returns `y: [rows, out]` on the device of `x`. Shapes that do not fit are
/// [`TensorError::Shape`](crate::TensorError::Shape).
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _p = crate::profile::scope("linear");
    let (rows, fin, fout) = dims(x, w)?;
    if let Some(b) = b {
        if b.shape() != [fout] {
            return Err(shape_err("linear", format!("bias {:?} for {fout} outputs", b.shape())));
        }
    }
    if let Some(rt) = x.runtime() {
        return super::linear_cuda::forward_on(rt, x, w, b, (rows, fin, fout));
    }
    let mut y = Tensor::zeros(&[rows, fout], x.device());
    if let Some(b) = b {
        if b.shape() != [fout] {
            return Err(shape_err("linear", format!("bias {:?} for {fout} outputs", b.shape())));
        }
        for row in y.as_mut_slice().chunks_exact_mut(fout) {
            row.copy_from_slice(b.as_slice());
        }
    }
    let out = MatMut::new(y.as_mut_slice(), rows, fout);
    matmul(
        out,
        MatRef::new(x.as_slice(), rows, fin),
        MatRef::new(w.as_slice(), fout, fin).t(),
        b.is_some(),
        Threads::Pool,
    );
    Ok(y)
}

/// Accumulates `dw` (and `db`); returns `dx` when `want_dx`.
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
    want_dx: bool,
) -> Result<Option<Tensor>> {
    let _p = crate::profile::scope("linear");
    let (rows, fin, fout) = dims(x, w)?;
    if dy.shape() != [rows, fout] {
        return Err(shape_err("linear_backward", format!("dy {:?} for output [{rows}, {fout}]", dy.shape())));
    }
    w.check_same_shape("linear_backward (dw)", dw)?;
    if let Some(db) = &db {
        if db.shape() != [fout] {
            return Err(shape_err("linear_backward", format!("db {:?} for {fout} outputs", db.shape())));
        }
    }
    if let Some(rt) = x.runtime() {
        return super::linear_cuda::backward_on(rt, x, w, dy, dw, db, want_dx);
    }
    let dys = MatRef::new(dy.as_slice(), rows, fout);
    matmul(
        MatMut::new(dw.as_mut_slice(), fout, fin),
        dys.t(),
        MatRef::new(x.as_slice(), rows, fin),
        true,
        Threads::Pool,
    );
    if let Some(db) = db {
        if db.shape() != [fout] {
            return Err(shape_err("linear_backward", format!("db {:?} for {fout} outputs", db.shape())));
        }
        let mut acc = vec![0.0f64; fout];
        for row in dy.as_slice().chunks_exact(fout) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        for (d, a) in db.as_mut_slice().iter_mut().zip(acc) {
            *d += a as f32;
        }
    }
    if !want_dx {
        return Ok(None);
    }
    let mut dx = Tensor::for_overwrite(&[rows, fin], x.device());
    matmul(MatMut::new(dx.as_mut_slice(), rows, fin), dys, MatRef::new(w.as_slice(), fout, fin), false, Threads::Pool);
    Ok(Some(dx))
}
