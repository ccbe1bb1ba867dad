//! swav-model: the networks of SwAV on the swav-tensor engine.
//!
//! - [`resnet::ResNet`]: ResNet-18/34/50 and the wide ResNet-50 w2/w4/w5 (torchvision layout), with an
//!   optional small-image stem (3x3 stride-1 conv, no max-pool) and any base width.
//! - [`head::ProjectionHead`] (Linear-BN-ReLU-Linear, or a single Linear) and [`head::Prototypes`]
//!   (one or several bias-free linear heads).
//! - [`swav::SwavModel`]: backbone + head + prototypes with the multi-crop forward of the official code
//!   (the backbone runs once per run of crops of equal resolution) and its backward.
//! - [`file::ModelFile`]: the model file (network + preprocessing), its only reader and writer; it
//!   also reads PyTorch checkpoints ([`torch`]) and foreign safetensors state dicts, whose network
//!   [`detect`](mod@detect) recognises from the tensor names and shapes; [`checkpoint`]: the named tensors under
//!   it, with torchvision / official SwAV parameter names.
//! - [`pretrained`]: pretrained starts, the weights of any model file (whole, or backbone only) loaded
//!   into a network built for training.
//!
//! Layers keep their parameters and accumulate gradients into them; forward functions return the
//! activations their backward needs (no tape), in the style of llm.c.
//!
//! ```
//! use swav_model::{Arch, ModelConfig, SwavModel};
//! use swav_tensor::Tensor;
//!
//! // A narrow ResNet-18 with the small-image stem and a small head, else the official settings.
//! let official = ModelConfig::swav_resnet50();
//! let config = ModelConfig { arch: Arch::Resnet18, width: Some(8), small_stem: true, hidden_mlp: 32, ..official };
//! let model = SwavModel::new(config, 31)?;
//! let images = Tensor::zeros(&[2, 32, 32, 3], swav_tensor::Device::Cpu); // NHWC
//! let features = model.features(&images)?;
//! assert_eq!(features.shape(), &[2, 64]);
//! # Ok::<(), swav_model::ModelError>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod detect;
pub mod error;
pub mod file;
pub mod head;
pub mod init;
pub mod layers;
pub mod param;
pub mod preprocessing;
pub mod pretrained;
pub mod resnet;
pub mod swav;
pub mod torch;

pub use config::{Arch, ModelConfig};
pub use detect::{detect, Detection};
pub use error::ModelError;
pub use file::{FileKind, ModelFile, Origin};
pub use param::{Param, Slot};
pub use preprocessing::{Overrides, Preprocessing, Source};
pub use pretrained::{init_from_file, InitReport, InitScope};
pub use swav::SwavModel;

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
