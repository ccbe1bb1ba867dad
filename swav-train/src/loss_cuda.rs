//! Launch plan of the swapped-prediction loss kernels (`loss.cu`; formula in `loss.rs`).
//!
//! Buffers: `scores` `[crops batch, k]` and `codes` `[assigned, batch, k]` fp32 in, `dscores` like
//! `scores` and `loss` `[1]` out, `skip` u32 `[1]` out (1 when the loss is not finite: the optimizer
//! then updates nothing), `assign` (the crop ids, a constant of the plan) and `row_loss` scratch.

#![warn(missing_docs)]

use swav_tensor::cuda::plan::{Arg, BufId, ConstData, DType, Plan, Role};
use swav_tensor::cuda::Source;

use crate::TrainError;

/// The kernel file.
pub const SOURCE: Source = Source { name: "loss.cu", code: include_str!("loss.cu") };

/// Scores of every crop, crop-major.
pub const SCORES: BufId = BufId("scores");
/// Codes of the assigned crops, stacked in `crops_for_assign` order.
pub const CODES: BufId = BufId("codes");
/// The assigned crops' ids (constant).
pub const ASSIGN: BufId = BufId("assign");
/// Gradient of the loss with respect to the scores.
pub const DSCORES: BufId = BufId("dscores");
/// The loss.
pub const LOSS: BufId = BufId("loss");
/// 1 when the loss is not finite, else 0 (read by the optimizer kernels).
pub const SKIP: BufId = BufId("skip");
/// Per-row loss terms (scratch).
pub const ROW_LOSS: BufId = BufId("row_loss");

/// The loss and its gradient for `crops` crops of `batch` images, `k` prototypes.
pub fn plan(
    crops: usize,
    batch: usize,
    k: usize,
    crops_for_assign: &[usize],
    temperature: f32,
) -> Result<Plan, TrainError> {
    let rows = crops * batch;
    if crops < 2 || batch == 0 || k == 0 || rows * k > i32::MAX as usize * 16 || rows > i32::MAX as usize {
        return Err(TrainError::Shape(format!("loss (cuda): {crops} crops x {batch} x {k}")));
    }
    if crops_for_assign.is_empty() || crops_for_assign.iter().any(|&a| a >= crops) {
        return Err(TrainError::Shape(format!("loss (cuda): crops_for_assign {crops_for_assign:?} for {crops} crops")));
    }
    let a = crops_for_assign.len();
    let denom = ((crops - 1) * a) as f64;
    let inv_t = 1.0 / temperature as f64;
    let mut plan = Plan::default();
    plan.buffer(SCORES, DType::F32, rows * k, Role::In)
        .buffer(CODES, DType::F32, a * batch * k, Role::In)
        .buffer(
            ASSIGN,
            DType::I32,
            a,
            Role::Const(ConstData::I32(crops_for_assign.iter().map(|&c| c as i32).collect())),
        )
        .buffer(DSCORES, DType::F32, rows * k, Role::Out)
        .buffer(LOSS, DType::F32, 1, Role::Out)
        .buffer(SKIP, DType::U32, 1, Role::Out)
        .buffer(ROW_LOSS, DType::F32, rows, Role::Scratch);
    plan.launch(
        "swav_loss_rows",
        [rows as u32, 1, 1],
        [256, 1, 1],
        vec![
            Arg::Buf(SCORES),
            Arg::Buf(CODES),
            Arg::Buf(ASSIGN),
            Arg::I32(a as i32),
            Arg::I32(batch as i32),
            Arg::I32(k as i32),
            Arg::F32(inv_t as f32),
            Arg::F32((inv_t / (batch as f64 * denom)) as f32),
            Arg::Buf(DSCORES),
            Arg::Buf(ROW_LOSS),
        ],
    );
    plan.launch(
        "swav_loss_total",
        [1, 1, 1],
        [1024, 1, 1],
        vec![
            Arg::Buf(ROW_LOSS),
            Arg::I32(rows as i32),
            Arg::F32((1.0 / (batch as f64 * denom)) as f32),
            Arg::Buf(LOSS),
            Arg::Buf(SKIP),
        ],
    );
    Ok(plan)
}

/// Per-head losses `[heads]` (in `ROW_LOSS`) -> their mean in `LOSS` and the `SKIP` flag of the mean: the
/// loss of a model with several prototype heads (`swav_loss_total` with one "row" per head).
pub fn mean_plan(heads: usize) -> Result<Plan, TrainError> {
    if heads == 0 || heads > i32::MAX as usize {
        return Err(TrainError::Shape(format!("loss mean (cuda): {heads} heads")));
    }
    let mut plan = Plan::default();
    plan.buffer(ROW_LOSS, DType::F32, heads, Role::In).buffer(LOSS, DType::F32, 1, Role::Out).buffer(
        SKIP,
        DType::U32,
        1,
        Role::Out,
    );
    plan.launch(
        "swav_loss_total",
        [1, 1, 1],
        [1024, 1, 1],
        vec![
            Arg::Buf(ROW_LOSS),
            Arg::I32(heads as i32),
            Arg::F32((1.0 / heads as f64) as f32),
            Arg::Buf(LOSS),
            Arg::Buf(SKIP),
        ],
    );
    Ok(plan)
}
