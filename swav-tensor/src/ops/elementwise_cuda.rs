//! Launch plans of the elementwise kernels (`elementwise.cu`): casts, `y += x`, scale, fill.
//!
//! Buffers: `x` and `y` of `n` values in the types each plan states.

#![warn(missing_docs)]

use crate::cuda::plan::{elementwise_grid, Arg, BufId, Plan, Role, Storage, ELEMENTWISE_BLOCK};
use crate::cuda::Source;
use crate::Result;

/// The kernel file.
pub const SOURCE: Source = Source { name: "elementwise.cu", code: include_str!("elementwise.cu") };

/// Input (or the buffer updated in place by `scale` and `fill`).
pub const X: BufId = BufId("x");
/// Output (or the accumulator of `add`).
pub const Y: BufId = BufId("y");

fn check(n: usize) -> Result<()> {
    if n == 0 {
        return Err(crate::error::shape_err("elementwise (cuda)", "no values"));
    }
    Ok(())
}

fn single(kernel: &'static str, n: usize, args: Vec<Arg>) -> Plan {
    let mut plan = Plan::default();
    plan.launch(kernel, elementwise_grid(n), [ELEMENTWISE_BLOCK, 1, 1], args);
    plan
}

/// `y = x` converted from `from` to `to` storage (f32 -> bf16 rounds to nearest even). This is also the
/// upload conversion of a loader batch (fp32 NHWC -> bf16 NHWC).
pub fn cast(n: usize, from: Storage, to: Storage) -> Result<Plan> {
    check(n)?;
    let kernel = match (from, to) {
        (Storage::F32, Storage::Bf16) => "ew_cast_f32_bf16",
        (Storage::Bf16, Storage::F32) => "ew_cast_bf16_f32",
        _ => return Err(crate::error::shape_err("cast (cuda)", format!("{from:?} to {to:?}: nothing to convert"))),
    };
    let mut plan = single(kernel, n, vec![Arg::Buf(X), Arg::I64(n as i64), Arg::Buf(Y)]);
    plan.buffer(X, from.dtype(), n, Role::In).buffer(Y, to.dtype(), n, Role::Out);
    Ok(plan)
}

/// `y += x` (both in `storage`).
pub fn add(n: usize, storage: Storage) -> Result<Plan> {
    check(n)?;
    let mut plan =
        single(storage.pick("ew_add_f32", "ew_add_bf16"), n, vec![Arg::Buf(Y), Arg::Buf(X), Arg::I64(n as i64)]);
    plan.buffer(Y, storage.dtype(), n, Role::InOut).buffer(X, storage.dtype(), n, Role::In);
    Ok(plan)
}

/// `x *= s` (fp32).
pub fn scale(n: usize, s: f32) -> Result<Plan> {
    check(n)?;
    let mut plan = single("ew_scale_f32", n, vec![Arg::Buf(X), Arg::I64(n as i64), Arg::F32(s)]);
    plan.buffer(X, Storage::F32.dtype(), n, Role::InOut);
    Ok(plan)
}

/// `x = v` everywhere.
pub fn fill(n: usize, storage: Storage, v: f32) -> Result<Plan> {
    check(n)?;
    let mut plan =
        single(storage.pick("ew_fill_f32", "ew_fill_bf16"), n, vec![Arg::Buf(X), Arg::I64(n as i64), Arg::F32(v)]);
    plan.buffer(X, storage.dtype(), n, Role::Out);
    Ok(plan)
}

/// The bias of a linear layer: `y` (`rows x cols`) += `x` (`[cols]`) on every row.
pub fn add_rows(rows: usize, cols: usize) -> Result<Plan> {
    check(rows * cols)?;
    let n = rows * cols;
    let mut plan =
        single("ew_add_rows_f32", n, vec![Arg::Buf(Y), Arg::Buf(X), Arg::I64(n as i64), Arg::I32(cols as i32)]);
    plan.buffer(Y, Storage::F32.dtype(), n, Role::InOut).buffer(X, Storage::F32.dtype(), cols, Role::In);
    Ok(plan)
}

/// The gradient of a linear layer's bias: `y` (`[cols]`) += the column sums of `x` (`rows x cols`).
pub fn col_sum_add(rows: usize, cols: usize) -> Result<Plan> {
    check(rows * cols)?;
    let mut plan = single(
        "ew_col_sum_add_f32",
        cols,
        vec![Arg::Buf(X), Arg::I32(rows as i32), Arg::I32(cols as i32), Arg::Buf(Y)],
    );
    plan.buffer(X, Storage::F32.dtype(), rows * cols, Role::In).buffer(Y, Storage::F32.dtype(), cols, Role::InOut);
    Ok(plan)
}

/// The gradient of `y` flowing into a ReLU's output (`x` is that output here).
pub const DY: BufId = BufId("dy");

/// `y = max(x, 0)` (f32).
pub fn relu(n: usize) -> Result<Plan> {
    check(n)?;
    let mut plan = single("ew_relu_f32", n, vec![Arg::Buf(X), Arg::I64(n as i64), Arg::Buf(Y)]);
    plan.buffer(X, Storage::F32.dtype(), n, Role::In).buffer(Y, Storage::F32.dtype(), n, Role::Out);
    Ok(plan)
}

/// `y = dy` where the forward's output `x` is positive, else 0 (f32).
pub fn relu_backward(n: usize) -> Result<Plan> {
    check(n)?;
    let mut plan = single("ew_relu_backward_f32", n, vec![Arg::Buf(X), Arg::Buf(DY), Arg::I64(n as i64), Arg::Buf(Y)]);
    plan.buffer(X, Storage::F32.dtype(), n, Role::In).buffer(DY, Storage::F32.dtype(), n, Role::In).buffer(
        Y,
        Storage::F32.dtype(),
        n,
        Role::Out,
    );
    Ok(plan)
}
