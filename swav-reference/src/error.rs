use thiserror::Error;

/// Why a reference case could not be run (as opposed to a tensor out of tolerance, which is a
/// [`crate::Check`] that fails).
#[derive(Debug, Error)]
pub enum ReferenceError {
    /// The case file is not a usable case: metadata or tensors missing or malformed.
    #[error("reference case {path}: {detail}")]
    Case {
        /// The case file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// An input tensor of the case has an unusable shape.
    #[error("reference case input: {0}")]
    Input(String),
    /// The file could not be read, or the model could not be built from it.
    #[error(transparent)]
    Model(#[from] swav_model::ModelError),
    /// The engine refused an op of the case.
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    /// The training code refused the case (loss, codes, step).
    #[error(transparent)]
    Train(#[from] swav_train::TrainError),
}
