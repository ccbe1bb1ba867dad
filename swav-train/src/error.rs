use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("shape: {0}")]
    Shape(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    #[error("sinkhorn: {0}")]
    Sinkhorn(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("reference case {path}: {detail}")]
    Reference { path: String, detail: String },
}
