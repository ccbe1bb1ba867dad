use thiserror::Error;

/// Errors of the evaluation: inputs that cannot be used (no labels, mismatched classes, bad features),
/// and the model, data and file errors below them. Messages say what to do.
#[derive(Debug, Error)]
pub enum EvalError {
    /// Input that cannot be evaluated; the message says why and what to do.
    #[error("{0}")]
    Invalid(String),
    /// The model file or the network.
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    /// The engine.
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    /// The datasets.
    #[error(transparent)]
    Data(#[from] swav_data::DataError),
    /// A file that could not be read or written.
    #[error(transparent)]
    Io(#[from] swav_core::fs::FsError),
    /// A `.npy` file.
    #[error(transparent)]
    Npy(#[from] swav_core::npy::NpyError),
    /// A run folder's checkpoints (swav-train's conventions).
    #[error(transparent)]
    Train(#[from] swav_train::TrainError),
    /// A run folder in use by another process.
    #[error(transparent)]
    Lock(#[from] swav_core::lock::LockError),
}
