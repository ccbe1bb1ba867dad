//! The fine-tuning run: epochs of [`train_step`] over the labelled subset, a validation after each,
//! checkpoints, resume and the guards of a run folder (see the module docs of [`super`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use swav_data::{Dataset, EvalConfig, EvalLoader, Layout, LoaderConfig, MultiCropConfig, MultiCropLoader};
use swav_model::{ModelFile, Overrides};
use swav_tensor::Tensor;
use swav_train::lars::Lars;

use super::checkpoint::{self, Sidecar, SIDECAR_FORMAT};
use super::net::{train_step, Classifier};
use super::{FinetuneEpoch, FinetuneOptions, FinetuneOutcome, FinetuneReport, RunSpec, PROTOCOL, RUN_FORMAT};
use crate::classifier::{best_and_last, loss_far_above_chance, Accuracy, Tally};
use crate::features::{check_batch_memory, input_transform, model_channels, train_transform, Pass};
use crate::frozen::{check_labelled, InputReport};
use crate::linear::{batch_labels, TrainInputReport};
use crate::subset::{select, Selection};
use crate::{EvalError, Progress};

/// The run's description inside its folder.
pub const RUN_FILE: &str = "finetune-run.json";

/// Everything a run needs that does not change while it runs.
struct Setup {
    spec: RunSpec,
    channels: u8,
    train_transform: MultiCropConfig,
    val_transform: EvalConfig,
    train_input: TrainInputReport,
    val_input: InputReport,
    workers: usize,
}

/// Refuses an input inside the run folder (pruning could delete it) and a run folder that holds
/// something else (a pretraining run, another tool's files with checkpoints).
fn check_folders(opts: &FinetuneOptions, train: &Dataset, val: &Dataset) -> Result<(), EvalError> {
    let mut inputs: Vec<(&Path, &str)> = vec![
        (&opts.pretrained, "pretrained model file"),
        (train.dir(), "training data"),
        (val.dir(), "validation data"),
    ];
    if let Selection::List { path } = &opts.selection {
        inputs.push((path, "subset list"));
    }
    let run = std::fs::canonicalize(&opts.run_dir).ok();
    for (path, role) in &inputs {
        if let (Some(run), Ok(p)) = (&run, std::fs::canonicalize(path)) {
            if p.starts_with(run) {
                return Err(EvalError::Invalid(format!(
                    "the {role} {} is inside the run folder {}: choose another --run-dir",
                    path.display(),
                    opts.run_dir.display()
                )));
            }
        }
    }
    let others: Vec<&str> = ["config.toml", "checkpoints"]
        .into_iter()
        .filter(|f| opts.run_dir.join(f).exists() && !opts.run_dir.join(RUN_FILE).exists())
        .collect();
    if !others.is_empty() {
        return Err(EvalError::Invalid(format!(
            "{} holds {} but no {RUN_FILE}: it is not a fine-tuning run (a pretraining run?); choose another --run-dir",
            opts.run_dir.display(),
            others.join(" and ")
        )));
    }
    Ok(())
}

/// Reads the pretrained file and the subset, checks memory, and describes the run; returns the
/// network a new run starts from.
fn setup(train: &Dataset, val: &Dataset, opts: &FinetuneOptions) -> Result<(Setup, Classifier), EvalError> {
    let c = &opts.config;
    let file =
        ModelFile::read_with(&opts.pretrained, &Overrides { input_size: opts.input_size, ..Overrides::default() })?;
    let pre = &file.preprocessing;
    let channels = model_channels(&file.model)?;
    let (val_t, train_t) = (input_transform(pre)?, train_transform(pre)?);
    check_batch_memory(&file.model.config, pre.input_size.max(val_t.crop), channels, c.batch_size, Pass::Training)?;
    let (workers, note) = swav_core::sys::cap_threads(opts.workers, "loader workers");
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    let subset = select(train, &opts.selection)?;
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let spec = RunSpec {
        format: RUN_FORMAT.into(),
        pretrained: absolute(&opts.pretrained),
        pretrained_sha256: swav_train::checkpoint::sha256_of(&opts.pretrained)?,
        train_data: absolute(train.dir()),
        val_data: absolute(val.dir()),
        subset,
        model: file.model.config.clone(),
        classes: train.classes().to_vec(),
        input_size: pre.input_size,
        mean: pre.mean.clone(),
        std: pre.std.clone(),
        config: c.clone(),
    };
    let group = &train_t.groups[0];
    let train_input = TrainInputReport {
        crop: group.size,
        scale: [group.min_scale, group.max_scale],
        flip_p: train_t.augment.flip_p,
    };
    let net = Classifier::new(file.model.backbone, spec.classes.len(), c.seed);
    let setup = Setup {
        spec,
        channels,
        train_input,
        train_transform: train_t,
        val_input: InputReport {
            resize: val_t.resize,
            crop: val_t.crop,
            channels: file.model.config.in_channels,
            mean: pre.mean.clone(),
            std: pre.std.clone(),
        },
        val_transform: val_t,
        workers,
    };
    Ok((setup, net))
}

/// Writes the run's description in a new run folder, or checks that a resumed one describes the
/// same run.
fn prepare_run_dir(run_dir: &Path, spec: &RunSpec) -> Result<(), EvalError> {
    let path = run_dir.join(RUN_FILE);
    if path.exists() {
        let stored: RunSpec = crate::json::read(&path, "a fine-tuning run description")?;
        if stored.identity() != spec.identity() {
            let (a, b) = (serde_json::to_value(stored.identity()), serde_json::to_value(spec.identity()));
            let (a, b) = (a.expect("serialises"), b.expect("serialises"));
            let differ: Vec<&String> = a
                .as_object()
                .expect("an object")
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, _)| k)
                .collect();
            return Err(EvalError::Invalid(format!(
                "{} holds another fine-tuning run (different: {}); use a new --run-dir",
                run_dir.display(),
                differ.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        return Ok(());
    }
    crate::json::write(&path, spec)
}

/// Top-1 / top-5 of the network on every validation image (evaluation mode, centre crops).
fn validate(
    net: &Classifier,
    val: &Dataset,
    setup: &Setup,
    batch_size: usize,
    progress: &dyn Fn(Progress<'_>),
) -> Result<Tally, EvalError> {
    let cfg = LoaderConfig {
        batch_size,
        workers: setup.workers,
        layout: Layout::Nhwc,
        channels: Some(setup.channels),
        ..LoaderConfig::default()
    };
    let mut loader = EvalLoader::new(val, &setup.val_transform, &cfg)?;
    let mut tally = Tally::default();
    for batch in loader.iter() {
        let batch = batch?;
        let labels = batch_labels(&batch)?;
        let g = batch.group(0);
        let logits = net.logits(&Tensor::from_slice(&g.shape, g.data)?)?;
        tally.add_batch(logits.as_slice(), net.classes(), &labels)?;
        progress(Progress { task: "validation", done: tally.seen, total: val.len() });
    }
    Ok(tally)
}

/// Fine-tunes (or resumes fine-tuning) as `opts` says, on the labelled subset of `train`, validating
/// on `val` (same classes). `progress` hears of every step (task `epoch e/E`) and validation image.
pub fn finetune(
    train: &Dataset,
    val: &Dataset,
    opts: &FinetuneOptions,
    progress: &dyn Fn(Progress<'_>),
) -> Result<FinetuneOutcome, EvalError> {
    let c = &opts.config;
    c.validate()?;
    if opts.max_steps == Some(0) || opts.keep_checkpoints == 0 {
        return Err(EvalError::Invalid("max steps and kept checkpoints must be at least 1".into()));
    }
    check_labelled(train, val)?;
    check_folders(opts, train, val)?;
    let (setup, fresh) = setup(train, val, opts)?;
    std::fs::create_dir_all(&opts.run_dir).map_err(|e| swav_core::fs::FsError::new(&opts.run_dir, e))?;
    let _lock = swav_core::lock::FolderLock::acquire(&opts.run_dir)?;
    for path in swav_train::checkpoint::clean_incomplete(&opts.run_dir)? {
        tracing::warn!("removed {}, left by an interrupted save", path.display());
    }
    prepare_run_dir(&opts.run_dir, &setup.spec)?;

    let cfg = LoaderConfig {
        batch_size: c.batch_size,
        seed: c.seed,
        workers: setup.workers,
        layout: Layout::Nhwc,
        drop_last: false,
        shuffle: true,
        channels: Some(setup.channels),
        ..LoaderConfig::default()
    };
    let mut loader = MultiCropLoader::with_indices(train, &setup.spec.subset.indices, &setup.train_transform, &cfg)?;
    let steps_per_epoch = loader.steps_per_epoch();

    let newest = checkpoint::latest(&opts.run_dir)?;
    let (mut net, mut opt, mut side) = match newest {
        Some(s) => {
            if s.steps_per_epoch != steps_per_epoch || s.run.identity() != setup.spec.identity() {
                return Err(EvalError::Invalid(format!(
                    "the newest checkpoint of {} belongs to another run; use a new --run-dir",
                    opts.run_dir.display()
                )));
            }
            tracing::info!(
                "resuming from step {} (epoch {}, batch {} of {steps_per_epoch})",
                s.step,
                s.epoch,
                s.step_in_epoch
            );
            let (net, opt) = checkpoint::restore(&opts.run_dir, &s, c.momentum, c.weight_decay)?;
            (net, opt, s)
        }
        None => {
            let side = Sidecar {
                format: SIDECAR_FORMAT.into(),
                step: 0,
                epoch: 0,
                step_in_epoch: 0,
                steps_per_epoch,
                tally: Tally::default(),
                history: Vec::new(),
                model_sha256: String::new(),
                train_sha256: String::new(),
                run: setup.spec.clone(),
            };
            (fresh, Lars::new(c.momentum, c.weight_decay, 0.0, false), side)
        }
    };
    let resumed_from = (side.step > 0).then_some(side.step);
    let mut newest_model = (side.step > 0).then(|| checkpoint::model_path(&opts.run_dir, side.step));
    let keep = opts.keep_checkpoints;

    while side.epoch < c.epochs {
        let (lr_trunk, lr_head) = c.lrs(side.epoch);
        let task = format!("epoch {}/{}", side.epoch + 1, c.epochs);
        let mut batches = loader.epoch(side.epoch as u64);
        // Resuming inside an epoch: the batches already done are prepared and dropped (their content
        // depends only on (seed, epoch, image), so the rest of the epoch is unchanged).
        for _ in 0..side.step_in_epoch {
            batches.next().transpose()?;
        }
        for batch in batches.by_ref() {
            let batch = batch?;
            let labels = batch_labels(&batch)?;
            let g = batch.group(0);
            let images = Tensor::from_slice(&g.shape, g.data)?;
            drop(batch);
            let (loss, logits) = train_step(&mut net, &mut opt, images, &labels, lr_trunk, lr_head)?;
            side.tally.add(logits.as_slice(), net.classes(), &labels, loss)?;
            side.step += 1;
            side.step_in_epoch += 1;
            progress(Progress { task: &task, done: side.step_in_epoch, total: steps_per_epoch });
            let interrupted = opts.stop.load(Ordering::SeqCst);
            if interrupted || opts.max_steps.is_some_and(|m| side.step >= m) {
                let path = checkpoint::save(&opts.run_dir, &mut net, &opt, &side, keep)?;
                return Ok(outcome(&side, path, interrupted, resumed_from, None));
            }
        }
        drop(batches);
        let v = validate(&net, val, &setup, c.batch_size, progress)?;
        let ((train_loss, train_top1, _), (_, val_top1, val_top5)) = (side.tally.means(), v.means());
        tracing::info!(
            "{task}: lr {lr_trunk} / {lr_head}, loss {train_loss:.4}, train top-1 {:.2}%, val top-1 {:.2}% top-5 {:.2}%",
            100.0 * train_top1,
            100.0 * val_top1,
            100.0 * val_top5
        );
        let classes = net.classes();
        if loss_far_above_chance(train_loss, classes)
            && !side.history.iter().any(|e| loss_far_above_chance(e.train_loss, classes))
        {
            tracing::warn!(
                "{task}: the training loss {train_loss:.2} is far above chance level ({:.2}): the learning rates are probably too high for this network (try a tenth: --lr-trunk {} --lr-head {})",
                (classes as f64).ln(),
                c.lr_trunk / 10.0,
                c.lr_head / 10.0
            );
        }
        side.history.push(FinetuneEpoch {
            epoch: side.epoch + 1,
            lr_trunk,
            lr_head,
            train_loss,
            train_top1,
            val_top1,
            val_top5,
        });
        side.epoch += 1;
        side.step_in_epoch = 0;
        side.tally = Tally::default();
        newest_model = Some(checkpoint::save(&opts.run_dir, &mut net, &opt, &side, keep)?);
    }
    let path = newest_model.expect("a run that completed an epoch has a checkpoint");
    let report = report(&side, &setup, train, val, &path);
    Ok(outcome(&side, path, false, resumed_from, Some(report)))
}

fn outcome(
    side: &Sidecar,
    checkpoint: PathBuf,
    interrupted: bool,
    resumed_from: Option<usize>,
    report: Option<FinetuneReport>,
) -> FinetuneOutcome {
    FinetuneOutcome { steps: side.step, epochs_completed: side.epoch, checkpoint, interrupted, resumed_from, report }
}

fn report(side: &Sidecar, setup: &Setup, train: &Dataset, val: &Dataset, model: &Path) -> FinetuneReport {
    let history: Vec<Accuracy> =
        side.history.iter().map(|e| Accuracy { epoch: e.epoch, top1: e.val_top1, top5: e.val_top5 }).collect();
    let (best, last) = best_and_last(&history).expect("a finished run has epochs");
    let spec = &setup.spec;
    FinetuneReport {
        protocol: PROTOCOL.into(),
        pretrained: spec.pretrained.clone(),
        best,
        last,
        epochs: side.history.clone(),
        subset: spec.subset.clone(),
        config: spec.config.clone(),
        train_images: spec.subset.images,
        val_images: val.len(),
        classes: spec.classes.len(),
        feature_dim: spec.model.feature_dim(),
        train_data: train.dir().display().to_string(),
        val_data: val.dir().display().to_string(),
        train_input: setup.train_input.clone(),
        val_input: setup.val_input.clone(),
        model_file: model.display().to_string(),
    }
}
