//! The small foundations every swav-rs crate shares, each with exactly one home:
//!
//! - [`alloc_count`]: a counting allocator, for tests that bound what an input can make code allocate;
//! - [`fs`]: atomic file writes (temporary file, fsync, rename), so a crash never leaves a partial file
//!   under a real name;
//! - [`lock`]: exclusive locks on run and output folders (the second process stops, naming the first);
//! - [`npy`]: NumPy's `.npy` format (read and write), for features, labels and check data;
//! - [`rng`]: SplitMix64, the reproducible random stream of the loader, the initialisation and the
//!   evaluation (fully specified, no dependence on any crate's version);
//! - [`isa`]: run-time choice of AVX-512, AVX2 or baseline code for hot loops written once;
//! - [`layout`]: NCHW <-> NHWC conversion of image batches;
//! - [`sys`]: the memory and cores of the machine, to bound what inputs may ask for;
//! - [`imagenet`]: the ImageNet normalisation of the official SwAV code.
//!
//! ```
//! use swav_core::{npy, rng::SplitMix64};
//!
//! let mut rng = SplitMix64::from_key(&[7, 0]);
//! let values: Vec<f32> = (0..6).map(|_| rng.normal() as f32).collect();
//! let bytes = npy::to_bytes(&[2, 3], &values)?;
//! let (shape, back) = npy::from_bytes::<f32>(&bytes)?;
//! assert_eq!((shape, back), (vec![2, 3], values));
//! # Ok::<(), swav_core::npy::NpyError>(())
//! ```

#![warn(missing_docs)]

pub mod alloc_count;
pub mod fs;
pub mod imagenet;
pub mod isa;
pub mod layout;
pub mod lock;
pub mod npy;
pub mod rng;
pub mod sys;
