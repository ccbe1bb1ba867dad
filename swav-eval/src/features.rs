//! Pooled backbone features of every image of a dataset, in evaluation mode.
//!
//! Conventions:
//! - The backbone runs with its running batch-norm statistics (`SwavModel::features`), on the
//!   evaluation transform of swav-data (resize the shorter side, centre crop, normalise), one batch
//!   after another in index order with no image dropped: row `i` of [`Features`] is image `i`.
//! - The transform is the model file's own preprocessing (`swav_model::Preprocessing`: what the file
//!   records, else the one set of defaults), the same that export writes into an ONNX model:
//!   centre crop `input_size`, shorter side resized to `input_size` for images of at most 64 px (used
//!   whole), else `round(input_size * 256 / 224)` (the ImageNet protocol: Resize 256, CenterCrop 224).

use swav_data::{AugmentConfig, CropGroup, Dataset, EvalConfig, EvalLoader, Layout, LoaderConfig, MultiCropConfig};
use swav_model::{Preprocessing, SwavModel};
use swav_tensor::{Device, Tensor};

use crate::EvalError;

/// A matrix of features, one row per image, with the images' labels when the data has them.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// `n * dim` values, row-major.
    pub data: Vec<f32>,
    /// Rows (images).
    pub n: usize,
    /// Values per row (the backbone's feature channels).
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
    pub fn new(data: Vec<f32>, dim: usize, labels: Option<Vec<u32>>) -> Result<Features, EvalError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(EvalError::Invalid(format!("{} feature values do not make rows of {dim}", data.len())));
        }
        let n = data.len() / dim;
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(EvalError::Invalid(format!("{} labels for {n} feature rows", l.len())));
            }
        }
        let classes = labels.as_ref().and_then(|l| l.iter().max()).map_or(0, |&m| m as usize + 1);
        let f = Features { data, n, dim, labels, classes };
        f.check_finite("features")?;
        Ok(f)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The labels, or an error that says what `what` needs them for.
    pub fn labels_for(&self, what: &str) -> Result<&[u32], EvalError> {
        self.labels
            .as_deref()
            .ok_or_else(|| EvalError::Invalid(format!("{what} needs labelled features, these have no labels")))
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
    /// Where the network runs: [`crate::frozen::evaluate`] and [`crate::embed::embed`] move the model
    /// there; [`extract_features`] runs on the model's device whatever this says.
    pub device: Device,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            batch_size: 256,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: Device::Cpu,
        }
    }
}

/// The evaluation transform of a model: shorter side resized to [`Preprocessing::eval_resize`], centre
/// crop of `input_size`, normalised with the model's mean and std.
pub fn input_transform(pre: &Preprocessing) -> Result<EvalConfig, EvalError> {
    let cfg = EvalConfig {
        resize: pre.eval_resize(),
        crop: pre.input_size,
        mean: Some(pre.mean.clone()),
        std: Some(pre.std.clone()),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The training transform of both official evaluations (`eval_linear.py`, `eval_semisup.py`):
/// `RandomResizedCrop(input_size)` (scale 0.08-1, ratio 3/4-4/3, bilinear) and a horizontal flip with
/// probability 0.5, normalised with the model's mean and std; no colour distortion, no blur. As a
/// one-crop multi-crop configuration, so that the loader draws it anew every epoch.
pub fn train_transform(pre: &Preprocessing) -> Result<MultiCropConfig, EvalError> {
    let cfg = MultiCropConfig {
        groups: vec![CropGroup { count: 1, size: pre.input_size, min_scale: 0.08, max_scale: 1.0 }],
        augment: AugmentConfig {
            flip_p: 0.5,
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            mean: Some(pre.mean.clone()),
            std: Some(pre.std.clone()),
            ..AugmentConfig::default()
        },
    };
    cfg.validate()?;
    Ok(cfg)
}

pub(crate) fn model_channels(model: &SwavModel) -> Result<u8, EvalError> {
    match model.config.in_channels {
        1 => Ok(1),
        3 => Ok(3),
        c => Err(EvalError::Invalid(format!(
            "the model takes {c}-channel images: evaluation feeds images of 1 or 3 channels"
        ))),
    }
}

/// What a batch goes through, for the memory it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Evaluation-mode forward: a few of the largest activations at a time.
    Forward,
    /// Training forward and backward: every activation kept, with its gradient (the estimate of
    /// swav-train's memory check), plus parameters, gradients and momentum.
    Training,
}

/// Refuses a batch size and image size whose batches cannot fit in the memory available (an input
/// size read from a model file, or given by hand, can ask for tens of gigabytes): the loader's
/// batches in flight plus the activations of the pass, per image.
pub(crate) fn check_batch_memory(
    config: &swav_model::ModelConfig,
    crop: usize,
    channels: u8,
    batch_size: usize,
    pass: Pass,
) -> Result<(), EvalError> {
    if batch_size == 0 {
        return Err(EvalError::Invalid("the batch size must be at least 1".into()));
    }
    let pixels = (crop as u128).pow(2) * channels as u128;
    let (activations, fixed) = match pass {
        Pass::Forward => (4 * config.peak_activation_values(crop), 0),
        Pass::Training => (3 * config.activation_values(crop), 3 * config.backbone_state_values()),
    };
    let need = 4 * ((3 * pixels + activations) * batch_size as u128 + fixed);
    if let Some(available) = swav_core::sys::available_memory() {
        if need > available as u128 {
            let h = swav_core::sys::human_bytes;
            return Err(EvalError::Invalid(format!(
                "batches of {batch_size} images of {crop}x{crop} need about {} but {} is available: lower the batch size or the input size",
                h(need),
                h(available as u128)
            )));
        }
    }
    Ok(())
}

/// Pooled backbone features `[dataset.len(), feature_dim]` of every image, in index order, with the
/// dataset's labels, computed on the model's device (in float32). `progress(done, total)` is called
/// after each batch.
pub fn extract_features(
    model: &SwavModel,
    dataset: &Dataset,
    transform: &EvalConfig,
    opts: &ExtractOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Features, EvalError> {
    let channels = model_channels(model)?;
    check_batch_memory(&model.config, transform.crop, channels, opts.batch_size, Pass::Forward)?;
    let (workers, note) = swav_core::sys::cap_threads(opts.workers, "feature extraction workers");
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    let cfg = LoaderConfig {
        batch_size: opts.batch_size,
        workers,
        layout: Layout::Nhwc,
        channels: Some(channels),
        ..LoaderConfig::default()
    };
    let mut loader = EvalLoader::new(dataset, transform, &cfg)?;
    let device = model.device();
    let dim = model.config.feature_dim();
    let total = dataset.len();
    let mut data = Vec::with_capacity(total * dim);
    let mut labels = Vec::with_capacity(total);
    let mut labelled = true;
    for batch in loader.iter() {
        let batch = batch?;
        let group = batch.group(0);
        let images = Tensor::from_slice(&group.shape, group.data)?.to_device(device)?;
        let f = if device.is_cuda() {
            model.features(&images)?
        } else {
            // The batch's ops fork from a compute thread: see `on_compute_thread`.
            swav_tensor::on_compute_thread(|| model.features(&images))?
        };
        if f.shape() != [batch.len(), dim] {
            return Err(EvalError::Invalid(format!(
                "features of a batch of {}: {:?}, expected [{}, {dim}]",
                batch.len(),
                f.shape(),
                batch.len()
            )));
        }
        data.extend_from_slice(&f.to_vec());
        for l in batch.labels() {
            match l {
                Some(l) => labels.push(*l),
                None => labelled = false,
            }
        }
        progress(data.len() / dim, total);
    }
    if data.len() != total * dim {
        return Err(EvalError::Invalid(format!("the loader gave {} images of {total}", data.len() / dim)));
    }
    let classes =
        if labelled { dataset.classes().len().max(labels.iter().max().map_or(0, |&m| m as usize + 1)) } else { 0 };
    let features = Features { data, n: total, dim, labels: labelled.then_some(labels), classes };
    features.check_finite(&format!("features of {}", dataset.dir().display()))?;
    Ok(features)
}
