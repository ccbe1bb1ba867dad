//! Why a PyTorch file was refused. Every message names the offending thing (the global, the opcode and
//! its byte offset, the storage, the tensor) so that a user can tell a corrupt download from a file that
//! is not a state dict.

use thiserror::Error;

/// An error reading a PyTorch checkpoint; converted into [`crate::ModelError::Torch`] with the path.
#[derive(Debug, Error)]
pub enum TorchError {
    /// Neither a zip archive nor a pickle stream.
    #[error("not a PyTorch file: it starts with neither a zip header nor a pickle protocol opcode")]
    NotTorch,
    /// The pickle names a global that is not on the allow-list (anything but the few types of a state dict).
    #[error("refusing global {module}.{name}: only the globals of a state dict are allowed ({allowed})")]
    RefusedGlobal {
        /// The module of the global, e.g. `os`.
        module: String,
        /// The name of the global, e.g. `system`.
        name: String,
        /// The allow-list, for the message.
        allowed: &'static str,
    },
    /// An allowed global was used in a way a state dict never uses it (e.g. calling a storage type).
    #[error("refusing to call {0}: state dicts never do")]
    RefusedCall(String),
    /// An opcode outside the subset that PyTorch state dicts use.
    #[error("unsupported pickle opcode 0x{opcode:02x} ({printable}) at byte {pos}")]
    Opcode {
        /// The opcode byte.
        opcode: u8,
        /// The opcode as a character, or `?`.
        printable: char,
        /// Its offset in the pickle.
        pos: usize,
    },
    /// The input ends before something it announced.
    #[error("truncated: {what} at byte {pos} needs {need} bytes, {have} remain")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        pos: usize,
        /// Bytes needed.
        need: u64,
        /// Bytes left.
        have: usize,
    },
    /// A pickle that is well formed opcode by opcode but does not build what a state dict builds.
    #[error("malformed pickle at byte {pos}: {detail}")]
    Malformed {
        /// Offset of the opcode.
        pos: usize,
        /// What is wrong.
        detail: String,
    },
    /// A limit that protects the reader (nesting depth, memory) was reached.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The zip container is damaged or not laid out as PyTorch writes it.
    #[error("zip archive: {0}")]
    Zip(String),
    /// The legacy (pre-1.6) stream is damaged.
    #[error("legacy format: {0}")]
    Legacy(String),
    /// A storage is missing or smaller than the pickle says.
    #[error("storage `{key}`: {detail}")]
    Storage {
        /// The storage's key (its file name in the archive).
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A tensor's view does not fit its storage.
    #[error("tensor `{name}`: {detail}")]
    Tensor {
        /// The state-dict name of the tensor.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The file holds no dictionary of tensors.
    #[error("no state dict in the file: {0}")]
    NoStateDict(String),
}

impl TorchError {
    /// A [`TorchError::Malformed`] at `pos`.
    pub(crate) fn malformed(pos: usize, detail: impl Into<String>) -> TorchError {
        TorchError::Malformed { pos, detail: detail.into() }
    }
}
