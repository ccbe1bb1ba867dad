//! Launch plan of the multi-tensor LARS/SGD kernels (`lars.cu`; semantics in `lars.rs`).
//!
//! Buffers: `table` u64 `[tensors, 4]` (the caller writes each tensor's parameter, gradient and momentum
//! addresses and its length: [`table_row`]), `skip` u32 `[1]` (written by the loss kernel), the chunk
//! lists as constants of the plan, and `partials`, `coef` scratch. The parameters themselves are reached
//! through the table only.

#![warn(missing_docs)]

use swav_tensor::cuda::plan::{Arg, BufId, ConstData, DType, Plan, Role};
use swav_tensor::cuda::Source;

use crate::TrainError;

/// The kernel file.
pub const SOURCE: Source = Source { name: "lars.cu", code: include_str!("lars.cu") };

/// Per tensor: parameter address, gradient address, momentum address, length.
pub const TABLE: BufId = BufId("table");
/// Non-zero: update nothing (the loss was not finite).
pub const SKIP: BufId = BufId("skip");
/// `(tensor, first value)` of every chunk (constant).
pub const CHUNKS: BufId = BufId("chunks");
/// First chunk of each tensor, and the total at the end (constant).
pub const TENSOR_CHUNKS: BufId = BufId("tensor_chunks");
/// Per-chunk sums of squares (scratch).
pub const PARTIALS: BufId = BufId("partials");
/// Per-tensor `(scale, decay)` (scratch).
pub const COEF: BufId = BufId("coef");

/// Values per chunk (one block each).
pub const CHUNK_LEN: usize = 4096;

/// One parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LarsTensor {
    /// Number of values.
    pub len: usize,
    /// Skipped entirely (no decay, no momentum), like a PyTorch parameter without gradient.
    pub frozen: bool,
}

/// The optimizer's settings (see [`crate::lars::Lars`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LarsSettings {
    /// Momentum of the inner SGD.
    pub momentum: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// LARC's trust coefficient.
    pub trust_coefficient: f32,
    /// LARC on (true) or plain SGD with weight decay.
    pub lars: bool,
}

/// The row of `table` for one tensor.
pub fn table_row(param: u64, grad: u64, momentum: u64, len: usize) -> [u64; 4] {
    [param, grad, momentum, len as u64]
}

/// One optimizer step with learning rate `lr` over `tensors` (rows of the table, in order).
pub fn plan(tensors: &[LarsTensor], s: &LarsSettings, lr: f32) -> Result<Plan, TrainError> {
    let mut chunks = Vec::new();
    let mut first_chunk = Vec::with_capacity(tensors.len() + 1);
    for (t, tensor) in tensors.iter().enumerate() {
        if tensor.len > u32::MAX as usize {
            return Err(TrainError::Shape(format!("lars (cuda): tensor {t} has {} values (2^32 at most)", tensor.len)));
        }
        first_chunk.push((chunks.len() / 2) as u32);
        if !tensor.frozen {
            for start in (0..tensor.len).step_by(CHUNK_LEN) {
                chunks.extend([t as u32, start as u32]);
            }
        }
    }
    let n = chunks.len() / 2;
    first_chunk.push(n as u32);
    let t = tensors.len();
    let mut plan = Plan::default();
    plan.buffer(TABLE, DType::U64, 4 * t, Role::In)
        .buffer(SKIP, DType::U32, 1, Role::In)
        .buffer(CHUNKS, DType::U32, 2 * n, Role::Const(ConstData::U32(chunks)))
        .buffer(TENSOR_CHUNKS, DType::U32, t + 1, Role::Const(ConstData::U32(first_chunk)))
        .buffer(PARTIALS, DType::F32, 2 * n, Role::Scratch)
        .buffer(COEF, DType::F32, 2 * t, Role::Scratch);
    if n == 0 {
        return Ok(plan); // everything frozen (or empty): nothing to launch
    }
    let chunk_len = Arg::I32(CHUNK_LEN as i32);
    plan.launch(
        "lars_sumsq",
        [n as u32, 1, 1],
        [256, 1, 1],
        vec![Arg::Buf(TABLE), Arg::Buf(CHUNKS), chunk_len, Arg::Buf(SKIP), Arg::Buf(PARTIALS)],
    );
    plan.launch(
        "lars_coefficients",
        [t as u32, 1, 1],
        [256, 1, 1],
        vec![
            Arg::Buf(TENSOR_CHUNKS),
            Arg::Buf(PARTIALS),
            Arg::F32(s.weight_decay),
            Arg::F32(s.trust_coefficient),
            Arg::I32(s.lars as i32),
            Arg::Buf(SKIP),
            Arg::Buf(COEF),
        ],
    );
    plan.launch(
        "lars_update",
        [n as u32, 1, 1],
        [256, 1, 1],
        vec![
            Arg::Buf(TABLE),
            Arg::Buf(CHUNKS),
            chunk_len,
            Arg::Buf(COEF),
            Arg::F32(lr),
            Arg::F32(s.momentum),
            Arg::Buf(SKIP),
        ],
    );
    Ok(plan)
}
