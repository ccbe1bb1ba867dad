//! The training run: epochs of [`swav_step`](crate::step::swav_step) over the multi-crop loader, with
//! checkpoints, resume, metrics, progress and the guards a long run needs.
//!
//! - The run directory holds `config.toml` (the resolved configuration), `metrics.jsonl` and
//!   `checkpoints/`, and is locked while a process trains in it. Starting again in the same directory
//!   resumes from the newest checkpoint; the result is bit-identical to a run that never stopped (the
//!   loader's randomness depends only on (seed, epoch, image), the ops are deterministic, and momentum,
//!   queue and BN statistics are saved).
//! - Before anything is allocated, the run's memory is estimated from its configuration and a run
//!   that cannot fit in the machine's available memory (or `max_memory`) is refused with the estimate.
//! - A checkpoint is written every `checkpoint_every_epochs`, at the end, at `max_steps`, and when the
//!   `stop` flag is raised (Ctrl-C, SIGTERM); the newest `keep_checkpoints` are kept. Every
//!   `checkpoint_freq` epochs the model file is also archived (`checkpoints/archive/ckp-E`), never pruned.
//! - A non-finite loss stops the run with an error before anything is saved, so the last good
//!   checkpoint stays the newest one. A loss stuck near ln(K) with few prototypes in use raises a
//!   collapse warning with the usual remedies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use swav_data::{Batch, Dataset, Layout, LoaderConfig, MultiCropLoader};
use swav_model::pretrained::{init_from_file, InitScope};
use swav_model::{Preprocessing, SwavModel};
use swav_tensor::collective::SingleProcess;
use swav_tensor::matmul::MulPrecision;
use swav_tensor::{Collective, DType, Device, Tensor};

use crate::checkpoint::{self, ModelMeta, Sidecar, SIDECAR_FORMAT};
use crate::collapse::CollapseWatch;
use crate::config::{Config, Precision};
use crate::distributed::{self as dist, Heartbeat};
use crate::lars::Lars;
use crate::memory;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::queue::Queue;
use crate::schedule::LrSchedule;
use crate::step::{start_step, PendingStats, SwavState};
use crate::TrainError;

/// How to run a training (the configuration says what to train).
pub struct TrainOptions {
    /// The run folder (created if needed; an existing run resumes).
    pub run_dir: PathBuf,
    /// The dataset folder written by `preprocess`.
    pub data_dir: PathBuf,
    /// Stop (with a checkpoint) once this many iterations are done in total.
    pub max_steps: Option<usize>,
    /// Raised by a signal handler: save and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Refuse a run whose estimated memory exceeds this many bytes (default: the memory the system
    /// has available).
    pub max_memory: Option<u64>,
    /// Where the model trains (the loader always runs on the host).
    pub device: Device,
    /// The ranks of a data-parallel run (see [`crate::distributed`]); one process by default.
    pub collective: Arc<dyn Collective>,
}

impl TrainOptions {
    /// Options for training on `data_dir` in `run_dir`, with the defaults (no step limit, no stop
    /// flag raised, no progress bar, memory limited by the machine).
    pub fn new(run_dir: &Path, data_dir: &Path) -> TrainOptions {
        TrainOptions {
            run_dir: run_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            max_steps: None,
            stop: Arc::new(AtomicBool::new(false)),
            progress: false,
            max_memory: None,
            device: Device::Cpu,
            collective: Arc::new(SingleProcess),
        }
    }
}

/// What a call of [`train`] did.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// Iterations done in total (over every call).
    pub steps: usize,
    /// Epochs completed in total.
    pub epochs_completed: usize,
    /// The newest model file.
    pub checkpoint: PathBuf,
    /// Whether the stop flag ended the call.
    pub interrupted: bool,
    /// The loss of the last step.
    pub last_loss: Option<f64>,
    /// Images per second over the steps run by this call.
    pub images_per_s: f64,
    /// The step this call continued from, when it continued an earlier run.
    pub resumed_from: Option<usize>,
}

/// Writes `config.toml` for a new run, or checks that a resumed run asks for the same configuration
/// (only `train.epochs` may change, to extend a run).
fn prepare_run_dir(run_dir: &Path, config: &Config) -> Result<(), TrainError> {
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
    let m = dataset.manifest();
    let (mean, std) = swav_data::augment::dataset_normalisation(&m.pixel_mean, &m.pixel_std, config.model.in_channels);
    (a.mean.clone().unwrap_or(mean), a.std.clone().unwrap_or(std))
}

/// The network a new run starts from: a random initialisation, or the weights of `train.init`.
fn initial_model(config: &Config) -> Result<SwavModel, TrainError> {
    let t = &config.train;
    let mut model = SwavModel::new(config.model.clone(), t.seed)?;
    if let Some(path) = &t.init {
        let scope = if t.init_backbone_only { InitScope::Backbone } else { InitScope::Whole };
        let report = init_from_file(&mut model, Path::new(path), scope)
            .map_err(|e| TrainError::Config(format!("train.init = {path}: {e}")))?;
        tracing::info!(
            "starting from {path}: {} tensors loaded, {} kept from the random initialisation",
            report.loaded.len(),
            report.kept.len()
        );
    }
    Ok(model)
}

/// The storage of activations for `train.precision` on `device`: bf16 on CUDA by default, fp32 on
/// the CPU (where `bf16` rounds the convolutions' factors instead: [`cpu_products`]).
pub fn activation_dtype(precision: Option<Precision>, device: Device) -> Result<DType, TrainError> {
    match (precision, device.is_cuda()) {
        (Some(Precision::Bf16), false) => cpu_products(precision, device).map(|_| DType::F32),
        (Some(Precision::Fp32), _) | (None, false) => Ok(DType::F32),
        (Some(Precision::Bf16), true) | (None, true) => Ok(DType::Bf16),
    }
}

/// What the CPU's convolutions multiply for `train.precision`: f32 by default; with `bf16`, factors
/// rounded to bf16 with fp32 accumulation (PyTorch's CPU autocast for convolutions), offered only where
/// the CPU multiplies bf16 in hardware (AVX512_BF16), since elsewhere it would be slower than fp32.
/// Activations, batch norms, the head and the optimiser stay fp32.
pub fn cpu_products(precision: Option<Precision>, device: Device) -> Result<MulPrecision, TrainError> {
    if device.is_cuda() || precision != Some(Precision::Bf16) {
        return Ok(MulPrecision::F32);
    }
    if !swav_tensor::matmul::bf16_hardware() {
        return Err(TrainError::Config(format!(
            "train.precision = \"bf16\" on the CPU needs bf16 products in hardware (AVX512_BF16 at the AVX-512 \
             level): this CPU has {}, kernels at {}; use fp32 here",
            swav_core::isa::bf16_support(),
            swav_core::isa::active()
        )));
    }
    Ok(MulPrecision::Bf16)
}

/// Moves the model, the momentum buffers and the queue to `device`.
fn move_state(state: &mut SwavState, device: Device) -> Result<(), TrainError> {
    if state.model.device() == device {
        return Ok(());
    }
    state.model.to_device(device)?;
    for buf in state.optimizer.buffers.values_mut() {
        *buf = buf.to_device(device)?;
    }
    if let Some(q) = &mut state.queue {
        for rows in &mut q.rows {
            *rows = rows.to_device(device)?;
        }
    }
    Ok(())
}

/// Refuses, with the estimate, a run that cannot fit in memory.
/// On a CUDA device only the loader's batches stay in host memory; the device's own memory is the
/// device's business (the allocator reports what it runs out of).
fn check_memory(config: &Config, max_memory: Option<u64>, device: Device) -> Result<(), TrainError> {
    let (limit, what) = match (max_memory, swav_core::sys::available_memory()) {
        (Some(m), _) => (m, "the limit given"),
        (None, Some(m)) => (m, "the memory available on this machine"),
        (None, None) => return Ok(()),
    };
    let mut e = memory::estimate(config);
    if device.is_cuda() {
        (e.parameters, e.activations) = (0, 0);
    }
    if e.total() > limit as u128 {
        let h = swav_core::sys::human_bytes;
        return Err(TrainError::Config(format!(
            "this run needs about {} (parameters {}, activations {}, loader {}) but {what} is {}: lower train.batch_size, the crop sizes or counts, model.prototypes or the width",
            h(e.total()),
            h(e.parameters),
            h(e.activations),
            h(e.loader),
            h(limit as u128)
        )));
    }
    Ok(())
}

/// Checks what the options ask for before any work starts.
fn check_options(config: &Config, opts: &TrainOptions) -> Result<usize, TrainError> {
    if opts.max_steps == Some(0) {
        return Err(TrainError::Config("--max-steps 0 would do nothing: give at least 1".into()));
    }
    let requested =
        if config.train.workers > 0 { config.train.workers } else { swav_core::sys::cores().saturating_sub(1).max(1) };
    let (workers, note) = swav_core::sys::cap_threads(requested, "train.workers");
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(workers)
}

/// What a distributed run needs besides one process's: refused combinations first.
fn check_distributed(config: &Config, opts: &TrainOptions) -> Result<(), TrainError> {
    let (n, t) = (opts.collective.world_size(), &config.train);
    if n == 1 {
        return Ok(());
    }
    if t.conv == swav_tensor::ops::winograd::ConvAlgorithm::Measured {
        return Err(TrainError::Config(
            "train.conv = \"measured\" with several ranks: each rank would measure its own plan, and the ranks would \
             round differently; choose one algorithm (e.g. train.conv = \"auto\")"
                .into(),
        ));
    }
    if t.queue_length > 0 && !t.queue_length.is_multiple_of(t.batch_size * n) {
        return Err(TrainError::Config(format!(
            "train.queue_length = {} is not a multiple of train.batch_size x ranks = {} x {n}: each rank keeps \
             queue_length / ranks rows, a whole number of batches (use {})",
            t.queue_length,
            t.batch_size,
            t.queue_length / (t.batch_size * n) * t.batch_size * n
        )));
    }
    Ok(())
}

/// Trains (or resumes) the run of `config` in `opts.run_dir`. With several ranks
/// (`opts.collective`), every rank calls it with the same configuration and data.
pub fn train(config: &Config, opts: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    check_distributed(config, opts)?;
    let world = opts.collective.as_ref();
    let rank = world.rank();
    let workers = check_options(config, opts)?;
    check_memory(config, opts.max_memory, opts.device)?;
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|source| TrainError::Io { path: opts.run_dir.display().to_string(), source })?;
    // One job per run folder: a second one stops here, naming the first. Rank 0 holds the lock and
    // prepares the folder while the other ranks wait.
    let _lock = if rank == 0 {
        let lock = swav_core::lock::FolderLock::acquire(&opts.run_dir)?;
        for path in checkpoint::clean_incomplete(&opts.run_dir)? {
            tracing::warn!("removed {}, left by an interrupted save", path.display());
        }
        prepare_run_dir(&opts.run_dir, config)?;
        Some(lock)
    } else {
        None
    };
    world.barrier().map_err(dist::err)?;
    let dataset = Dataset::open(&opts.data_dir)?;
    let manifest = serde_json::to_vec(dataset.manifest()).expect("a manifest serialises");
    dist::check_same_setup(world, &dist::fingerprint(&config.to_toml(), &manifest))?;
    match (dataset.channels(), config.model.in_channels) {
        (3, 1) => tracing::warn!(
            "the data holds RGB images and the model takes 1 channel (model.in_channels = 1): they are converted to \
             luma; set model.in_channels = 3 to train on colour"
        ),
        (1, 3) => {
            tracing::info!("the data is grayscale and the model takes 3 channels: each image is repeated in all three")
        }
        _ => {}
    }
    let t = &config.train;
    let loader_cfg = LoaderConfig {
        batch_size: t.batch_size,
        seed: t.seed,
        rank,
        world_size: world.world_size(),
        workers,
        prefetch: t.prefetch,
        layout: Layout::Nhwc,
        drop_last: true,
        shuffle: true,
        channels: Some(config.model.in_channels as u8),
        ..LoaderConfig::default()
    };
    let mut loader = MultiCropLoader::new(&dataset, &config.crops, &loader_cfg)?;
    let mut run = Run::start(config, opts, &dataset, loader.steps_per_epoch())?;
    while run.epoch < t.epochs {
        if let Some(outcome) = run.epoch(&mut loader)? {
            return Ok(outcome);
        }
    }
    run.finish()
}

/// One training run in progress: the state a step updates and everything around it.
struct Run<'a> {
    config: &'a Config,
    /// This process's rank and the run's ranks.
    world: Arc<dyn Collective>,
    heartbeat: Heartbeat,
    /// The storage of the crops on the device (bf16 under mixed precision).
    activations: DType,
    opts: &'a TrainOptions,
    state: SwavState,
    schedule: LrSchedule,
    steps_per_epoch: usize,
    model_meta: ModelMeta,
    /// Rank 0's.
    metrics: Option<MetricsLog>,
    collapse: CollapseWatch,
    progress: indicatif::ProgressBar,
    /// Iterations done, the epoch in progress and the batches of it already done.
    iteration: usize,
    epoch: usize,
    skip: usize,
    last_loss: Option<f64>,
    /// On a CUDA device, the step queued last, whose report is read once the next one is queued (so
    /// that the host prepares step i + 1 while the device runs step i).
    in_flight: Option<Launched>,
    /// When the last report was read (the time between two is a step's time).
    last_done: Option<Instant>,
    checkpoint: Option<PathBuf>,
    started: Instant,
    first_iteration: usize,
    resumed_from: Option<usize>,
}

/// A step queued, with what its metrics need.
struct Launched {
    stats: PendingStats,
    iteration: usize,
    epoch: usize,
    lr: f64,
    images: usize,
    waited: f64,
    started: Instant,
}

impl<'a> Run<'a> {
    /// A fresh state, or the newest checkpoint's.
    fn start(
        config: &'a Config,
        opts: &'a TrainOptions,
        dataset: &Dataset,
        steps_per_epoch: usize,
    ) -> Result<Run<'a>, TrainError> {
        let t = &config.train;
        let schedule =
            LrSchedule::new(t.base_lr, t.final_lr, t.start_warmup, t.warmup_epochs, t.epochs, steps_per_epoch);
        let (mean, std) = normalisation(config, dataset);
        let model_meta = ModelMeta {
            preprocessing: Preprocessing::recorded(&config.model, mean, std, config.crops.groups[0].size).map_err(
                |e| {
                    TrainError::Config(format!(
                        "crops.augment.mean / std for model.in_channels = {}: {e}",
                        config.model.in_channels
                    ))
                },
            )?,
            extra: BTreeMap::from([("train_data".to_string(), opts.data_dir.display().to_string())]),
        };
        let optimizer = Lars::new(t.momentum, t.weight_decay, t.trust_coefficient, t.lars);
        let world = opts.collective.clone();
        let (rank, n) = (world.rank(), world.world_size());
        let newest = checkpoint::latest(&opts.run_dir)?;
        let (mut state, iteration, epoch, skip) = match &newest {
            Some(found) => {
                let s = &found.sidecar;
                if s.world_size != n {
                    return Err(TrainError::Checkpoint(format!(
                        "the checkpoint was made by {} rank(s), this run has {n}: resume with the same number of ranks \
                         (the per-rank queues and the data each rank reads depend on it)",
                        s.world_size
                    )));
                }
                if s.steps_per_epoch != steps_per_epoch {
                    return Err(TrainError::Checkpoint(format!(
                        "the checkpoint was made with {} steps per epoch, the data now gives {steps_per_epoch}: is --data the same dataset?",
                        s.steps_per_epoch
                    )));
                }
                tracing::info!(
                    "resuming from step {} (epoch {}, batch {} of {steps_per_epoch})",
                    s.step,
                    s.epoch,
                    s.step_in_epoch
                );
                (checkpoint::restore(found, config, optimizer)?, s.step, s.epoch, s.step_in_epoch)
            }
            None => (SwavState::new(initial_model(config)?, optimizer), 0, 0, 0),
        };
        crate::conv_plan::apply(&opts.run_dir, config, &mut state.model, newest.is_some(), opts.device)?;
        if n > 1 {
            // The checkpoint's queue holds every rank's rows, rank by rank: keep this rank's.
            if let Some(q) = &mut state.queue {
                let len = t.queue_length / n;
                q.rows = q.rows.iter().map(|r| r.narrow(rank * len, len)).collect::<Result<Vec<_>, _>>()?;
                *q = Queue::from_rows(std::mem::take(&mut q.rows));
            }
            // Every rank starts from rank 0's weights, whatever each initialised or read.
            dist::broadcast_from_rank0(&mut state.model, world.as_ref(), true)?;
            let group = dist::sync_bn_group(&world, config.model.sync_bn, config.model.sync_bn_group)?;
            state.broadcast_buffers = group.is_none();
            state.model.set_sync_batchnorm(group);
            state.collective = world.clone();
        }
        let activations = activation_dtype(config.train.precision, opts.device)?;
        move_state(&mut state, opts.device)?;
        // Under mixed precision the head and the prototypes multiply bf16 copies too (autocast).
        state.model.set_linear_compute(activations);
        tracing::info!(
            "run {}: {} epochs of {steps_per_epoch} steps (batch {} x {n} rank(s)), from step {iteration}",
            opts.run_dir.display(),
            t.epochs,
            t.batch_size
        );
        let progress = progress_bar(opts.progress && rank == 0, schedule.total_steps() as u64, iteration as u64);
        let metrics = if rank == 0 { Some(MetricsLog::open(&opts.run_dir, iteration as u64)?) } else { None };
        Ok(Run {
            config,
            heartbeat: Heartbeat::new(&opts.run_dir, rank, n)?,
            world,
            activations,
            opts,
            state,
            schedule,
            steps_per_epoch,
            model_meta,
            metrics,
            collapse: CollapseWatch::new(config.model.prototypes[0], steps_per_epoch),
            progress,
            iteration,
            epoch,
            skip,
            last_loss: None,
            in_flight: None,
            last_done: None,
            checkpoint: newest.map(|f| f.model_path()),
            started: Instant::now(),
            first_iteration: iteration,
            resumed_from: (iteration > 0).then_some(iteration),
        })
    }

    /// Runs the rest of the current epoch; returns the outcome when the run stops inside it (stop flag
    /// or `max_steps`).
    fn epoch(&mut self, loader: &mut MultiCropLoader) -> Result<Option<TrainOutcome>, TrainError> {
        let t = &self.config.train;
        if t.queue_length > 0 && self.epoch >= t.epoch_queue_starts && self.state.queue.is_none() {
            let device = self.state.model.device();
            let rows = t.queue_length / self.world.world_size();
            self.state.queue = Some(Queue::new(t.crops_for_assign.len(), rows, self.config.model.feat_dim, device));
        }
        let mut batches = loader.epoch(self.epoch as u64);
        // Resuming inside an epoch: the batches before the checkpoint are prepared and dropped (their
        // content depends only on (seed, epoch, image), so the rest of the epoch is unchanged).
        for _ in 0..self.skip {
            batches.next().transpose()?;
        }
        let mut step_in_epoch = std::mem::take(&mut self.skip);
        let mut wait_start = Instant::now();
        for batch in batches.by_ref() {
            let waited = wait_start.elapsed().as_secs_f64();
            self.step(batch?, waited)?;
            step_in_epoch += 1;
            let mut interrupted = self.opts.stop.load(Ordering::SeqCst);
            if self.world.world_size() > 1 {
                // A signal reaches one rank or several: the ranks stop together, at the same step.
                let mut flag = [interrupted as u8 as f32];
                self.world.all_reduce_max(&mut flag).map_err(dist::err)?;
                interrupted = flag[0] != 0.0;
            }
            if interrupted || self.opts.max_steps.is_some_and(|m| self.iteration >= m) {
                let (e, s) = if step_in_epoch == self.steps_per_epoch {
                    (self.epoch + 1, 0)
                } else {
                    (self.epoch, step_in_epoch)
                };
                let path = self.save(e, s)?;
                self.progress.finish_and_clear();
                return Ok(Some(self.outcome(e, path, interrupted)));
            }
            wait_start = Instant::now();
        }
        drop(batches);
        self.flush()?;
        self.epoch += 1;
        let loss = self.last_loss.map_or("-".into(), |l| format!("{l:.4}"));
        tracing::info!("epoch {}/{} done: step {}, loss {loss}", self.epoch, t.epochs, self.iteration);
        // Archives after epoch indices 0, freq, 2 freq, ... and the last, as main_swav.py's ckp-E files.
        let archive =
            t.checkpoint_freq > 0 && ((self.epoch - 1).is_multiple_of(t.checkpoint_freq) || self.epoch == t.epochs);
        if self.epoch.is_multiple_of(t.checkpoint_every_epochs) || self.epoch == t.epochs || archive {
            let path = self.save(self.epoch, 0)?;
            if archive && self.world.rank() == 0 {
                let archived = checkpoint::archive(&self.opts.run_dir, &path, self.epoch - 1)?;
                tracing::info!("archived {}", archived.display());
            }
            self.checkpoint = Some(path);
        }
        Ok(None)
    }

    /// One iteration on `batch`, its metrics and progress.
    fn step(&mut self, batch: Batch, waited: f64) -> Result<(), TrainError> {
        let step_start = Instant::now();
        let bs = batch.len();
        // On a device, the batch is copied on the copy stream (overlapping the step before) into the
        // upload pool, and cast to the activations' type by the step's work.
        let groups = match self.opts.device {
            Device::Cuda(i) => {
                let rt = swav_tensor::cuda::runtime::runtime(i)?;
                let _step_pool = rt.in_step();
                batch
                    .groups()
                    .map(|g| {
                        let t = Tensor::upload(&rt, &g.shape, g.data)?;
                        // fp32 activations use the uploaded block itself (a cast to f32 would copy it).
                        if t.dtype() == self.activations {
                            Ok(t)
                        } else {
                            t.to_dtype(self.activations)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Device::Cpu => {
                batch.groups().map(|g| Tensor::from_slice(&g.shape, g.data)).collect::<Result<Vec<_>, _>>()?
            }
        };
        drop(batch);
        let lr = self.schedule.lr(self.iteration);
        self.heartbeat.beat(self.iteration)?;
        let stats = start_step(&mut self.state, &self.config.train, groups, bs, self.iteration, lr)?;
        let launched = Launched {
            stats,
            iteration: self.iteration,
            epoch: self.epoch,
            lr,
            images: bs,
            waited,
            started: step_start,
        };
        self.iteration += 1;
        if self.opts.device.is_cuda() {
            if let Some(previous) = self.in_flight.replace(launched) {
                self.report(previous)?;
            }
            Ok(())
        } else {
            self.report(launched)
        }
    }

    /// Reads the report of the step still in flight, if any.
    fn flush(&mut self) -> Result<(), TrainError> {
        match self.in_flight.take() {
            Some(l) => self.report(l),
            None => Ok(()),
        }
    }

    /// A step's metrics and progress, once its report is read (a non-finite loss stops the run; on a
    /// device the step itself already updated nothing).
    fn report(&mut self, l: Launched) -> Result<(), TrainError> {
        let stats = l.stats.wait()?;
        if !stats.loss.is_finite() {
            self.progress.abandon();
            return Err(TrainError::NonFinite {
                step: l.iteration,
                loss: stats.loss,
                checkpoint: self.checkpoint.as_ref().map_or("none yet".into(), |p| p.display().to_string()),
            });
        }
        self.last_loss = Some(stats.loss);
        let now = Instant::now();
        // From the previous report (or, for the first, from when this step began waiting for data) to
        // this one: with one step in flight, the interval between reports is the step's time.
        let since = self.last_done.unwrap_or_else(|| l.started - std::time::Duration::from_secs_f64(l.waited));
        let step_time = (now - since).as_secs_f64().max(1e-9);
        self.last_done = Some(now);
        // Every rank's images: the global batch.
        let images_per_s = (l.images * self.world.world_size()) as f64 / step_time;
        let Some(metrics) = &mut self.metrics else { return Ok(()) };
        metrics.write(&StepMetrics {
            step: l.iteration as u64,
            epoch: Some(l.epoch as u64),
            loss: Some(stats.loss),
            lr: Some(l.lr),
            images_per_s: Some(images_per_s),
            data_wait: Some((l.waited / step_time).min(1.0)),
            cluster_entropy: Some(stats.cluster_entropy),
            clusters_used: Some(stats.clusters_used as u64),
            elapsed_s: Some(self.started.elapsed().as_secs_f64()),
        })?;
        self.progress.set_position(l.iteration as u64 + 1);
        self.progress
            .set_message(format!("epoch {} loss {:.4} lr {:.4} {images_per_s:.0} img/s", l.epoch, stats.loss, l.lr));
        let active = l.iteration + 1 >= self.config.train.freeze_prototypes_niters;
        self.collapse.observe(l.iteration + 1, &stats, active);
        Ok(())
    }

    /// Saves a checkpoint positioned at batch `step_in_epoch` of `epoch`.
    fn save(&mut self, epoch: usize, step_in_epoch: usize) -> Result<PathBuf, TrainError> {
        // The last step's report first: a step with a non-finite loss stops the run before its state
        // is saved.
        self.flush()?;
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.into(),
            step: self.iteration,
            epoch,
            step_in_epoch,
            steps_per_epoch: self.steps_per_epoch,
            loss: self.last_loss,
            model_sha256: None,
            train_sha256: None,
            world_size: self.world.world_size(),
            config: self.config.clone(),
        };
        if self.world.world_size() == 1 {
            return checkpoint::save(
                &self.opts.run_dir,
                &mut self.state,
                &sidecar,
                &self.model_meta,
                self.config.train.keep_checkpoints,
            );
        }
        // Rank 0 saves every rank's queue with its own state; the others wait until the files are
        // complete, so that a rank that dies later never leaves a checkpoint half-written.
        let own = self.state.queue.clone();
        if let Some(q) = &own {
            let full = gather_queue(q, self.world.as_ref())?;
            self.state.queue = Some(full);
        }
        let saved = if self.world.rank() == 0 {
            checkpoint::save(
                &self.opts.run_dir,
                &mut self.state,
                &sidecar,
                &self.model_meta,
                self.config.train.keep_checkpoints,
            )
            .map(Some)
        } else {
            Ok(None)
        };
        self.state.queue = own;
        let mut failed = [saved.is_err() as u8 as f32];
        self.world.all_reduce_max(&mut failed).map_err(dist::err)?;
        match saved? {
            Some(path) => Ok(path),
            None if failed[0] != 0.0 => Err(TrainError::Checkpoint("rank 0 could not save the checkpoint".into())),
            None => Ok(checkpoint::latest(&self.opts.run_dir)?
                .map(|f| f.model_path())
                .ok_or_else(|| TrainError::Checkpoint("rank 0 saved no checkpoint".into()))?),
        }
    }

    /// The end of the last epoch.
    fn finish(mut self) -> Result<TrainOutcome, TrainError> {
        self.progress.finish_and_clear();
        let path = match self.checkpoint.clone() {
            Some(p) => p,
            None => self.save(self.epoch, 0)?,
        };
        Ok(self.outcome(self.epoch, path, false))
    }

    fn outcome(&self, epochs_completed: usize, checkpoint: PathBuf, interrupted: bool) -> TrainOutcome {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let images = (self.iteration - self.first_iteration) * self.config.train.batch_size * self.world.world_size();
        TrainOutcome {
            steps: self.iteration,
            epochs_completed,
            checkpoint,
            interrupted,
            last_loss: self.last_loss,
            images_per_s: images as f64 / secs,
            resumed_from: self.resumed_from,
        }
    }
}

/// Every rank's queue rows, rank by rank (`[ranks x rows, dim]` per assigned crop): each rank writes its
/// rows into a zeroed buffer at its offset and the buffers are summed, which adds only zeros.
fn gather_queue(q: &Queue, world: &dyn Collective) -> Result<Queue, TrainError> {
    let (rank, n) = (world.rank(), world.world_size());
    let mut rows = Vec::with_capacity(q.rows.len());
    for t in &q.rows {
        let (len, dim) = (t.dim(0), t.dim(1));
        let mut all = vec![0.0f32; n * len * dim];
        all[rank * len * dim..(rank + 1) * len * dim].copy_from_slice(&t.to_vec());
        world.all_reduce_sum(&mut all).map_err(dist::err)?;
        rows.push(Tensor::from_vec(&[n * len, dim], all)?.to_device(t.device())?);
    }
    Ok(Queue::from_rows(rows))
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
