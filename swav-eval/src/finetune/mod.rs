//! The paper's semi-supervised evaluation: `eval_semisup.py` of facebookresearch/swav, on any
//! labelled dataset.
//!
//! The official protocol, step for step:
//! - the whole network is trained: the pretrained backbone in training mode (batch statistics, running
//!   statistics updated) plus a new linear head ([`net`]), on a labelled subset of the training set
//!   ([`crate::subset`]: the official 1% and 10% ImageNet lists, any list of names or indices, or a
//!   seeded, optionally class-balanced fraction);
//! - training images: `RandomResizedCrop(input_size)` + horizontal flip, drawn anew every epoch;
//!   validation: the centre crop of [`crate::features`];
//! - SGD, momentum 0.9, no weight decay, a trunk and a head learning rate (presets: 1% labels
//!   0.02 / 5, 10% labels 0.01 / 0.2), `MultiStepLR([12, 16], gamma 0.2)` stepped per epoch, 20
//!   epochs, batch 256, shuffled per epoch with the last smaller batch kept;
//! - validated after every epoch; the report gives the best epoch (by top-1) and the last.
//!
//! A run lives in a folder, like a pretraining run ([`finetune`]): locked while used, the run's
//! description in `finetune-run.json` (a later start must describe the same run: same pretrained
//! weights, subset, classes and settings), checkpoints after every epoch, at `max_steps` and when
//! the stop flag is raised ([`checkpoint`]: swav-train's file conventions, SHA-256-checked sidecars).
//! Starting again resumes from the newest checkpoint, bit-identical to a run that never stopped.

pub mod checkpoint;
pub mod net;
mod run;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use swav_model::ModelConfig;

use crate::classifier::Accuracy;
use crate::frozen::InputReport;
use crate::linear::TrainInputReport;
use crate::subset::{Selection, Subset};
use crate::EvalError;

pub use run::finetune;

/// What [`FinetuneReport::protocol`] says.
pub const PROTOCOL: &str =
    "semi-supervised fine-tuning (official eval_semisup: whole network trained on the labelled subset)";

/// The optimisation settings; the defaults are the official ones for 10% of the labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// Epochs over the labelled subset (official: 20).
    pub epochs: usize,
    /// Images per step (official: 256, 32 on each of 8 GPUs).
    pub batch_size: usize,
    /// Learning rate of the backbone (official: 0.02 for 1% of the labels, 0.01 for 10%).
    pub lr_trunk: f64,
    /// Learning rate of the head (official: 5 for 1%, 0.2 for 10%).
    pub lr_head: f64,
    /// SGD momentum (official: 0.9).
    pub momentum: f64,
    /// Weight decay (official: 0).
    pub weight_decay: f64,
    /// Epochs (0-based) at which both learning rates are multiplied by `gamma` (official: 12, 16).
    pub decay_epochs: Vec<usize>,
    /// The decay factor (official: 0.2).
    pub gamma: f64,
    /// Seed of the head's initialisation, the shuffles and the crops (official: 31).
    pub seed: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 20,
            batch_size: 256,
            lr_trunk: 0.01,
            lr_head: 0.2,
            momentum: 0.9,
            weight_decay: 0.0,
            decay_epochs: vec![12, 16],
            gamma: 0.2,
            seed: 31,
        }
    }
}

impl FinetuneConfig {
    /// The official settings for 1% (`"1%"`, `"1"`) or 10% (`"10%"`, `"10"`) of the labels.
    pub fn preset(name: &str) -> Result<FinetuneConfig, EvalError> {
        match name.trim_end_matches('%') {
            "1" => Ok(FinetuneConfig { lr_trunk: 0.02, lr_head: 5.0, ..FinetuneConfig::default() }),
            "10" => Ok(FinetuneConfig::default()),
            _ => Err(EvalError::Invalid(format!("unknown preset `{name}`: the official ones are 1% and 10%"))),
        }
    }

    /// Refuses settings that cannot train (checked before any image is read).
    pub fn validate(&self) -> Result<(), EvalError> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let ok = self.epochs >= 1
            && self.batch_size >= 1
            && positive(self.lr_trunk)
            && positive(self.lr_head)
            && (0.0..1.0).contains(&self.momentum)
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && positive(self.gamma);
        if !ok {
            return Err(EvalError::Invalid(format!(
                "fine-tuning settings: need epochs >= 1, batch >= 1, positive learning rates and gamma, 0 <= momentum < 1, weight decay >= 0 (got {self:?})"
            )));
        }
        Ok(())
    }

    /// The learning rates (trunk, head) of epoch `epoch` (0-based).
    pub fn lrs(&self, epoch: usize) -> (f64, f64) {
        let at = |base| swav_train::schedule::multi_step(base, &self.decay_epochs, self.gamma, epoch);
        (at(self.lr_trunk), at(self.lr_head))
    }
}

/// Everything [`finetune`] needs besides the datasets.
#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    /// The run folder (created if needed; an existing run resumes).
    pub run_dir: PathBuf,
    /// The pretrained model file (any file `ModelFile` reads).
    pub pretrained: PathBuf,
    /// The labelled images.
    pub selection: Selection,
    /// The optimisation.
    pub config: FinetuneConfig,
    /// Overrides the model file's `input_size`.
    pub input_size: Option<usize>,
    /// Loader threads.
    pub workers: usize,
    /// Stop (with a checkpoint) once this many steps are done in total.
    pub max_steps: Option<usize>,
    /// Raised by a signal handler: save and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Checkpoints kept (the newest ones).
    pub keep_checkpoints: usize,
}

impl FinetuneOptions {
    /// Options for fine-tuning `pretrained` in `run_dir` on every training image, with the official
    /// 10% settings, no step limit and no stop flag raised.
    pub fn new(run_dir: &Path, pretrained: &Path) -> FinetuneOptions {
        FinetuneOptions {
            run_dir: run_dir.to_path_buf(),
            pretrained: pretrained.to_path_buf(),
            selection: Selection::All,
            config: FinetuneConfig::default(),
            input_size: None,
            workers: swav_core::sys::cores(),
            max_steps: None,
            stop: Arc::new(AtomicBool::new(false)),
            keep_checkpoints: 2,
        }
    }
}

/// What defines a run: a later start in the same folder must describe the same one (paths aside).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// `swav-rs-finetune-1`.
    pub format: String,
    /// The pretrained model file (absolute path).
    pub pretrained: String,
    /// Its SHA-256: the identity of the starting weights.
    pub pretrained_sha256: String,
    /// The training dataset folder (absolute path).
    pub train_data: String,
    /// The validation dataset folder (absolute path).
    pub val_data: String,
    /// The labelled subset (with the digest of its indices).
    pub subset: Subset,
    /// The backbone's configuration.
    pub model: ModelConfig,
    /// Class names (label `i` is `classes[i]`).
    pub classes: Vec<String>,
    /// Side of the training and validation crops.
    pub input_size: usize,
    /// Per-channel normalisation of the inputs.
    pub mean: Vec<f32>,
    /// See `mean`.
    pub std: Vec<f32>,
    /// The optimisation.
    pub config: FinetuneConfig,
}

/// The format tag of [`RunSpec`].
pub const RUN_FORMAT: &str = "swav-rs-finetune-1";

impl RunSpec {
    /// The parts that must agree for a resume: everything but where the files are.
    pub(crate) fn identity(&self) -> RunSpec {
        let selection = match &self.subset.selection {
            Selection::List { .. } => Selection::List { path: PathBuf::new() },
            other => other.clone(),
        };
        let subset = Subset { indices: Vec::new(), selection, ..self.subset.clone() };
        RunSpec {
            pretrained: String::new(),
            train_data: String::new(),
            val_data: String::new(),
            subset,
            ..self.clone()
        }
    }
}

/// One epoch of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneEpoch {
    /// 1-based.
    pub epoch: usize,
    /// The backbone's learning rate in this epoch.
    pub lr_trunk: f64,
    /// The head's learning rate in this epoch.
    pub lr_head: f64,
    /// Mean training loss over the epoch's (augmented) images.
    pub train_loss: f64,
    /// Training top-1 over the same images, as the network was while it trained on them.
    pub train_top1: f64,
    /// Validation top-1 after the epoch.
    pub val_top1: f64,
    /// Validation top-5 after the epoch.
    pub val_top5: f64,
}

/// The content of `finetune.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// [`PROTOCOL`]: which number this is.
    pub protocol: String,
    /// The pretrained model file.
    pub pretrained: String,
    /// The epoch of best validation top-1 (the number the official script reports).
    pub best: Accuracy,
    /// The last epoch.
    pub last: Accuracy,
    /// Every epoch.
    pub epochs: Vec<FinetuneEpoch>,
    /// The labelled images.
    pub subset: Subset,
    /// The optimisation.
    pub config: FinetuneConfig,
    /// Labelled training images (the subset).
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
    /// The fine-tuned network (backbone + `fc`, a torchvision state dict with the preprocessing).
    pub model_file: String,
}

impl FinetuneReport {
    /// Writes the report as pretty JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<(), EvalError> {
        crate::json::write(path, self)
    }

    /// Reads a report written by [`FinetuneReport::write`].
    pub fn read(path: &Path) -> Result<FinetuneReport, EvalError> {
        crate::json::read(path, "a fine-tuning report")
    }
}

/// What a call of [`finetune`] did.
#[derive(Clone, Debug)]
pub struct FinetuneOutcome {
    /// Steps done in total (over every call).
    pub steps: usize,
    /// Epochs completed in total.
    pub epochs_completed: usize,
    /// The newest model file.
    pub checkpoint: PathBuf,
    /// Whether the stop flag ended the call.
    pub interrupted: bool,
    /// The step this call continued from, when it continued an earlier run.
    pub resumed_from: Option<usize>,
    /// The report, once every epoch is done.
    pub report: Option<FinetuneReport>,
}
