//! Sharded, memory-mapped image datasets and the SwAV multi-crop loader.
//!
//! - [`preprocess()`] turns an image folder or IDX files into a dataset directory: `manifest.json` plus
//!   `shard-NNNNN.bin` files of checksummed records (see [`shard`] for the format).
//! - [`Dataset`] opens one for random access (memory-mapped, every record verified when read).
//! - [`MultiCropLoader`] produces SwAV training batches (crops grouped by resolution, crop-major, f32,
//!   NHWC or NCHW) from a [`MultiCropConfig`]; [`EvalLoader`] produces evaluation batches.
//!
//! Grayscale images are stored with one channel; loaders output the dataset's channel count unless asked
//! for 1 or 3 ([`LoaderConfig::channels`]).
//!
//! ```no_run
//! use swav_data::{preprocess, Dataset, LoaderConfig, MultiCropConfig, MultiCropLoader, PreprocessOptions};
//!
//! let opts = PreprocessOptions { input: "photos/".into(), output: "data/photos".into(), ..Default::default() };
//! preprocess(&opts, &|_progress| {})?;
//! let ds = Dataset::open("data/photos")?;
//! let cfg = LoaderConfig { batch_size: 64, seed: 31, ..Default::default() };
//! let mut loader = MultiCropLoader::new(&ds, &MultiCropConfig::official(), &cfg)?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     assert_eq!(batch.group(0).shape, [2 * 64, 224, 224, 3]); // crop-major: all crop 0, then all crop 1
//!     assert_eq!(batch.group(1).shape, [6 * 64, 96, 96, 3]);
//! }
//! # Ok::<(), swav_data::DataError>(())
//! ```

#![warn(missing_docs)]

pub mod augment;
mod codec;
mod config;
mod dataset;
mod error;
mod image;
mod loader;
mod manifest;
pub mod preprocess;
pub mod rng;
pub mod shard;
pub mod synthetic;

pub use augment::{CropBox, CropDecision, EvalTransform, GroupShape, Layout, MultiCropTransform};
pub use codec::{Codec, RecordDecoder};
pub use config::{AugmentConfig, CropGroup, EvalConfig, MultiCropConfig};
pub use dataset::{Dataset, VerifyReport};
pub use error::{DataError, Result};
pub use image::{Image, ImageView};
pub use loader::{epoch_order, Batch, CropTensor, Epoch, EvalLoader, LoaderConfig, MultiCropLoader};
pub use manifest::{Manifest, NamesEntry, Parameters, ShardEntry, Skipped, FORMAT_VERSION};
pub use preprocess::{preprocess, PreprocessOptions, PreprocessReport, Progress};
pub use rng::SplitMix64;
