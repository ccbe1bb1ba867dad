//! The frozen-feature evaluation of a model file: k-NN and linear-probe top-1 accuracy of its backbone,
//! optionally beside a randomly initialised network of the same configuration.
//!
//! [`evaluate`] extracts the features of a labelled training and test dataset ([`crate::features`]),
//! runs the weighted k-NN ([`crate::knn`]) and the linear probe ([`crate::probe`]), and returns an
//! [`EvalReport`] that serialises to `eval.json`. The random baseline is the number a self-supervised
//! method must beat.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use swav_data::{Dataset, EvalConfig};
use swav_model::SwavModel;

use swav_model::{ModelFile, Overrides};

use crate::features::{extract_features, input_transform, ExtractOptions};
use crate::knn::{knn_top1, KnnConfig};
use crate::probe::{linear_probe_top1, ProbeConfig};
use crate::EvalError;
pub use crate::Progress;

/// Everything [`evaluate`] can be told.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalOptions {
    /// The k-NN settings.
    pub knn: KnnConfig,
    /// The linear probe settings.
    pub probe: ProbeConfig,
    /// Batch size, loader threads and device of the feature extraction.
    pub extract: ExtractOptions,
    /// Overrides the checkpoint's `input_size` (see [`crate::features`] for the defaults).
    pub input_size: Option<usize>,
    /// Also evaluate a randomly initialised network of the same configuration.
    pub baseline: Option<Baseline>,
}

/// A reference network evaluated beside the model file, with the same configuration and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Baseline {
    /// `SwavModel::new(config, seed)`: fresh initialisation, batch-norm running statistics 0 / 1.
    Random {
        /// The initialisation seed.
        seed: u64,
    },
}

/// Accuracies of one network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// k-NN top-1 accuracy on the test set, a fraction in `[0, 1]`.
    pub knn_top1: f64,
    /// Linear-probe top-1 accuracy on the test set, a fraction in `[0, 1]`.
    pub linear_top1: f64,
    /// Wall time of the feature extraction of both datasets, in seconds.
    pub features_s: f64,
    /// Wall time of the k-NN, in seconds.
    pub knn_s: f64,
    /// Wall time of the linear probe's training and scoring, in seconds.
    pub probe_s: f64,
}

/// The preprocessing the images went through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputReport {
    /// Shorter side the images were resized to, in pixels.
    pub resize: usize,
    /// Side of the centre crop, in pixels.
    pub crop: usize,
    /// Channels of the images the network takes.
    pub channels: usize,
    /// Per-channel mean of the normalisation `(x - mean) / std` of pixels in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the normalisation.
    pub std: Vec<f32>,
}

/// The baseline's scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineReport {
    /// Which baseline (its fields are flattened into the report's object).
    #[serde(flatten)]
    pub baseline: Baseline,
    /// Its scores (flattened too).
    #[serde(flatten)]
    pub scores: Scores,
}

/// What the linear number of `eval` is: not the paper's protocol (that is [`crate::linear`], `cargo
/// xtask eval-linear`) but a fast proxy of it.
pub const PROBE_PROTOCOL: &str = "linear probe (proxy: cached centre-crop features)";

fn probe_protocol() -> String {
    PROBE_PROTOCOL.into()
}

/// The content of `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model file evaluated, as given.
    pub checkpoint: String,
    /// k-NN top-1 accuracy of the checkpoint, a fraction in `[0, 1]` (as in `scores`).
    pub knn_top1: f64,
    /// Linear-probe top-1 accuracy of the checkpoint, a fraction in `[0, 1]` (as in `scores`).
    pub linear_top1: f64,
    /// What `linear_top1` measures: [`PROBE_PROTOCOL`] (reports written before this field existed
    /// read as the same).
    #[serde(default = "probe_protocol")]
    pub linear_protocol: String,
    /// The baseline's scores, when one was asked for.
    pub baseline: Option<BaselineReport>,
    /// Images of the training dataset (k-NN memory and probe training set).
    pub train_images: usize,
    /// Images of the test dataset.
    pub test_images: usize,
    /// Channels of the backbone's pooled features.
    pub feature_dim: usize,
    /// Classes of the datasets (both have the same).
    pub classes: usize,
    /// Directory of the training dataset.
    pub train_data: String,
    /// Directory of the test dataset.
    pub test_data: String,
    /// The evaluation transform the images went through.
    pub input: InputReport,
    /// The k-NN settings used.
    pub knn: KnnConfig,
    /// The linear probe settings used.
    pub probe: ProbeConfig,
    /// Scores and stage timings of the checkpoint.
    pub scores: Scores,
    /// Wall time of the whole evaluation, in seconds.
    pub total_s: f64,
}

impl EvalReport {
    /// Writes the report as pretty JSON, atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), EvalError> {
        crate::json::write(path, self)
    }

    /// Reads a report written by [`EvalReport::write`].
    pub fn read(path: &Path) -> Result<EvalReport, EvalError> {
        crate::json::read(path, "an evaluation report")
    }
}

/// Checks that both datasets are labelled with the same classes.
pub fn check_labelled(train: &Dataset, test: &Dataset) -> Result<(), EvalError> {
    for (what, d) in [("training", train), ("test", test)] {
        if !d.manifest().labelled {
            return Err(EvalError::Invalid(format!(
                "the {what} data in {} has no labels: k-NN and linear evaluation need labelled datasets (preprocess an image folder with one sub-folder per class, or IDX files with their labels file)",
                d.dir().display()
            )));
        }
    }
    if train.classes() != test.classes() {
        let show = |c: &[String]| {
            let head: Vec<&str> = c.iter().take(6).map(String::as_str).collect();
            format!("{} classes [{}{}]", c.len(), head.join(", "), if c.len() > 6 { ", ..." } else { "" })
        };
        return Err(EvalError::Invalid(format!(
            "the training data ({}) and the test data ({}) have different classes: {} against {}; label i must mean the same class in both",
            train.dir().display(),
            test.dir().display(),
            show(train.classes()),
            show(test.classes())
        )));
    }
    Ok(())
}

/// k-NN and linear-probe accuracy of one network (`name` prefixes the progress tasks).
pub fn evaluate_model(
    name: &str,
    model: &SwavModel,
    train: &Dataset,
    test: &Dataset,
    transform: &EvalConfig,
    opts: &EvalOptions,
    progress: &dyn Fn(Progress<'_>),
) -> Result<Scores, EvalError> {
    let t0 = Instant::now();
    let extract = |data: &Dataset, split: &str| {
        let task = format!("{name}: {split} features");
        extract_features(model, data, transform, &opts.extract, &|done, total| {
            progress(Progress { task: &task, done, total })
        })
    };
    let train_f = extract(train, "train")?;
    let test_f = extract(test, "test")?;
    let features_s = t0.elapsed().as_secs_f64();

    let stage = |label: &str, f: &dyn Fn() -> Result<f64, EvalError>| -> Result<(f64, f64), EvalError> {
        let task = format!("{name}: {label}");
        progress(Progress { task: &task, done: 0, total: 1 });
        let t = Instant::now();
        let acc = f()?;
        progress(Progress { task: &task, done: 1, total: 1 });
        Ok((acc, t.elapsed().as_secs_f64()))
    };
    let (knn_top1, knn_s) = stage("k-NN", &|| knn_top1(&train_f, &test_f, &opts.knn))?;
    let (linear_top1, probe_s) = stage("linear probe", &|| linear_probe_top1(&train_f, &test_f, &opts.probe))?;
    Ok(Scores { knn_top1, linear_top1, features_s, knn_s, probe_s })
}

/// Evaluates the model file `checkpoint` on `train` (k-NN memory, probe training) and `test`, and the
/// baseline when asked.
pub fn evaluate(
    checkpoint: &Path,
    train: &Dataset,
    test: &Dataset,
    opts: &EvalOptions,
    progress: &dyn Fn(Progress<'_>),
) -> Result<EvalReport, EvalError> {
    let start = Instant::now();
    opts.knn.validate()?;
    opts.probe.validate()?;
    check_labelled(train, test)?;
    let mut file =
        ModelFile::read_with(checkpoint, &Overrides { input_size: opts.input_size, ..Overrides::default() })?;
    file.model.to_device(opts.extract.device)?;
    let (model, transform) = (&file.model, input_transform(&file.preprocessing)?);
    tracing::info!(
        "evaluating {} ({}-d features) on {} training and {} test images: resize {}, centre crop {}, mean {:?}, std {:?}",
        checkpoint.display(),
        model.config.feature_dim(),
        train.len(),
        test.len(),
        transform.resize,
        transform.crop,
        transform.mean.as_deref().unwrap_or_default(),
        transform.std.as_deref().unwrap_or_default()
    );
    let scores = evaluate_model("checkpoint", model, train, test, &transform, opts, progress)?;
    let baseline = match opts.baseline {
        None => None,
        Some(b @ Baseline::Random { seed }) => {
            let mut random = SwavModel::new(model.config.clone(), seed)?;
            random.to_device(opts.extract.device)?;
            let scores = evaluate_model("random init", &random, train, test, &transform, opts, progress)?;
            Some(BaselineReport { baseline: b, scores })
        }
    };
    Ok(EvalReport {
        checkpoint: checkpoint.display().to_string(),
        knn_top1: scores.knn_top1,
        linear_top1: scores.linear_top1,
        linear_protocol: PROBE_PROTOCOL.into(),
        baseline,
        train_images: train.len(),
        test_images: test.len(),
        feature_dim: model.config.feature_dim(),
        classes: train.classes().len(),
        train_data: train.dir().display().to_string(),
        test_data: test.dir().display().to_string(),
        input: InputReport {
            resize: transform.resize,
            crop: transform.crop,
            channels: model.config.in_channels,
            mean: transform.mean.clone().unwrap_or_default(),
            std: transform.std.clone().unwrap_or_default(),
        },
        knn: opts.knn.clone(),
        probe: opts.probe.clone(),
        scores,
        total_s: start.elapsed().as_secs_f64(),
    })
}
