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

use swav_data::{Dataset, EvalConfig, EvalLoader, Layout, LoaderConfig};
use swav_model::{Preprocessing, SwavModel};
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
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions { batch_size: 256, workers: std::thread::available_parallelism().map_or(1, |n| n.get()) }
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

fn model_channels(model: &SwavModel) -> Result<u8, EvalError> {
    match model.config.in_channels {
        1 => Ok(1),
        3 => Ok(3),
        c => Err(EvalError::Invalid(format!(
            "the model takes {c}-channel images: evaluation feeds images of 1 or 3 channels"
        ))),
    }
}

/// Refuses a batch size and image size whose batches cannot fit in the memory available (an input
/// size read from a model file, or given by hand, can ask for tens of gigabytes): the loader's
/// batches in flight plus a few of the largest activations of the forward, per image.
fn check_batch_memory(model: &SwavModel, t: &EvalConfig, opts: &ExtractOptions, channels: u8) -> Result<(), EvalError> {
    if opts.batch_size == 0 {
        return Err(EvalError::Invalid("the feature extraction batch size must be at least 1".into()));
    }
    let pixels = (t.crop as u128).pow(2) * channels as u128;
    let per_image = 4 * (3 * pixels + 4 * model.config.peak_activation_values(t.crop));
    let need = per_image * opts.batch_size as u128;
    if let Some(available) = swav_core::sys::available_memory() {
        if need > available as u128 {
            let h = swav_core::sys::human_bytes;
            return Err(EvalError::Invalid(format!(
                "batches of {} images of {}x{} need about {} but {} is available: lower the batch size or the input size",
                opts.batch_size,
                t.crop,
                t.crop,
                h(need),
                h(available as u128)
            )));
        }
    }
    Ok(())
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
    check_batch_memory(model, transform, opts, channels)?;
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
        return Err(EvalError::Invalid(format!("the loader gave {} images of {total}", data.len() / dim)));
    }
    let classes =
        if labelled { dataset.classes().len().max(labels.iter().max().map_or(0, |&m| m as usize + 1)) } else { 0 };
    let features = Features { data, n: total, dim, labels: labelled.then_some(labels), classes };
    features.check_finite(&format!("features of {}", dataset.dir().display()))?;
    Ok(features)
}
