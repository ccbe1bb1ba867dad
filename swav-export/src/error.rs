//! The error type of the exporter.

use thiserror::Error;

/// Everything exporting or checking an ONNX model can fail with.
#[derive(Debug, Error)]
pub enum ExportError {
    /// Reading the checkpoint: missing, unexpected or mis-shaped tensors are named here.
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    /// Options that cannot be honoured (an unsupported opset, a fixed batch of 0, ...).
    #[error("export options: {0}")]
    Options(String),
    /// A model built in memory whose tensors do not fit its structure (a loaded checkpoint is checked
    /// on load, so this names a tensor of a model assembled by hand).
    #[error("tensor `{name}`: {detail}")]
    Tensor {
        /// The tensor's parameter name.
        name: String,
        /// What does not fit.
        detail: String,
    },
    /// Even with every large tensor in external data, the graph itself would exceed protobuf's 2 GiB.
    #[error("the ONNX model would take {bytes} bytes with its tensors in external data; a protobuf file holds at most 2 GiB")]
    TooLarge {
        /// Size the protobuf would have.
        bytes: usize,
    },
    /// Check data (inputs and reference outputs written for a runtime to compare) that cannot be written or read.
    #[error("check data {path}: {detail}")]
    CheckData {
        /// The check data file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Writing the model, its external data or check data failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T, E = ExportError> = std::result::Result<T, E>;
