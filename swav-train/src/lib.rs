//! SwAV training loop, loss, queue, LARS, checkpoints and evaluation.
//!
//! The crates below are re-exported so that the CLI reaches the whole system through this crate.

pub use swav_data as data;
pub use swav_model as model;
pub use swav_sinkhorn as sinkhorn;
pub use swav_tensor as tensor;

pub mod assign;
pub mod checkpoint;
pub mod config;
pub mod embed;
pub mod error;
pub mod eval;
pub mod lars;
pub mod lars_cuda;
pub mod loss;
pub mod loss_cuda;
pub mod metrics;
pub mod prototypes_cuda;
pub mod queue;
pub mod reference;
pub mod report;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::TrainError;

/// The CUDA kernel files of this crate (`loss.cu`, `lars.cu`, `prototypes.cu`), for the compile check and
/// the runtime.
pub fn cuda_sources() -> Vec<swav_tensor::cuda::Source> {
    vec![loss_cuda::SOURCE, lars_cuda::SOURCE, prototypes_cuda::SOURCE]
}
