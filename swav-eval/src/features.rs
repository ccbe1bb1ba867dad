//! Pooled backbone features of every image of a dataset, in evaluation mode.
//!
//! Conventions:
//! - The backbone runs with its running batch-norm statistics (`SwavModel::features`), on the
//!   evaluation transform of swav-data (resize the shorter side, centre crop, normalise), one batch
//!   after another in index order with no image dropped: row `i` of [`Features`] is image `i`.
//! - Both datasets of an evaluation must be normalised alike, so [`input_transform`] always returns
//!   explicit `mean` / `std`: the checkpoint's when it records them (the trainer writes `mean`, `std`
//!   as JSON arrays and `input_size` as an integer), else the training dataset's pixel statistics.
//! - Image size: `crop = input_size` from the checkpoint (or an override); without one, the shorter
//!   side of the first training image when it is at most 64 px (whole small images, as for
//!   Fashion-MNIST or CIFAR), else 224. `resize = crop` for crops of at most 64 px (the image is used
//!   whole), else `round(crop * 256 / 224)` (the ImageNet protocol: Resize 256, CenterCrop 224).

use std::collections::BTreeMap;
use std::path::Path;

use swav_data::{Dataset, EvalConfig, EvalLoader, Layout, LoaderConfig};
use swav_model::checkpoint::{load_model_state, LoadOptions, NamedTensors};
use swav_model::SwavModel;
use swav_tensor::Tensor;

use crate::EvalError;

/// A matrix of features, one row per image, with the images' labels when the data has them.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// `n * dim` values, row-major.
    pub data: Vec<f32>,
    pub n: usize,
    pub dim: usize,
    /// One label per row, in `0..classes`; `None` for unlabelled data.
    pub labels: Option<Vec<u32>>,
    /// Number of classes (labels are below it).
    pub classes: usize,
}

impl Features {
    /// Features with `data.len() / dim` rows; `classes` is one more than the largest label (0 without
    /// labels). Fails on a ragged matrix, a label count that differs from the row count, or a
    /// non-finite value.
    pub fn new(
        data: Vec<f32>,
        dim: usize,
        labels: Option<Vec<u32>>,
    ) -> Result<Features, EvalError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(EvalError::Invalid(format!(
                "{} feature values do not make rows of {dim}",
                data.len()
            )));
        }
        let n = data.len() / dim;
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(EvalError::Invalid(format!(
                    "{} labels for {n} feature rows",
                    l.len()
                )));
            }
        }
        let classes = labels
            .as_ref()
            .and_then(|l| l.iter().max())
            .map_or(0, |&m| m as usize + 1);
        let f = Features {
            data,
            n,
            dim,
            labels,
            classes,
        };
        f.check_finite("features")?;
        Ok(f)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The labels, or an error that says what `what` needs them for.
    pub fn labels_for(&self, what: &str) -> Result<&[u32], EvalError> {
        self.labels.as_deref().ok_or_else(|| {
            EvalError::Invalid(format!(
                "{what} needs labelled features, these have no labels"
            ))
        })
    }

    pub(crate) fn check_finite(&self, what: &str) -> Result<(), EvalError> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(p) => Err(EvalError::Invalid(format!(
                "{what}: image {} has a non-finite feature ({}): the model's weights or batch-norm statistics are broken (a diverged run?)",
                p / self.dim,
                self.data[p]
            ))),
        }
    }
}

/// How to run the feature extraction.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Loader threads decoding and transforming images (0: in the calling thread).
    pub workers: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            batch_size: 256,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A model file and the string metadata stored with it.
pub struct LoadedModel {
    pub model: SwavModel,
    pub metadata: BTreeMap<String, String>,
}

/// Loads a swav-rs model file (`SwavModel::save`, e.g. `<run>/checkpoints/step-N.safetensors`),
/// keeping its metadata (`mean`, `std`, `input_size`, ...).
pub fn load_model(path: &Path) -> Result<LoadedModel, EvalError> {
    if path.is_dir() {
        return Err(EvalError::Invalid(format!(
            "{} is a directory: pass a model file, e.g. <run-dir>/checkpoints/step-NNNNNNNN.safetensors",
            path.display()
        )));
    }
    let state = NamedTensors::read(path)?;
    let config = SwavModel::config_of(path, &state)?;
    let mut model = SwavModel::new(config, 0)?;
    load_model_state(&mut model, &state, "", LoadOptions::default())?;
    Ok(LoadedModel {
        model,
        metadata: state.metadata,
    })
}

/// The side below which images are evaluated whole (resize = crop).
pub const SMALL_IMAGE: usize = 64;

/// The evaluation transform for a model (see the module docs for where each value comes from).
/// `input_size` overrides the checkpoint's.
pub fn input_transform(
    model: &SwavModel,
    metadata: &BTreeMap<String, String>,
    train: &Dataset,
    input_size: Option<usize>,
) -> Result<EvalConfig, EvalError> {
    let channels = model_channels(model)?;
    let bad = |key: &str, raw: &str, why: String| {
        EvalError::Invalid(format!("checkpoint metadata `{key}` = `{raw}`: {why}"))
    };
    let crop = match (input_size, metadata.get("input_size")) {
        (Some(s), _) => s,
        (None, Some(raw)) => raw
            .trim()
            .parse::<usize>()
            .map_err(|e| bad("input_size", raw, e.to_string()))?,
        (None, None) => {
            let first = train.image(0)?;
            let short = first.height.min(first.width) as usize;
            if short <= SMALL_IMAGE {
                short
            } else {
                224
            }
        }
    };
    if crop == 0 {
        return Err(EvalError::Invalid(
            "the evaluation image size must be positive".into(),
        ));
    }
    let resize = if crop <= SMALL_IMAGE {
        crop
    } else {
        (crop as f64 * 256.0 / 224.0).round() as usize
    };
    let stats = |key: &str, from_data: &[f64]| -> Result<Vec<f32>, EvalError> {
        match metadata.get(key) {
            Some(raw) => {
                let v: Vec<f32> = serde_json::from_str(raw).map_err(|e| {
                    bad(key, raw, format!("expected a JSON array of numbers ({e})"))
                })?;
                if v.is_empty()
                    || v.iter().any(|x| !x.is_finite())
                    || (key == "std" && v.iter().any(|&x| x <= 0.0))
                {
                    return Err(bad(
                        key,
                        raw,
                        "expected finite values (and a positive std)".into(),
                    ));
                }
                Ok(v)
            }
            None => Ok(dataset_stats(from_data, channels, key == "std")),
        }
    };
    let m = train.manifest();
    let cfg = EvalConfig {
        resize,
        crop,
        mean: Some(stats("mean", &m.pixel_mean)?),
        std: Some(stats("std", &m.pixel_std)?),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The dataset's per-channel statistics for `channels` output channels: an RGB dataset evaluated on
/// one channel uses the luma-weighted average (the loader converts RGB to luma the same way).
fn dataset_stats(values: &[f64], channels: u8, is_std: bool) -> Vec<f32> {
    let floor = |v: f64| if is_std { v.max(1e-3) } else { v };
    if channels == 1 && values.len() == 3 {
        vec![floor(0.299 * values[0] + 0.587 * values[1] + 0.114 * values[2]) as f32]
    } else {
        values.iter().map(|&v| floor(v) as f32).collect()
    }
}

fn model_channels(model: &SwavModel) -> Result<u8, EvalError> {
    match model.config.in_channels {
        1 => Ok(1),
        3 => Ok(3),
        c => Err(EvalError::Invalid(format!(
            "the model takes {c}-channel images: evaluation feeds images of 1 or 3 channels"
        ))),
    }
}

/// Pooled backbone features `[dataset.len(), feature_dim]` of every image, in index order, with the
/// dataset's labels. `progress(done, total)` is called after each batch.
pub fn extract_features(
    model: &SwavModel,
    dataset: &Dataset,
    transform: &EvalConfig,
    opts: &ExtractOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Features, EvalError> {
    let channels = model_channels(model)?;
    let cfg = LoaderConfig {
        batch_size: opts.batch_size,
        workers: opts.workers,
        layout: Layout::Nhwc,
        channels: Some(channels),
        ..LoaderConfig::default()
    };
    let mut loader = EvalLoader::new(dataset, transform, &cfg)?;
    let dim = model.config.feature_dim();
    let total = dataset.len();
    let mut data = Vec::with_capacity(total * dim);
    let mut labels = Vec::with_capacity(total);
    let mut labelled = true;
    for batch in loader.iter() {
        let batch = batch?;
        let group = batch.group(0);
        let images = Tensor::from_slice(&group.shape, group.data)?;
        let f = model.features(&images)?;
        if f.shape() != [batch.len(), dim] {
            return Err(EvalError::Invalid(format!(
                "features of a batch of {}: {:?}, expected [{}, {dim}]",
                batch.len(),
                f.shape(),
                batch.len()
            )));
        }
        data.extend_from_slice(f.as_slice());
        for l in batch.labels() {
            match l {
                Some(l) => labels.push(*l),
                None => labelled = false,
            }
        }
        progress(data.len() / dim, total);
    }
    if data.len() != total * dim {
        return Err(EvalError::Invalid(format!(
            "the loader gave {} images of {total}",
            data.len() / dim
        )));
    }
    let classes = if labelled {
        dataset
            .classes()
            .len()
            .max(labels.iter().max().map_or(0, |&m| m as usize + 1))
    } else {
        0
    };
    let features = Features {
        data,
        n: total,
        dim,
        labels: labelled.then_some(labels),
        classes,
    };
    features.check_finite(&format!("features of {}", dataset.dir().display()))?;
    Ok(features)
}
