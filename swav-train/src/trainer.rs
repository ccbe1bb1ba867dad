//! The training run: epochs of [`swav_step`] over the multi-crop loader, with checkpoints, resume,
//! metrics, progress and the guards a long run needs.
//!
//! - The run directory holds `config.toml` (the resolved configuration), `metrics.jsonl` and
//!   `checkpoints/`. Starting again in the same directory resumes from the newest checkpoint; the
//!   result is bit-identical to a run that never stopped (the loader's randomness depends only on
//!   (seed, epoch, image), the ops are deterministic, and momentum, queue and BN statistics are saved).
//! - A checkpoint is written every `checkpoint_every_epochs`, at the end, at `max_steps`, and when the
//!   `stop` flag is raised (Ctrl-C).
//! - A non-finite loss stops the run with an error before anything is saved, so the last good
//!   checkpoint stays the newest one. A loss stuck near ln(K) with few prototypes in use raises a
//!   collapse warning with the usual remedies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use swav_data::{Dataset, Layout, LoaderConfig, MultiCropLoader};
use swav_model::{Preprocessing, SwavModel};
use swav_tensor::Tensor;

use crate::checkpoint::{self, ModelMeta, Sidecar, SIDECAR_FORMAT};
use crate::config::Config;
use crate::lars::Lars;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::queue::Queue;
use crate::schedule::LrSchedule;
use crate::step::{swav_step, StepStats, SwavState};
use crate::TrainError;

pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Stop (with a checkpoint) once this many iterations are done in total.
    pub max_steps: Option<usize>,
    /// Raised by a signal handler: save and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
}

#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub steps: usize,
    pub epochs_completed: usize,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
    pub last_loss: Option<f64>,
    /// Images per second over the steps run by this call.
    pub images_per_s: f64,
    /// Whether this call continued an earlier run.
    pub resumed_from: Option<usize>,
}

/// Writes `config.toml` for a new run, or checks that a resumed run asks for the same configuration
/// (only `train.epochs` may change, to extend a run).
fn prepare_run_dir(run_dir: &Path, config: &Config) -> Result<(), TrainError> {
    let io = |source| TrainError::Io { path: run_dir.display().to_string(), source };
    std::fs::create_dir_all(run_dir).map_err(io)?;
    let path = run_dir.join("config.toml");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
        let stored = crate::config::load(&text, &[])?;
        let mut asked = config.clone();
        asked.train.epochs = stored.train.epochs;
        if asked != stored {
            let (a, b) = (toml_lines(&asked), toml_lines(&stored));
            let diff: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
            return Err(TrainError::Config(format!(
                "{} holds a run with another configuration (different: {}); use a new --run-dir to start a new run",
                run_dir.display(),
                diff.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
            )));
        }
    }
    swav_core::fs::atomic_write(&path, config.to_toml().as_bytes())?;
    Ok(())
}

fn toml_lines(c: &Config) -> Vec<String> {
    c.to_toml().lines().map(str::to_string).collect()
}

/// The normalisation the loader applies, recorded in model files for evaluation and export.
fn normalisation(config: &Config, dataset: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let a = &config.crops.augment;
    let mean = a.mean.clone().unwrap_or_else(|| dataset.manifest().pixel_mean.iter().map(|&v| v as f32).collect());
    let std = a.std.clone().unwrap_or_else(|| dataset.manifest().pixel_std.iter().map(|&v| v as f32).collect());
    (mean, std)
}

pub fn train(config: &Config, opts: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|source| TrainError::Io { path: opts.run_dir.display().to_string(), source })?;
    // One process per run folder: a second one stops here, naming the first.
    let _lock = swav_core::lock::FolderLock::acquire(&opts.run_dir)?;
    prepare_run_dir(&opts.run_dir, config)?;
    let t = &config.train;
    let dataset = Dataset::open(&opts.data_dir)?;
    let in_channels = config.model.in_channels;
    if in_channels != 1 && in_channels != 3 {
        return Err(TrainError::Config(format!("model.in_channels = {in_channels}: images have 1 or 3 channels")));
    }
    let workers = if t.workers > 0 {
        t.workers
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1)
    };
    let loader_cfg = LoaderConfig {
        batch_size: t.batch_size,
        seed: t.seed,
        rank: 0,
        world_size: 1,
        workers,
        prefetch: t.prefetch,
        layout: Layout::Nhwc,
        drop_last: true,
        shuffle: true,
        channels: Some(in_channels as u8),
        ..LoaderConfig::default()
    };
    let mut loader = MultiCropLoader::new(&dataset, &config.crops, &loader_cfg)?;
    let steps_per_epoch = loader.steps_per_epoch();
    let schedule = LrSchedule::new(t.base_lr, t.final_lr, t.start_warmup, t.warmup_epochs, t.epochs, steps_per_epoch);
    let (mean, std) = normalisation(config, &dataset);
    let model_meta = ModelMeta {
        preprocessing: Preprocessing::recorded(&config.model, mean, std, config.crops.groups[0].size)?,
        extra: BTreeMap::from([("train_data".to_string(), opts.data_dir.display().to_string())]),
    };

    let optimizer = Lars::new(t.momentum, t.weight_decay, t.trust_coefficient, t.lars);
    let (mut state, mut iteration, mut epoch, mut skip) = match checkpoint::latest(&opts.run_dir)? {
        Some(found) => {
            if found.sidecar.steps_per_epoch != steps_per_epoch {
                return Err(TrainError::Checkpoint(format!(
                    "the checkpoint was made with {} steps per epoch, the data now gives {steps_per_epoch}: is --data the same dataset?",
                    found.sidecar.steps_per_epoch
                )));
            }
            let s = found.sidecar.clone();
            tracing::info!(
                "resuming from step {} (epoch {}, batch {} of {})",
                s.step,
                s.epoch,
                s.step_in_epoch,
                steps_per_epoch
            );
            (checkpoint::restore(&found, optimizer)?, s.step, s.epoch, s.step_in_epoch)
        }
        None => (SwavState { model: SwavModel::new(config.model.clone(), t.seed)?, optimizer, queue: None }, 0, 0, 0),
    };
    state.model.set_conv_algorithm(t.conv);
    tracing::info!(
        "run {}: {} epochs of {steps_per_epoch} steps (batch {}), from step {iteration}",
        opts.run_dir.display(),
        t.epochs,
        t.batch_size
    );
    let resumed_from = (iteration > 0).then_some(iteration);
    let mut metrics = MetricsLog::open(&opts.run_dir, iteration as u64)?;
    let k = config.model.prototypes[0];
    let mut collapse = CollapseWatch::new(k, steps_per_epoch);

    let progress = progress_bar(opts.progress, schedule.total_steps() as u64, iteration as u64);
    let started = Instant::now();
    let first_iteration = iteration;
    let mut last_loss = None;
    let save = |state: &mut SwavState, iteration: usize, epoch: usize, step_in_epoch: usize, loss: Option<f64>| {
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.into(),
            step: iteration,
            epoch,
            step_in_epoch,
            steps_per_epoch,
            loss,
            model_file: String::new(),
            train_file: String::new(),
            config: config.clone(),
        };
        checkpoint::save(&opts.run_dir, state, &sidecar, &model_meta, t.keep_checkpoints)
    };
    let mut checkpoint_path = checkpoint::latest(&opts.run_dir)?.map(|f| f.model_path());

    while epoch < t.epochs {
        if t.queue_length > 0 && epoch >= t.epoch_queue_starts && state.queue.is_none() {
            state.queue = Some(Queue::new(t.crops_for_assign.len(), t.queue_length, config.model.feat_dim));
        }
        let mut batches = loader.epoch(epoch as u64);
        // Resuming inside an epoch: the batches before the checkpoint are prepared and dropped (their
        // content depends only on (seed, epoch, image), so the rest of the epoch is unchanged).
        for _ in 0..skip {
            batches.next().transpose()?;
        }
        let mut step_in_epoch = skip;
        skip = 0;
        let mut wait_start = Instant::now();
        while let Some(batch) = batches.next() {
            let batch = batch?;
            let step_start = Instant::now();
            let waited = (step_start - wait_start).as_secs_f64();
            let bs = batch.len();
            let groups = batch.groups().map(|g| Tensor::from_slice(&g.shape, g.data)).collect::<Result<Vec<_>, _>>()?;
            drop(batch);
            let lr = schedule.lr(iteration);
            let stats: StepStats = swav_step(&mut state, t, groups, bs, iteration, lr)?;
            if !stats.loss.is_finite() {
                progress.abandon();
                return Err(TrainError::NonFinite {
                    step: iteration,
                    loss: stats.loss,
                    checkpoint: checkpoint_path.as_ref().map_or("none yet".into(), |p| p.display().to_string()),
                });
            }
            iteration += 1;
            step_in_epoch += 1;
            last_loss = Some(stats.loss);
            let step_time = step_start.elapsed().as_secs_f64() + waited;
            let images_per_s = bs as f64 / step_time.max(1e-9);
            let m = StepMetrics {
                step: iteration as u64 - 1,
                epoch: Some(epoch as u64),
                loss: Some(stats.loss),
                lr: Some(lr),
                images_per_s: Some(images_per_s),
                data_wait: Some(waited / step_time.max(1e-9)),
                cluster_entropy: Some(stats.cluster_entropy),
                clusters_used: Some(stats.clusters_used as u64),
                elapsed_s: Some(started.elapsed().as_secs_f64()),
            };
            metrics.write(&m)?;
            progress.set_position(iteration as u64);
            progress
                .set_message(format!("epoch {epoch} loss {:.4} lr {:.4} {:.0} img/s", stats.loss, lr, images_per_s));
            if !progress.is_hidden() && iteration % 50 == 0 || progress.is_hidden() && iteration % 20 == 0 {
                tracing::debug!(step = iteration, loss = stats.loss, lr, "progress");
            }
            collapse.observe(iteration, &stats, iteration >= t.freeze_prototypes_niters);

            let interrupted = opts.stop.load(Ordering::SeqCst);
            let at_max = opts.max_steps.is_some_and(|m| iteration >= m);
            if interrupted || at_max {
                let (e, s) = if step_in_epoch == steps_per_epoch { (epoch + 1, 0) } else { (epoch, step_in_epoch) };
                let path = save(&mut state, iteration, e, s, last_loss)?;
                progress.finish_and_clear();
                return Ok(outcome(
                    iteration,
                    e,
                    path,
                    interrupted,
                    last_loss,
                    started,
                    first_iteration,
                    bs,
                    resumed_from,
                ));
            }
            wait_start = Instant::now();
        }
        drop(batches);
        epoch += 1;
        tracing::info!(
            "epoch {epoch}/{} done: step {iteration}, loss {}",
            t.epochs,
            last_loss.map_or("-".into(), |l| format!("{l:.4}"))
        );
        if epoch % t.checkpoint_every_epochs == 0 || epoch == t.epochs {
            checkpoint_path = Some(save(&mut state, iteration, epoch, 0, last_loss)?);
        }
    }
    progress.finish_and_clear();
    let path = match checkpoint_path {
        Some(p) => p,
        None => save(&mut state, iteration, epoch, 0, last_loss)?,
    };
    Ok(outcome(iteration, epoch, path, false, last_loss, started, first_iteration, t.batch_size, resumed_from))
}

#[allow(clippy::too_many_arguments)]
fn outcome(
    steps: usize,
    epochs_completed: usize,
    checkpoint: PathBuf,
    interrupted: bool,
    last_loss: Option<f64>,
    started: Instant,
    first: usize,
    batch: usize,
    resumed_from: Option<usize>,
) -> TrainOutcome {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    TrainOutcome {
        steps,
        epochs_completed,
        checkpoint,
        interrupted,
        last_loss,
        images_per_s: ((steps - first) * batch) as f64 / secs,
        resumed_from,
    }
}

fn progress_bar(show: bool, total: u64, position: u64) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps (eta {eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

/// Warns (at most once per epoch) when the loss stays within 2% of ln(K) and the codes of a batch use
/// fewer than 10% of the prototypes on average: the signature of a collapse.
struct CollapseWatch {
    ln_k: f64,
    k: usize,
    window: usize,
    losses: Vec<f64>,
    used: Vec<usize>,
    last_warning: Option<usize>,
}

impl CollapseWatch {
    fn new(k: usize, steps_per_epoch: usize) -> CollapseWatch {
        CollapseWatch {
            ln_k: (k as f64).ln(),
            k,
            window: steps_per_epoch.clamp(10, 200),
            losses: Vec::new(),
            used: Vec::new(),
            last_warning: None,
        }
    }

    fn observe(&mut self, iteration: usize, s: &StepStats, active: bool) {
        if !active {
            return;
        }
        self.losses.push(s.loss);
        self.used.push(s.clusters_used);
        if self.losses.len() > self.window {
            self.losses.remove(0);
            self.used.remove(0);
        }
        if self.losses.len() < self.window || self.last_warning.is_some_and(|w| iteration < w + self.window) {
            return;
        }
        let mean_loss = self.losses.iter().sum::<f64>() / self.losses.len() as f64;
        let mean_used = self.used.iter().sum::<usize>() as f64 / self.used.len() as f64;
        if (mean_loss - self.ln_k).abs() < 0.02 * self.ln_k && mean_used < 0.1 * self.k as f64 {
            tracing::warn!(
                "possible collapse: loss {mean_loss:.3} stays at ln(K) = {:.3} and batches use {mean_used:.1} of {} prototypes; \
                 try freezing the prototypes longer (train.freeze_prototypes_niters), a lower train.epsilon, or a smaller/later queue",
                self.ln_k,
                self.k
            );
            self.last_warning = Some(iteration);
        }
    }
}
