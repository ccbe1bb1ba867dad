//! swav-eval: how good are the features of a SwAV backbone?
//!
//! The paper's two protocols, as the official scripts run them:
//! - [`linear`]: the linear evaluation (`eval_linear.py`): a linear classifier on the frozen
//!   backbone, with random crops and flips every epoch, 100 epochs of SGD with a cosine schedule;
//! - [`finetune`]: the semi-supervised evaluation (`eval_semisup.py`): the whole network fine-tuned
//!   on a labelled subset ([`subset`]: the official 1% / 10% lists, or a seeded fraction), with
//!   checkpoints and resume.
//!
//! And the fast measures used while training:
//! - [`features`]: pooled backbone features of every image of a dataset (evaluation mode, the
//!   evaluation transform recorded in the model file);
//! - [`knn`]: weighted k-NN on the frozen features (k = 200, votes `exp(cos / 0.1)`);
//! - [`probe`]: a fast linear probe on cached, standardised centre-crop features: a proxy for the
//!   linear evaluation, not the paper's number;
//! - [`frozen`]: both for a model file, optionally beside a random network, as `eval.json`;
//! - [`embed`]: the features (and labels) as `.npy` files for use outside swav-rs.
//!
//! [`classifier`] holds the cross-entropy and top-k scores both protocols share.
//!
//! ```no_run
//! use swav_data::Dataset;
//! use swav_eval::frozen::{evaluate, Baseline, EvalOptions};
//! use swav_eval::linear::{linear_eval, LinearOptions};
//!
//! let (train, test) = (Dataset::open("data/train")?, Dataset::open("data/test")?);
//! let model = "run/checkpoints/step-00001000.safetensors".as_ref();
//! let opts = EvalOptions { baseline: Some(Baseline::Random { seed: 1 }), ..EvalOptions::default() };
//! let report = evaluate(model, &train, &test, &opts, &|_| {})?;
//! println!("k-NN {:.1}%, linear probe (proxy) {:.1}%", 100.0 * report.knn_top1, 100.0 * report.linear_top1);
//! let linear = linear_eval(model, &train, &test, &LinearOptions::default(), &|_| {})?;
//! println!("linear evaluation: best top-1 {:.1}%", 100.0 * linear.best.top1);
//! # Ok::<(), swav_eval::EvalError>(())
//! ```

#![warn(missing_docs)]

pub mod classifier;
pub mod embed;
mod error;
pub mod features;
pub mod finetune;
pub mod frozen;
mod json;
pub mod knn;
pub mod linear;
pub mod probe;
pub mod subset;

pub use error::EvalError;

/// What a long evaluation is doing, for a progress display: `task` names the stage (e.g.
/// `checkpoint: train features`, `epoch 3/100`), `done` of `total` units (images, batches, or 0 then
/// 1 for a stage without parts).
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// The stage.
    pub task: &'a str,
    /// Units done.
    pub done: usize,
    /// Units in the stage.
    pub total: usize,
}
