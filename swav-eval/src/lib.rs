//! swav-eval: how good are the features of a SwAV backbone?
//!
//! - [`features`]: pooled backbone features of every image of a dataset (evaluation mode, the
//!   evaluation transform recorded in the model file);
//! - [`knn`]: weighted k-NN on the frozen features (k = 200, votes `exp(cos / 0.1)`);
//! - [`probe`]: a fast linear probe on cached, standardised features (a proxy for the official linear
//!   evaluation);
//! - [`frozen`]: both for a model file, optionally beside a random network, as `eval.json`;
//! - [`embed`]: the features (and labels) as `.npy` files for use outside swav-rs.
//!
//! ```no_run
//! use swav_data::Dataset;
//! use swav_eval::frozen::{evaluate, Baseline, EvalOptions};
//!
//! let (train, test) = (Dataset::open("data/train")?, Dataset::open("data/test")?);
//! let opts = EvalOptions { baseline: Some(Baseline::Random { seed: 1 }), ..EvalOptions::default() };
//! let report = evaluate("run/checkpoints/step-00001000.safetensors".as_ref(), &train, &test, &opts, &|_| {})?;
//! println!("k-NN {:.1}%, linear probe {:.1}%", 100.0 * report.knn_top1, 100.0 * report.linear_top1);
//! # Ok::<(), swav_eval::EvalError>(())
//! ```

pub mod embed;
mod error;
pub mod features;
pub mod frozen;
pub mod knn;
pub mod probe;

pub use error::EvalError;
