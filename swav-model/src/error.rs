use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Tensor(#[from] swav_tensor::TensorError),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("input: {0}")]
    Input(String),
    #[error("checkpoint {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("checkpoint {path}: not a valid safetensors file: {detail}")]
    Format { path: String, detail: String },
    #[error("checkpoint: tensor `{name}` has shape {got:?}, the model expects {want:?}")]
    TensorShape { name: String, got: Vec<usize>, want: Vec<usize> },
    #[error("checkpoint: tensor `{name}` has dtype {dtype}, expected a float type")]
    TensorDtype { name: String, dtype: String },
    #[error("checkpoint does not fit the model: {0}")]
    Mismatch(String),
    #[error("tensor `{name}` holds a non-finite value ({value}): the model file is damaged or the run diverged")]
    NonFinite { name: String, value: f32 },
    #[error("model metadata `{key}` = {value:?}: {detail}")]
    Metadata { key: String, value: String, detail: String },
    #[error("preprocessing: {0}")]
    Preprocessing(String),
    /// A state dict whose network [`crate::detect`](fn@crate::detect) cannot recognise from its names and shapes.
    #[error("cannot recognise the network in {path}: {detail}")]
    Unrecognised { path: String, detail: String },
    /// A PyTorch checkpoint that [`crate::torch`] refused; `path` is `<memory>` for bytes.
    #[error("PyTorch checkpoint {path}: {source}")]
    Torch { path: String, source: crate::torch::TorchError },
}
