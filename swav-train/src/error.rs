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
    #[error(transparent)]
    Data(#[from] swav_data::DataError),
    #[error(transparent)]
    File(#[from] swav_core::fs::FsError),
    #[error(transparent)]
    Lock(#[from] swav_core::lock::LockError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Evaluation, embedding or report input that cannot be used (no labels, mismatched classes, bad
    /// features, unreadable metrics); the message says what to do.
    #[error("{0}")]
    Eval(String),
    #[error("the loss became {loss} at step {step}: training stopped; the last good checkpoint is {checkpoint}. Lower the learning rate (train.base_lr) or check the data")]
    NonFinite { step: usize, loss: f64, checkpoint: String },
}
