//! The one error type of swav-model: building networks, running them, and reading and writing model
//! files and checkpoints.

use thiserror::Error;

/// Errors of network construction, forwards and backwards, and checkpoint and model-file I/O.
#[derive(Debug, Error)]
pub enum ModelError {
    /// An error of the tensor engine (shapes that do not fit an op, a device failure...).
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    /// A [`ModelConfig`](crate::ModelConfig) that cannot build a network (unknown arch, zero width,
    /// an empty prototype head...).
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// Inputs a forward or backward cannot take (images not NHWC with the configured channels, no
    /// crops, not one score gradient per prototype head), or a failed move to a device.
    #[error("input: {0}")]
    Input(String),
    /// An operating-system error reading or writing a file.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file that is not a readable safetensors file or swav-rs model file (bad header, missing or
    /// invalid configuration, sizes that do not match the tensors...), or tensors that cannot be
    /// encoded as one.
    #[error("checkpoint {path}: not a valid safetensors file: {detail}")]
    Format {
        /// The file, or `<memory>` for bytes.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A checkpoint tensor whose shape differs from the model's (shapes in PyTorch's layout).
    #[error("checkpoint: tensor `{name}` has shape {got:?}, the model expects {want:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the model needs.
        want: Vec<usize>,
    },
    /// An integer checkpoint tensor where the model needs floats.
    #[error("checkpoint: tensor `{name}` has dtype {dtype}, expected a float type")]
    TensorDtype {
        /// The tensor's name.
        name: String,
        /// Its dtype in the file.
        dtype: String,
    },
    /// A checkpoint whose set of tensors does not fit the model (missing or unexpected names).
    #[error("checkpoint does not fit the model: {0}")]
    Mismatch(String),
    /// A NaN or infinite value in a file's tensor.
    #[error("tensor `{name}` holds a non-finite value ({value}): the model file is damaged or the run diverged")]
    NonFinite {
        /// The tensor's name.
        name: String,
        /// The first non-finite value found.
        value: f32,
    },
    /// A preprocessing metadata entry of a model file that does not parse.
    #[error("model metadata `{key}` = {value:?}: {detail}")]
    Metadata {
        /// The metadata key (`mean`, `std`, `input_size`).
        key: String,
        /// The raw value in the file.
        value: String,
        /// Why it does not parse.
        detail: String,
    },
    /// Preprocessing values that cannot work (a non-positive std, a wrong number of channel values,
    /// an input size out of range...).
    #[error("preprocessing: {0}")]
    Preprocessing(String),
    /// A state dict whose network [`crate::detect`](fn@crate::detect) cannot recognise from its names and shapes.
    #[error("cannot recognise the network in {path}: {detail}")]
    Unrecognised {
        /// The file (`the state dict` when there is none).
        path: String,
        /// What does not match a known network.
        detail: String,
    },
    /// A PyTorch checkpoint that [`crate::torch`] refused; `path` is `<memory>` for bytes.
    #[error("PyTorch checkpoint {path}: {source}")]
    Torch {
        /// The file, or `<memory>`.
        path: String,
        /// Why it was refused.
        source: crate::torch::TorchError,
    },
}
