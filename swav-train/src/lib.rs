//! SwAV training loop, loss, queue, LARS, checkpoints and evaluation.
//!
//! The crates below are re-exported so that the CLI reaches the whole system through this crate.

pub use swav_data as data;
pub use swav_model as model;
pub use swav_sinkhorn as sinkhorn;
pub use swav_tensor as tensor;

pub mod assign;
pub mod error;
pub mod loss;
pub mod reference;

pub use error::TrainError;
