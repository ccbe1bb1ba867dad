//! The one error type of the crate (written by hand: the crate depends on cudarc and std only).

use std::fmt;

/// Everything that can go wrong in a Sinkhorn call. No call panics on bad input; it returns one of these.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SinkhornError {
    /// A buffer does not have the length that `rows x prototypes` asks for.
    Shape {
        /// Which buffer (`"scores"`, `"q"`).
        buffer: &'static str,
        /// The length needed.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// `rows` or `prototypes` is zero, or their product does not fit in memory.
    Size {
        /// Rows (samples) on this rank.
        rows: usize,
        /// Prototypes (clusters).
        prototypes: usize,
    },
    /// Epsilon must be a positive finite number whose inverse is finite.
    Epsilon(f32),
    /// At least one iteration is needed (with none the result is not a set of assignments).
    Iterations,
    /// The scores hold NaN or infinity (on this rank, or on another rank of a distributed run).
    NonFinite {
        /// True when this rank's own scores are at fault.
        this_rank: bool,
    },
    /// The reducer failed, or ranks disagreed (e.g. on the number of prototypes).
    Reduce(String),
    /// CUDA is unavailable (no driver, no device, no NVRTC) or a CUDA call failed.
    Cuda(String),
    /// The input is valid but this implementation cannot run it (e.g. too many prototypes for the CUDA kernels).
    Unsupported(String),
    /// A reference case is malformed (missing metadata or tensors).
    Reference(String),
}

impl fmt::Display for SinkhornError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkhornError::Shape { buffer, expected, actual } => {
                write!(f, "sinkhorn: buffer `{buffer}` has {actual} elements, but rows x prototypes needs {expected}")
            }
            SinkhornError::Size { rows, prototypes } => write!(
                f,
                "sinkhorn: cannot run on {rows} rows x {prototypes} prototypes (both must be at least 1 and \
                 their product must fit in memory)"
            ),
            SinkhornError::Epsilon(eps) => write!(
                f,
                "sinkhorn: epsilon must be a positive finite number with a finite inverse, got {eps} \
                 (SwAV uses 0.05; 0.01-0.03 for small images)"
            ),
            SinkhornError::Iterations => {
                write!(f, "sinkhorn: iterations must be at least 1 (SwAV uses 3)")
            }
            SinkhornError::NonFinite { this_rank: true } => write!(
                f,
                "sinkhorn: the scores contain NaN or infinity: the network diverged or the input data is \
                 corrupt (lower the learning rate, check the data)"
            ),
            SinkhornError::NonFinite { this_rank: false } => write!(
                f,
                "sinkhorn: another rank's scores contain NaN or infinity: the network diverged or the input \
                 data is corrupt (lower the learning rate, check the data)"
            ),
            SinkhornError::Reduce(msg) => write!(f, "sinkhorn: all-reduce failed: {msg}"),
            SinkhornError::Cuda(msg) => write!(f, "sinkhorn: CUDA: {msg}"),
            SinkhornError::Unsupported(msg) => write!(f, "sinkhorn: unsupported: {msg}"),
            SinkhornError::Reference(msg) => write!(f, "sinkhorn: malformed reference case: {msg}"),
        }
    }
}

impl std::error::Error for SinkhornError {}
