//! The one error type of swav-data. Every message names the file, shard or record concerned and says
//! what to do about it.

use std::path::PathBuf;

/// Errors of dataset reading, preprocessing and loading.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An operating-system error on a named file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The directory is not a dataset written by `cargo xtask preprocess`, or its manifest is unreadable.
    #[error("{}: not a swav-data dataset ({reason}); create one with `cargo xtask preprocess --input <images> --output <dir>`", path.display())]
    NotADataset {
        /// The directory given as a dataset.
        path: PathBuf,
        /// Why it is not one.
        reason: String,
    },

    /// The dataset was written by an incompatible version of the format.
    #[error("{}: dataset format version {found} is not supported (this build reads version {supported}); re-run `cargo xtask preprocess` to rebuild it", path.display())]
    UnsupportedVersion {
        /// The dataset's manifest.
        path: PathBuf,
        /// The version the manifest declares.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    /// A shard file as a whole is damaged (size, footer, index or checksum).
    #[error("{}: {problem}; the shard is damaged: restore it from a copy or rebuild the dataset with `cargo xtask preprocess`", shard.display())]
    CorruptShard {
        /// The shard file.
        shard: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// One record of a shard is damaged.
    #[error("{} record {record} (image {index}): {problem}; the shard is damaged: restore it from a copy or rebuild the dataset with `cargo xtask preprocess`", shard.display())]
    CorruptRecord {
        /// The shard file.
        shard: PathBuf,
        /// Position of the record within the shard.
        record: usize,
        /// Dataset-wide index of the image it holds.
        index: usize,
        /// What is wrong with it.
        problem: String,
    },

    /// An image index past the end of the dataset.
    #[error("image index {index} is out of range: the dataset has {len} images")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// Images in the dataset.
        len: usize,
    },

    /// A configuration value that cannot work (crop groups, batch size, rank, normalisation...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A problem with the input of `preprocess` as a whole (missing input, bad IDX file, nothing written...).
    #[error("{}: {problem}", path.display())]
    Input {
        /// The input file or directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// The output of `preprocess` exists and may not be replaced.
    #[error("{}: {problem}", path.display())]
    Output {
        /// The output directory.
        path: PathBuf,
        /// Why it may not be written.
        problem: String,
    },

    /// A loader worker thread panicked while preparing a batch (a bug: please report it with the message).
    #[error("a loader worker panicked while preparing image {index}: {message}")]
    WorkerPanicked {
        /// The image the worker was preparing.
        index: usize,
        /// The panic message.
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;
