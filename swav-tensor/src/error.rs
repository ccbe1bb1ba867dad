use thiserror::Error;

/// Errors of the engine: shapes that do not fit an op, or a device that cannot run it.
#[derive(Debug, Error)]
pub enum TensorError {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("tensor of shape {shape:?} needs {expected} values, got {got}")]
    Len { shape: Vec<usize>, expected: usize, got: usize },
    #[error("device unavailable: {0}")]
    Device(String),
}

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> TensorError {
    TensorError::Shape { op, detail: detail.into() }
}
