//! Launch plans of the prototype kernels (`prototypes.cu`): in-place normalisation of the prototypes
//! and the cluster statistics of a step's codes.
//!
//! Buffers: `prototypes` fp32 `[k, d]` (in place); `codes` fp32 `[batch, k]` in, `hist` u32 `[k]` and
//! `stats` fp32 `[2]` (entropy of the mean code, prototypes used) out, `argmax`, `colsum` scratch.

#![warn(missing_docs)]

use swav_tensor::cuda::plan::{Arg, BufId, DType, Plan, Role};
use swav_tensor::cuda::Source;

use crate::TrainError;

/// The kernel file.
pub const SOURCE: Source = Source { name: "prototypes.cu", code: include_str!("prototypes.cu") };

/// The prototype matrix, normalised in place.
pub const PROTOTYPES: BufId = BufId("prototypes");
/// Codes of one crop.
pub const CODES: BufId = BufId("codes");
/// Rows whose argmax is each prototype.
pub const HIST: BufId = BufId("hist");
/// `[entropy of the mean code (nats), prototypes used]`.
pub const STATS: BufId = BufId("stats");
/// Per-row argmax (scratch).
pub const ARGMAX: BufId = BufId("argmax");
/// Per-prototype sums of the codes (scratch).
pub const COLSUM: BufId = BufId("colsum");

fn check(rows: usize, cols: usize, what: &str) -> Result<(), TrainError> {
    if rows == 0 || cols == 0 || rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(TrainError::Shape(format!("{what} (cuda): {rows} x {cols}")));
    }
    Ok(())
}

/// Each of the `k` rows of `prototypes` (`[k, d]`) to unit L2 norm, in place.
pub fn normalize(k: usize, d: usize) -> Result<Plan, TrainError> {
    check(k, d, "prototype normalisation")?;
    let mut plan = Plan::default();
    plan.buffer(PROTOTYPES, DType::F32, k * d, Role::InOut);
    plan.launch(
        "proto_normalize",
        [k as u32, 1, 1],
        [(d.div_ceil(32) * 32).clamp(32, 256) as u32, 1, 1],
        vec![Arg::Buf(PROTOTYPES), Arg::I32(d as i32)],
    );
    Ok(plan)
}

/// Usage histogram, prototypes used and mean-code entropy of `codes` (`[batch, k]`).
pub fn cluster_stats(batch: usize, k: usize) -> Result<Plan, TrainError> {
    check(batch, k, "cluster statistics")?;
    let mut plan = Plan::default();
    plan.buffer(CODES, DType::F32, batch * k, Role::In)
        .buffer(HIST, DType::U32, k, Role::Out)
        .buffer(STATS, DType::F32, 2, Role::Out)
        .buffer(ARGMAX, DType::U32, batch, Role::Scratch)
        .buffer(COLSUM, DType::F32, k, Role::Scratch);
    plan.launch(
        "cluster_argmax",
        [batch as u32, 1, 1],
        [256, 1, 1],
        vec![Arg::Buf(CODES), Arg::I32(k as i32), Arg::Buf(ARGMAX)],
    );
    plan.launch(
        "cluster_colsum",
        [k.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        vec![Arg::Buf(CODES), Arg::I32(batch as i32), Arg::I32(k as i32), Arg::Buf(COLSUM)],
    );
    plan.launch(
        "cluster_stats",
        [1, 1, 1],
        [1024, 1, 1],
        vec![
            Arg::Buf(ARGMAX),
            Arg::I32(batch as i32),
            Arg::Buf(COLSUM),
            Arg::I32(k as i32),
            Arg::Buf(HIST),
            Arg::Buf(STATS),
        ],
    );
    Ok(plan)
}
