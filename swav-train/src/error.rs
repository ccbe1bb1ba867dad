//! The error type of training, evaluation and their inputs.

use thiserror::Error;

/// Everything training, evaluation and their inputs can fail with.
#[derive(Debug, Error)]
pub enum TrainError {
    /// Tensors or batches whose shapes disagree with the model or with each other.
    #[error("shape: {0}")]
    Shape(String),
    /// A configuration refused before any work starts; the message names the key.
    #[error("configuration: {0}")]
    Config(String),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    /// A tensor kernel failed.
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    /// The Sinkhorn-Knopp assignment failed (non-finite scores, bad shapes).
    #[error("sinkhorn: {0}")]
    Sinkhorn(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A reference case (recorded by the Python implementation) could not be read or disagrees.
    #[error("reference case {path}: {detail}")]
    Reference {
        /// The reference case file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Loading or augmenting the dataset failed.
    #[error(transparent)]
    Data(#[from] swav_data::DataError),
    /// An atomic file operation failed.
    #[error(transparent)]
    File(#[from] swav_core::fs::FsError),
    /// The run directory is locked by another process.
    #[error(transparent)]
    Lock(#[from] swav_core::lock::LockError),
    /// The ranks of a distributed run failed to exchange data (a rank died, hung or disagrees).
    #[error("distributed: {0}")]
    Distributed(String),
    /// A checkpoint that cannot be written, read or resumed from.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Evaluation, embedding or report input that cannot be used (no labels, mismatched classes, bad
    /// features, unreadable metrics); the message says what to do.
    #[error("{0}")]
    Eval(String),
    #[error("the loss became {loss} at step {step}: training stopped; the last good checkpoint is {checkpoint}. Lower the learning rate (train.base_lr) or check the data")]
    /// The loss stopped being finite; training stops rather than corrupt the checkpoints.
    NonFinite {
        /// The iteration at which the loss was seen.
        step: usize,
        /// The non-finite loss (NaN or infinite).
        loss: f64,
        /// The last checkpoint written before the failure, to resume from.
        checkpoint: String,
    },
}
