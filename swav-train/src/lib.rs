//! swav-train: SwAV pretraining, step by step as the official `main_swav.py`.
//!
//! - [`step::swav_step`]: one iteration (prototype normalisation, forward, codes by Sinkhorn with the
//!   queue, swapped-prediction loss, backward, prototype freezing, LARS), in the official order;
//! - [`loss`], [`assign`], [`queue`], [`lars`], [`schedule`]: the pieces it is made of;
//! - [`trainer::train`]: epochs over the multi-crop loader with checkpoints, resume, metrics and the
//!   guards a long run needs; [`config`] the TOML configuration and the presets;
//! - [`pipeline`]: what `cargo xtask pipeline` needs besides the steps themselves (stamps keyed on
//!   content, the held-out split, ownership of its run folder, the embedded default data).
//!
//! ```
//! use swav_train::config;
//!
//! // A published recipe, edited by dotted keys as `cargo xtask train --set` does.
//! let preset = config::preset("imagenet-rn50-400ep-bs256")?;
//! let cfg = config::load(preset.toml, &["train.epochs=100".into()])?;
//! assert_eq!((cfg.train.epochs, cfg.train.freeze_prototypes_niters), (100, 5005));
//! # Ok::<(), swav_train::TrainError>(())
//! ```

#![warn(missing_docs)]

pub mod assign;
pub mod checkpoint;
mod collapse;
pub mod config;
pub mod conv_plan;
pub mod device;
pub mod distributed;
pub mod error;
pub mod lars;
pub mod lars_cuda;
pub mod loss;
pub mod loss_cuda;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod prototypes_cuda;
pub mod queue;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::TrainError;

/// The CUDA kernel files of this crate (`loss.cu`, `lars.cu`, `prototypes.cu`), for the compile check and
/// the runtime.
pub fn cuda_sources() -> Vec<swav_tensor::cuda::Source> {
    vec![loss_cuda::SOURCE, lars_cuda::SOURCE, prototypes_cuda::SOURCE]
}
