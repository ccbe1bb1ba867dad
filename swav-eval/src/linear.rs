//! The paper's linear evaluation: `eval_linear.py` of facebookresearch/swav, on any labelled dataset.
//!
//! The official protocol, step for step:
//! - the backbone is frozen in evaluation mode (running batch-norm statistics), its features globally
//!   average-pooled;
//! - training images get a new `RandomResizedCrop(input_size)` + horizontal flip every epoch
//!   ([`crate::features::train_transform`]), validation images the centre crop (Resize 256 /
//!   CenterCrop 224 at ImageNet size; small images as the model file's `Preprocessing` says, see
//!   [`crate::features`]);
//! - one `Linear(F, classes)`, weight drawn from N(0, 0.01) and bias 0 ([`init_classifier`]), trained
//!   with PyTorch's cross-entropy by SGD: lr 0.3, momentum 0.9, weight decay 1e-6 on weight and bias,
//!   batch 256, 100 epochs, `CosineAnnealingLR(T_max = epochs, eta_min = 0)` stepped per epoch;
//! - shuffled per epoch like `DistributedSampler` (seeded by (seed, epoch)), the last smaller batch
//!   kept (no `drop_last`);
//! - validated after every epoch; the report gives the best epoch (by top-1, as the official log's
//!   "best acc") and the last.
//!
//! Since the backbone is frozen, no gradient flows into it: each batch is one evaluation-mode forward
//! (the cost, done while the loader's workers prepare the next crops) and one SGD step of the linear
//! layer ([`sgd_step`]). Validation features do not change between epochs, so they are computed once
//! and every validation is a matrix product; the numbers are the same as the official loop's.
//! Deterministic: the same files and settings give the same report (timings aside).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use swav_core::rng::SplitMix64;
use swav_data::{Batch, Dataset, Layout, LoaderConfig, MultiCropLoader};
use swav_model::layers::Linear;
use swav_model::param::{Layout as ParamLayout, Param, Visit};
use swav_model::{ModelFile, Overrides};
use swav_tensor::Tensor;
use swav_train::lars::Lars;
use swav_train::schedule::cosine_annealing;

use crate::classifier::{best_and_last, cross_entropy, loss_far_above_chance, Accuracy, Tally};
use crate::features::{
    check_batch_memory, extract_features, input_transform, model_channels, train_transform, ExtractOptions, Features,
    Pass,
};
use crate::frozen::{check_labelled, InputReport};
use crate::{EvalError, Progress};

/// What [`LinearReport::protocol`] says.
pub const PROTOCOL: &str =
    "linear evaluation (official eval_linear: frozen backbone, new RandomResizedCrop + flip every epoch)";

/// The optimisation settings; the defaults are the official ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    /// Epochs over the training set (official: 100).
    pub epochs: usize,
    /// Images per SGD step (official: 256, 32 on each of 8 GPUs).
    pub batch_size: usize,
    /// Learning rate of the first epoch (official: 0.3).
    pub lr: f64,
    /// `eta_min` of the cosine annealing (official: 0).
    pub final_lr: f64,
    /// SGD momentum (official: 0.9).
    pub momentum: f64,
    /// Weight decay on weight and bias (official: 1e-6).
    pub weight_decay: f64,
    /// Seed of the classifier's initialisation, the shuffles and the crops (official: 31).
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            epochs: 100,
            batch_size: 256,
            lr: 0.3,
            final_lr: 0.0,
            momentum: 0.9,
            weight_decay: 1e-6,
            seed: 31,
        }
    }
}

impl LinearConfig {
    /// Refuses settings that cannot train (checked before any image is read).
    pub fn validate(&self) -> Result<(), EvalError> {
        let ok = self.epochs >= 1
            && self.batch_size >= 1
            && self.lr.is_finite()
            && self.lr > 0.0
            && self.final_lr.is_finite()
            && (0.0..=self.lr).contains(&self.final_lr)
            && (0.0..1.0).contains(&self.momentum)
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if !ok {
            return Err(EvalError::Invalid(format!(
                "linear evaluation settings: need epochs >= 1, batch >= 1, lr > 0, 0 <= final lr <= lr, 0 <= momentum < 1, weight decay >= 0 (got {self:?})"
            )));
        }
        Ok(())
    }
}

/// Everything [`linear_eval`] can be told besides the data.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearOptions {
    /// The optimisation.
    pub config: LinearConfig,
    /// Overrides the model file's `input_size` (training crop and validation crop).
    pub input_size: Option<usize>,
    /// Loader threads (decoding and cropping while the backbone runs).
    pub workers: usize,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions { config: LinearConfig::default(), input_size: None, workers: swav_core::sys::cores() }
    }
}

/// One epoch of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearEpoch {
    /// 1-based.
    pub epoch: usize,
    /// The learning rate of the epoch.
    pub lr: f64,
    /// Mean training loss over the epoch's (augmented) images.
    pub train_loss: f64,
    /// Training top-1 over the same images, as the classifier was while it trained on them.
    pub train_top1: f64,
    /// Validation top-1 after the epoch.
    pub val_top1: f64,
    /// Validation top-5 after the epoch.
    pub val_top5: f64,
    /// Wall time of the epoch, in seconds.
    pub seconds: f64,
}

/// The training transform, as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainInputReport {
    /// Side of the random crops.
    pub crop: usize,
    /// Area fraction range of `RandomResizedCrop`.
    pub scale: [f32; 2],
    /// Probability of the horizontal flip.
    pub flip_p: f32,
}

/// The content of `linear.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearReport {
    /// [`PROTOCOL`]: which linear number this is.
    pub protocol: String,
    /// The model file evaluated.
    pub checkpoint: String,
    /// The epoch of best validation top-1 (the number the official script reports).
    pub best: Accuracy,
    /// The last epoch.
    pub last: Accuracy,
    /// Every epoch.
    pub epochs: Vec<LinearEpoch>,
    /// The optimisation.
    pub config: LinearConfig,
    /// Training images.
    pub train_images: usize,
    /// Validation images.
    pub val_images: usize,
    /// Number of classes.
    pub classes: usize,
    /// Width of the backbone's pooled features.
    pub feature_dim: usize,
    /// The training dataset folder.
    pub train_data: String,
    /// The validation dataset folder.
    pub val_data: String,
    /// The training transform.
    pub train_input: TrainInputReport,
    /// The validation transform.
    pub val_input: InputReport,
    /// Wall time of the validation features, in seconds.
    pub val_features_s: f64,
    /// Wall time of the whole run, in seconds.
    pub total_s: f64,
}

impl LinearReport {
    /// Writes the report as pretty JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<(), EvalError> {
        crate::json::write(path, self)
    }

    /// Reads a report written by [`LinearReport::write`].
    pub fn read(path: &Path) -> Result<LinearReport, EvalError> {
        crate::json::read(path, "a linear evaluation report")
    }
}

/// Stream tag of the classifier's initialisation ("LINEAR" in ASCII).
const LINEAR_STREAM: u64 = 0x4C49_4E45_4152;

/// The official classifier: `Linear(dim, classes)`, weight from N(0, 0.01) (SplitMix64 keyed by
/// `seed`), bias 0.
pub fn init_classifier(dim: usize, classes: usize, seed: u64) -> Result<Linear, EvalError> {
    let mut rng = SplitMix64::from_key(&[seed, LINEAR_STREAM]);
    let w: Vec<f32> = (0..classes * dim).map(|_| (rng.normal() * 0.01) as f32).collect();
    let weight = Param::new(Tensor::from_vec(&[classes, dim], w)?, ParamLayout::Plain);
    Ok(Linear { weight, bias: Some(Param::zeros(&[classes])), compute: swav_tensor::DType::F32 })
}

/// One SGD step of the classifier on a batch of features `[B, F]`: forward, cross-entropy, gradient,
/// `opt.step` (PyTorch's SGD: `g + wd w`, then momentum). Returns the batch's mean loss and the logits
/// it was computed from.
pub fn sgd_step(
    layer: &mut Linear,
    opt: &mut Lars,
    features: &Tensor,
    labels: &[u32],
    lr: f64,
) -> Result<(f64, Tensor), EvalError> {
    let logits = layer.forward(features)?;
    let classes = layer.weight.value.dim(0);
    let (loss, grad) = cross_entropy(logits.as_slice(), classes, labels)?;
    let dlogits = Tensor::from_vec(logits.shape(), grad)?;
    layer.zero_grad();
    layer.backward(features, &dlogits, false)?;
    opt.step(layer, lr, |_| false);
    Ok((loss, logits))
}

/// The labels of a batch of a labelled dataset.
pub(crate) fn batch_labels(batch: &Batch) -> Result<Vec<u32>, EvalError> {
    batch
        .labels()
        .iter()
        .zip(batch.indices())
        .map(|(l, i)| l.ok_or_else(|| EvalError::Invalid(format!("image {i} has no label"))))
        .collect()
}

/// Validation top-1 / top-5 of the classifier on cached features.
fn validate(layer: &Linear, val: &Features, labels: &[u32]) -> Result<Tally, EvalError> {
    const ROWS: usize = 4096;
    let classes = layer.weight.value.dim(0);
    let mut tally = Tally::default();
    for (rows, labels) in val.data.chunks(ROWS * val.dim).zip(labels.chunks(ROWS)) {
        let x = Tensor::from_slice(&[labels.len(), val.dim], rows)?;
        tally.add_batch(layer.forward(&x)?.as_slice(), classes, labels)?;
    }
    Ok(tally)
}

/// Runs the official linear evaluation of the backbone of the model file `checkpoint`: trained on
/// `train`, validated on `val` (same classes). `progress` hears of the validation features (images)
/// and of each epoch (batches).
pub fn linear_eval(
    checkpoint: &Path,
    train: &Dataset,
    val: &Dataset,
    opts: &LinearOptions,
    progress: &dyn Fn(Progress<'_>),
) -> Result<LinearReport, EvalError> {
    let start = Instant::now();
    let c = &opts.config;
    c.validate()?;
    check_labelled(train, val)?;
    let file = ModelFile::read_with(checkpoint, &Overrides { input_size: opts.input_size, ..Overrides::default() })?;
    let (model, pre) = (&file.model, &file.preprocessing);
    let channels = model_channels(model)?;
    let (val_t, train_t) = (input_transform(pre)?, train_transform(pre)?);
    check_batch_memory(&model.config, pre.input_size.max(val_t.crop), channels, c.batch_size, Pass::Forward)?;
    let (workers, note) = swav_core::sys::cap_threads(opts.workers, "loader workers");
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    let classes = train.classes().len();
    let dim = model.config.feature_dim();

    let t0 = Instant::now();
    let extract = ExtractOptions { batch_size: c.batch_size, workers, device: model.device() };
    let val_f = extract_features(model, val, &val_t, &extract, &|done, total| {
        progress(Progress { task: "validation features", done, total })
    })?;
    let val_labels = val_f.labels_for("the validation set")?.to_vec();
    let val_features_s = t0.elapsed().as_secs_f64();

    let cfg = LoaderConfig {
        batch_size: c.batch_size,
        seed: c.seed,
        workers,
        layout: Layout::Nhwc,
        drop_last: false,
        shuffle: true,
        channels: Some(channels),
        ..LoaderConfig::default()
    };
    let mut loader = MultiCropLoader::new(train, &train_t, &cfg)?;
    let steps = loader.steps_per_epoch();
    let mut layer = init_classifier(dim, classes, c.seed)?;
    let mut opt = Lars::new(c.momentum, c.weight_decay, 0.0, false);
    let mut epochs = Vec::with_capacity(c.epochs);
    for epoch in 0..c.epochs {
        let t = Instant::now();
        let lr = cosine_annealing(c.lr, c.final_lr, c.epochs, epoch);
        let task = format!("epoch {}/{}", epoch + 1, c.epochs);
        progress(Progress { task: &task, done: 0, total: steps });
        let mut tally = Tally::default();
        for (i, batch) in loader.epoch(epoch as u64).enumerate() {
            let batch = batch?;
            let labels = batch_labels(&batch)?;
            let g = batch.group(0);
            let images = Tensor::from_slice(&g.shape, g.data)?;
            drop(batch);
            let features = model.features(&images)?;
            let (loss, logits) = sgd_step(&mut layer, &mut opt, &features, &labels, lr)?;
            tally.add(logits.as_slice(), classes, &labels, loss)?;
            progress(Progress { task: &task, done: i + 1, total: steps });
        }
        let v = validate(&layer, &val_f, &val_labels)?;
        let ((train_loss, train_top1, _), (_, val_top1, val_top5)) = (tally.means(), v.means());
        tracing::info!(
            "{task}: lr {lr:.5}, loss {train_loss:.4}, train top-1 {:.2}%, val top-1 {:.2}% top-5 {:.2}%",
            100.0 * train_top1,
            100.0 * val_top1,
            100.0 * val_top5
        );
        if loss_far_above_chance(train_loss, classes)
            && !epochs.iter().any(|e: &LinearEpoch| loss_far_above_chance(e.train_loss, classes))
        {
            tracing::warn!(
                "{task}: the training loss {train_loss:.2} is far above chance level ({:.2}): the learning rate {} is probably too high for these features (try --lr {})",
                (classes as f64).ln(),
                c.lr,
                c.lr / 10.0
            );
        }
        epochs.push(LinearEpoch {
            epoch: epoch + 1,
            lr,
            train_loss,
            train_top1,
            val_top1,
            val_top5,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    let history: Vec<Accuracy> =
        epochs.iter().map(|e| Accuracy { epoch: e.epoch, top1: e.val_top1, top5: e.val_top5 }).collect();
    let (best, last) = best_and_last(&history).expect("at least one epoch ran");
    let group = &train_t.groups[0];
    Ok(LinearReport {
        protocol: PROTOCOL.into(),
        checkpoint: checkpoint.display().to_string(),
        best,
        last,
        epochs,
        config: c.clone(),
        train_images: train.len(),
        val_images: val.len(),
        classes,
        feature_dim: dim,
        train_data: train.dir().display().to_string(),
        val_data: val.dir().display().to_string(),
        train_input: TrainInputReport {
            crop: group.size,
            scale: [group.min_scale, group.max_scale],
            flip_p: train_t.augment.flip_p,
        },
        val_input: InputReport {
            resize: val_t.resize,
            crop: val_t.crop,
            channels: model.config.in_channels,
            mean: pre.mean.clone(),
            std: pre.std.clone(),
        },
        val_features_s,
        total_s: start.elapsed().as_secs_f64(),
    })
}
