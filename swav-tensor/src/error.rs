//! The one error type of the engine.

use thiserror::Error;

/// Errors of the engine: shapes that do not fit an op, or a device that cannot run it.
#[derive(Debug, Error)]
pub enum TensorError {
    /// An op was given operands whose shapes (or devices) do not fit together: a bug in the caller or
    /// a model configuration the op cannot run, never a transient condition.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The op that refused its operands (`conv2d`, `batchnorm`, ...).
        op: &'static str,
        /// The shapes involved and what was expected of them.
        detail: String,
    },
    /// A tensor was built from, or reshaped to, a shape whose element count differs from the number
    /// of values.
    #[error("tensor of shape {shape:?} needs {expected} values, got {got}")]
    Len {
        /// The shape asked for.
        shape: Vec<usize>,
        /// Values that shape holds (the product of its dimensions).
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A device (or the CPU thread pool) could not be opened or could not run the work: an unknown
    /// device name, no CUDA driver or device, a failed call into a CUDA library (driver, NVRTC, cuBLAS,
    /// cuDNN), an invalid launch plan. The message says which.
    #[error("device unavailable: {0}")]
    Device(String),
    /// A collective of a distributed run failed (see [`crate::collective::CollectiveError`]).
    #[error("collective: {0}")]
    Collective(String),
}

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> TensorError {
    TensorError::Shape { op, detail: detail.into() }
}
