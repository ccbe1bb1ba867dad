use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExportError {
    /// Reading the checkpoint: missing, unexpected or mis-shaped tensors are named here.
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    #[error("export options: {0}")]
    Options(String),
    /// A model built in memory whose tensors do not fit its structure (a loaded checkpoint is checked
    /// on load, so this names a tensor of a model assembled by hand).
    #[error("tensor `{name}`: {detail}")]
    Tensor { name: String, detail: String },
    /// Even with every large tensor in external data, the graph itself would exceed protobuf's 2 GiB.
    #[error("the ONNX model would take {bytes} bytes with its tensors in external data; a protobuf file holds at most 2 GiB")]
    TooLarge { bytes: usize },
    #[error("check data {path}: {detail}")]
    CheckData { path: String, detail: String },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;
