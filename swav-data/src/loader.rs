//! The batch loaders: [`MultiCropLoader`] (training: shuffled, sharded by rank, multi-crop) and
//! [`EvalLoader`] (evaluation: every image once, in index order, one centre crop).
//!
//! How a batch is made: the consumer thread submits one job per image of the next `prefetch` batches to
//! a channel; worker threads decode the image and write its crops straight into the batch's buffers
//! (disjoint regions, so no copy and no lock); the last worker to finish a batch hands it back, and the
//! iterator yields batches strictly in order. Every random choice comes from the sample's own generator
//! (seed, epoch, index, crop), so the batches are the same whatever the number of workers. Buffers return
//! to a pool when a [`Batch`] is dropped and are reused. Dropping an [`Epoch`] abandons its remaining work
//! (workers skip it); dropping the loader stops and joins its threads after their current image.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use swav_core::isa::Isa;

use crate::augment::{EvalTransform, GroupShape, Layout, MultiCropTransform, Scratch};
use crate::codec::RecordDecoder;
use crate::config::{EvalConfig, MultiCropConfig};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::image::Image;
use crate::rng::{SplitMix64, SHUFFLE_STREAM};

/// Batch settings shared by both loaders (serde: every field optional, see `Default`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Images per batch on this rank.
    pub batch_size: usize,
    /// Seed of the shuffle and of every augmentation.
    pub seed: u64,
    /// This process's rank and the number of ranks (DistributedSampler semantics). Ignored by `EvalLoader`.
    pub rank: usize,
    /// The number of ranks the samples are split between (at least 1, more than `rank`). Ignored by
    /// `EvalLoader`.
    pub world_size: usize,
    /// Worker threads; 0 runs everything in the thread that iterates (slow, for debugging).
    pub workers: usize,
    /// Batches prepared ahead of the one being consumed (at least 1).
    pub prefetch: usize,
    /// Layout of the crop buffers.
    pub layout: Layout,
    /// True (training): each rank gets `floor(len / world_size)` samples and the last incomplete batch is
    /// dropped. False: the sample list is padded by repeating its start to a multiple of `world_size`
    /// (DistributedSampler's default) and the last batch may be smaller. Ignored by `EvalLoader`.
    pub drop_last: bool,
    /// Shuffle each epoch (seeded by (seed, epoch)). Ignored by `EvalLoader`.
    pub shuffle: bool,
    /// Output channels (1 or 3); `None` keeps the dataset's (`Dataset::channels`).
    pub channels: Option<u8>,
    /// The most capable instruction set the workers' kernels may use (they use the best the CPU has
    /// up to this). Results are the same bits at every level; this exists to measure and to test.
    #[serde(skip, default = "best_isa")]
    pub isa: Isa,
}

fn best_isa() -> Isa {
    Isa::Avx512
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            seed: 0,
            rank: 0,
            world_size: 1,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            prefetch: 2,
            layout: Layout::Nhwc,
            drop_last: true,
            shuffle: true,
            channels: None,
            isa: best_isa(),
        }
    }
}

/// The sample order of one epoch on one rank, with `torch.utils.data.DistributedSampler` semantics:
/// shuffle all indices (Fisher-Yates from `SplitMix64::from_key(&[seed, epoch, SHUFFLE_STREAM])`), then
/// drop the tail (`drop_last`) or pad by repeating the start so that the length is a multiple of
/// `world_size`, then take every `world_size`-th index starting at `rank`.
pub fn epoch_order(
    len: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
    rank: usize,
    world_size: usize,
    drop_last: bool,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        SplitMix64::from_key(&[seed, epoch, SHUFFLE_STREAM]).shuffle(&mut order);
    }
    if world_size == 0 || len == 0 {
        return Vec::new();
    }
    if drop_last {
        order.truncate(len / world_size * world_size);
    } else {
        let total = len.div_ceil(world_size) * world_size;
        let mut i = 0;
        while order.len() < total {
            order.push(order[i]);
            i += 1;
        }
    }
    order.into_iter().skip(rank).step_by(world_size).collect()
}

// ---------------------------------------------------------------------------------------------------
// Batches and their buffers.

/// Free buffer sets (one `Vec<f32>` per crop group), reused across batches.
struct BufferPool {
    free: Mutex<Vec<Vec<Vec<f32>>>>,
    keep: usize,
}

impl BufferPool {
    fn take(&self, sizes: &[usize]) -> Vec<Vec<f32>> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match reused {
            Some(b) if b.len() == sizes.len() && b.iter().zip(sizes).all(|(v, &n)| v.len() == n) => b,
            _ => sizes.iter().map(|&n| vec![0.0f32; n]).collect(),
        }
    }

    fn give(&self, bufs: Vec<Vec<f32>>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(bufs);
        }
    }
}

/// One group of crops of a batch: `count * batch` crops of `height x width x channels` floats,
/// crop-major (all images' crop 0, then all images' crop 1, ...), each crop in the loader's layout.
#[derive(Clone, Copy, Debug)]
pub struct CropTensor<'a> {
    /// The normalised values, `shape.iter().product()` of them, crop-major.
    pub data: &'a [f32],
    /// `[count * batch, H, W, C]` (NHWC) or `[count * batch, C, H, W]` (NCHW).
    pub shape: [usize; 4],
    /// Whether `shape` and each crop are NHWC or NCHW (the loader's [`LoaderConfig::layout`]).
    pub layout: Layout,
    /// Crops per image in this group.
    pub count: usize,
    /// Images in the batch.
    pub batch: usize,
}

impl<'a> CropTensor<'a> {
    fn crop_len(&self) -> usize {
        self.shape[1] * self.shape[2] * self.shape[3]
    }

    /// Crop `k` of every image: `[batch, ...]`, contiguous.
    pub fn crop(&self, k: usize) -> &'a [f32] {
        let n = self.batch * self.crop_len();
        &self.data[k * n..(k + 1) * n]
    }

    /// Crop `k` of image `i` (position in the batch).
    pub fn image(&self, k: usize, i: usize) -> &'a [f32] {
        let n = self.crop_len();
        &self.data[(k * self.batch + i) * n..][..n]
    }
}

/// A batch: the dataset indices and labels of its images and, per crop group, one f32 buffer.
/// Its buffers go back to the loader's pool when it is dropped.
pub struct Batch {
    epoch: u64,
    step: usize,
    indices: Vec<usize>,
    labels: Vec<Option<u32>>,
    shapes: Arc<[GroupShape]>,
    layout: Layout,
    buffers: Vec<Vec<f32>>,
    pool: Arc<BufferPool>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("epoch", &self.epoch).field("step", &self.step).field("len", &self.len()).finish()
    }
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch holds no image (never the case for a batch a loader yields).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The epoch this batch belongs to (0 for the evaluation loader).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Position of this batch in its epoch (0-based).
    pub fn step(&self) -> usize {
        self.step
    }

    /// Dataset indices of the images, in batch order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// Labels of the images (`None` for unlabelled datasets).
    pub fn labels(&self) -> &[Option<u32>] {
        &self.labels
    }

    /// Number of crop groups (1 for the evaluation loader).
    pub fn num_groups(&self) -> usize {
        self.shapes.len()
    }

    /// Crop group `g`.
    pub fn group(&self, g: usize) -> CropTensor<'_> {
        let s = self.shapes[g];
        let b = self.len();
        let shape = match self.layout {
            Layout::Nhwc => [s.count * b, s.height, s.width, s.channels],
            Layout::Nchw => [s.count * b, s.channels, s.height, s.width],
        };
        CropTensor {
            data: &self.buffers[g][..s.count * b * s.crop_len()],
            shape,
            layout: self.layout,
            count: s.count,
            batch: b,
        }
    }

    /// All crop groups, in configuration order.
    pub fn groups(&self) -> impl Iterator<Item = CropTensor<'_>> {
        (0..self.num_groups()).map(move |g| self.group(g))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffers));
    }
}

// ---------------------------------------------------------------------------------------------------
// The engine: worker threads, jobs, ordering.

enum Transform {
    MultiCrop(MultiCropTransform),
    Eval(EvalTransform),
}

struct Shared {
    dataset: Dataset,
    transform: Transform,
    seed: u64,
    /// Work of older generations (abandoned epochs) is skipped.
    generation: AtomicU64,
    stop: AtomicBool,
}

/// A batch being filled. Workers write through `ptrs` into `buffers`' allocations, each job into its own
/// disjoint regions; the consumer takes `buffers` once `remaining` reaches zero.
struct BatchWork {
    seq: usize,
    generation: u64,
    epoch: u64,
    indices: Vec<usize>,
    ptrs: Vec<*mut f32>,
    buffers: Mutex<Option<Vec<Vec<f32>>>>,
    remaining: AtomicUsize,
    error: Mutex<Option<DataError>>,
}

// SAFETY: the raw pointers point into the heap allocations of `buffers`, which are neither moved nor
// resized nor read while jobs are outstanding. Each job writes only the regions of its own image
// (`(k * len + pos) * crop_len ..` for each crop `k`), which are disjoint between jobs, and the buffers
// are taken by the consumer only after every job has decremented `remaining` (AcqRel), so no write races
// with another write or with a read.
unsafe impl Send for BatchWork {}
unsafe impl Sync for BatchWork {}

impl BatchWork {
    fn fail(&self, e: DataError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

struct Job {
    work: Arc<BatchWork>,
    pos: usize,
}

/// Per-thread state of a worker.
#[derive(Default)]
struct WorkerState {
    decoder: RecordDecoder,
    image: Image,
    scratch: Scratch,
}

fn run_job(shared: &Shared, shapes: &[GroupShape], job: &Job, st: &mut WorkerState) -> Result<()> {
    let w = &job.work;
    let index = w.indices[job.pos];
    shared.dataset.read_into(index, &mut st.decoder, &mut st.image)?;
    let len = w.indices.len();
    let view = st.image.view();
    let mut crop_id = 0;
    for (g, shape) in shapes.iter().enumerate() {
        let n = shape.crop_len();
        for k in 0..shape.count {
            // SAFETY: see `BatchWork`; the region lies inside the buffer, which holds at least
            // `count * len * n` floats for this group.
            let out = unsafe { std::slice::from_raw_parts_mut(w.ptrs[g].add((k * len + job.pos) * n), n) };
            match &shared.transform {
                Transform::MultiCrop(t) => {
                    t.crop_into(view, shared.seed, w.epoch, index as u64, crop_id, &mut st.scratch, out)
                }
                Transform::Eval(t) => t.apply_into(view, &mut st.scratch, out),
            }
            crop_id += 1;
        }
    }
    Ok(())
}

/// Runs one job (unless its epoch was abandoned) and hands the batch back if it was the last.
fn process(shared: &Shared, shapes: &[GroupShape], job: Job, st: &mut WorkerState, done: &Sender<Arc<BatchWork>>) {
    if job.work.generation == shared.generation.load(Ordering::Acquire) {
        match catch_unwind(AssertUnwindSafe(|| run_job(shared, shapes, &job, st))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => job.work.fail(e),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                job.work.fail(DataError::WorkerPanicked { index: job.work.indices[job.pos], message });
                *st = WorkerState::default();
            }
        }
    }
    if job.work.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        let _ = done.send(job.work);
    }
}

struct Engine {
    shared: Arc<Shared>,
    shapes: Arc<[GroupShape]>,
    layout: Layout,
    prefetch: usize,
    batch_size: usize,
    job_tx: Option<Sender<Job>>,
    job_rx: Receiver<Job>,
    done_tx: Sender<Arc<BatchWork>>,
    done_rx: Receiver<Arc<BatchWork>>,
    threads: Vec<JoinHandle<()>>,
    pool: Arc<BufferPool>,
    /// State used when `workers == 0`.
    inline: WorkerState,
}

impl Engine {
    fn new(shared: Shared, shapes: Vec<GroupShape>, cfg: &LoaderConfig) -> Result<Engine> {
        let (layout, workers, prefetch, batch_size, isa) =
            (cfg.layout, cfg.workers, cfg.prefetch, cfg.batch_size, cfg.isa);
        let shared = Arc::new(shared);
        let shapes: Arc<[GroupShape]> = shapes.into();
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Arc<BatchWork>>();
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let (shared, shapes, rx, done) = (shared.clone(), shapes.clone(), job_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("swav-data-{i}"))
                .spawn(move || {
                    swav_core::isa::set_thread_ceiling(isa);
                    let mut st = WorkerState::default();
                    while let Ok(job) = rx.recv() {
                        if shared.stop.load(Ordering::Acquire) {
                            break;
                        }
                        process(&shared, &shapes, job, &mut st, &done);
                    }
                })
                .map_err(|e| DataError::Config(format!("cannot start loader worker thread {i}: {e}")))?;
            threads.push(handle);
        }
        let prefetch = prefetch.max(1);
        Ok(Engine {
            shared,
            shapes,
            layout,
            prefetch,
            batch_size,
            job_tx: Some(job_tx),
            job_rx,
            done_tx,
            done_rx,
            threads,
            pool: Arc::new(BufferPool { free: Mutex::new(Vec::new()), keep: prefetch + 2 }),
            inline: WorkerState::default(),
        })
    }

    fn submit(&self, seq: usize, generation: u64, epoch: u64, indices: Vec<usize>) {
        let len = indices.len();
        debug_assert!(len <= self.batch_size);
        let mut buffers = self.pool.take(&self.full_sizes());
        let ptrs = buffers.iter_mut().map(|b| b.as_mut_ptr()).collect();
        let work = Arc::new(BatchWork {
            seq,
            generation,
            epoch,
            indices,
            ptrs,
            buffers: Mutex::new(Some(buffers)),
            remaining: AtomicUsize::new(len),
            error: Mutex::new(None),
        });
        let tx = self.job_tx.as_ref().expect("the job channel lives as long as the engine");
        for pos in 0..len {
            // The receivers live in `self` (job_rx), so sending cannot fail.
            let _ = tx.send(Job { work: work.clone(), pos });
        }
    }

    /// Buffer sizes of a full batch (every batch uses full-size buffers, so that they are reusable).
    fn full_sizes(&self) -> Vec<usize> {
        self.shapes.iter().map(|s| s.count * self.batch_capacity() * s.crop_len()).collect()
    }

    fn batch_capacity(&self) -> usize {
        self.batch_size
    }

    /// Waits for the next finished batch (doing the work itself when there are no worker threads).
    fn next_done(&mut self) -> Arc<BatchWork> {
        loop {
            if let Ok(w) = self.done_rx.try_recv() {
                return w;
            }
            if self.threads.is_empty() {
                match self.job_rx.try_recv() {
                    Ok(job) => process(&self.shared, &self.shapes, job, &mut self.inline, &self.done_tx),
                    Err(_) => {
                        unreachable!("a batch is outstanding, so its jobs are queued or done")
                    }
                }
            } else {
                return self.done_rx.recv().expect("the engine holds a sender");
            }
        }
    }

    fn recycle(&self, work: Arc<BatchWork>) {
        if let Some(b) = work.buffers.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.pool.give(b);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.job_tx = None;
        // Wake the workers: drain queued jobs so that `recv` returns promptly once the channel is empty.
        while self.job_rx.try_recv().is_ok() {}
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Iteration.

/// The batches of one epoch, in order. Yields `Err` for a batch that contains an unreadable image (the
/// error names the shard and record) and goes on with the next batch. Dropping it early abandons the
/// work prepared ahead.
pub struct Epoch<'a> {
    engine: &'a mut Engine,
    epoch: u64,
    generation: u64,
    order: Vec<usize>,
    steps: usize,
    next_submit: usize,
    next_yield: usize,
    ready: BTreeMap<usize, Arc<BatchWork>>,
}

impl<'a> Epoch<'a> {
    fn new(engine: &'a mut Engine, epoch: u64, order: Vec<usize>, steps: usize) -> Epoch<'a> {
        let generation = engine.shared.generation.load(Ordering::Acquire);
        Epoch { engine, epoch, generation, order, steps, next_submit: 0, next_yield: 0, ready: BTreeMap::new() }
    }

    /// Batches left in this epoch.
    pub fn remaining(&self) -> usize {
        self.steps - self.next_yield
    }

    fn batch_indices(&self, step: usize) -> Vec<usize> {
        let b = self.engine.batch_size;
        let end = ((step + 1) * b).min(self.order.len());
        self.order[step * b..end].to_vec()
    }
}

impl Iterator for Epoch<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next_yield >= self.steps {
            return None;
        }
        while self.next_submit < self.steps && self.next_submit < self.next_yield + self.engine.prefetch {
            let indices = self.batch_indices(self.next_submit);
            self.engine.submit(self.next_submit, self.generation, self.epoch, indices);
            self.next_submit += 1;
        }
        let work = loop {
            if let Some(w) = self.ready.remove(&self.next_yield) {
                break w;
            }
            let w = self.engine.next_done();
            if w.generation != self.generation {
                self.engine.recycle(w);
            } else {
                self.ready.insert(w.seq, w);
            }
        };
        self.next_yield += 1;
        let error = work.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let buffers = work.buffers.lock().unwrap_or_else(|p| p.into_inner()).take();
        let buffers = buffers.expect("a finished batch still owns its buffers");
        if let Some(e) = error {
            self.engine.pool.give(buffers);
            return Some(Err(e));
        }
        let indices = work.indices.clone();
        let labels = indices.iter().map(|&i| self.engine.shared.dataset.label(i)).collect();
        Some(Ok(Batch {
            epoch: self.epoch,
            step: work.seq,
            indices,
            labels,
            shapes: self.engine.shapes.clone(),
            layout: self.engine.layout,
            buffers,
            pool: self.engine.pool.clone(),
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for Epoch<'_> {}

impl Drop for Epoch<'_> {
    fn drop(&mut self) {
        // Abandon what was prepared ahead: workers skip jobs of an older generation.
        self.engine.shared.generation.fetch_add(1, Ordering::AcqRel);
        for (_, w) in std::mem::take(&mut self.ready) {
            self.engine.recycle(w);
        }
    }
}

fn check_common(dataset: &Dataset, cfg: &LoaderConfig) -> Result<u8> {
    if cfg.batch_size == 0 {
        return Err(DataError::Config("batch_size must be at least 1".into()));
    }
    if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
        return Err(DataError::Config(format!("rank {} is not in 0..world_size ({})", cfg.rank, cfg.world_size)));
    }
    if dataset.is_empty() {
        return Err(DataError::Config(format!("the dataset in {} has no image", dataset.dir().display())));
    }
    let channels = cfg.channels.unwrap_or_else(|| dataset.channels());
    if !(channels == 1 || channels == 3) {
        return Err(DataError::Config(format!("output channels must be 1 or 3 (got {channels})")));
    }
    Ok(channels)
}

/// The training loader: shuffled per epoch, sharded by rank, multi-crop batches.
pub struct MultiCropLoader {
    engine: Engine,
    cfg: LoaderConfig,
    transform: MultiCropTransform,
    len: usize,
    /// The dataset indices loaded, when not all (`len` of them).
    subset: Option<Arc<[usize]>>,
}

impl MultiCropLoader {
    /// Starts `cfg.workers` threads. Fails on an inconsistent configuration or if one epoch would hold
    /// no batch on this rank.
    pub fn new(dataset: &Dataset, crops: &MultiCropConfig, cfg: &LoaderConfig) -> Result<MultiCropLoader> {
        Self::build(dataset, None, crops, cfg)
    }

    /// A loader over the images `indices` of `dataset` only (e.g. the labelled 1% of a semi-supervised
    /// evaluation), as `torch.utils.data.Subset` under a `DistributedSampler`: the epoch order shuffles
    /// positions in `indices`, and each crop stays keyed by the image's dataset index. Fails on an
    /// empty list or an index past the end of the dataset.
    pub fn with_indices(
        dataset: &Dataset,
        indices: &[usize],
        crops: &MultiCropConfig,
        cfg: &LoaderConfig,
    ) -> Result<MultiCropLoader> {
        if indices.is_empty() {
            return Err(DataError::Config("the subset of images to load is empty".into()));
        }
        if let Some(&index) = indices.iter().find(|&&i| i >= dataset.len()) {
            return Err(DataError::IndexOutOfRange { index, len: dataset.len() });
        }
        Self::build(dataset, Some(indices.into()), crops, cfg)
    }

    fn build(
        dataset: &Dataset,
        subset: Option<Arc<[usize]>>,
        crops: &MultiCropConfig,
        cfg: &LoaderConfig,
    ) -> Result<MultiCropLoader> {
        let channels = check_common(dataset, cfg)?;
        let m = dataset.manifest();
        let transform = MultiCropTransform::new(crops, channels, cfg.layout, &m.pixel_mean, &m.pixel_std)?;
        let len = subset.as_ref().map_or(dataset.len(), |s| s.len());
        let per_rank = epoch_order(len, 0, 0, false, cfg.rank, cfg.world_size, cfg.drop_last).len();
        if steps(per_rank, cfg.batch_size, cfg.drop_last) == 0 {
            return Err(DataError::Config(format!(
                "{len} images over {} rank(s) give {per_rank} per rank, not one full batch of {}: lower batch_size or set drop_last = false",
                cfg.world_size,
                cfg.batch_size
            )));
        }
        let shared = Shared {
            dataset: dataset.clone(),
            transform: Transform::MultiCrop(transform.clone()),
            seed: cfg.seed,
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        let engine = Engine::new(shared, transform.shapes().to_vec(), cfg)?;
        Ok(MultiCropLoader { engine, cfg: cfg.clone(), transform, len, subset })
    }

    /// Images this rank sees per epoch (before dropping the incomplete batch).
    pub fn samples_per_epoch(&self) -> usize {
        epoch_order(self.len, 0, 0, false, self.cfg.rank, self.cfg.world_size, self.cfg.drop_last).len()
    }

    /// Batches per epoch on this rank.
    pub fn steps_per_epoch(&self) -> usize {
        steps(self.samples_per_epoch(), self.cfg.batch_size, self.cfg.drop_last)
    }

    /// One entry per crop group (count, size, channels).
    pub fn shapes(&self) -> &[GroupShape] {
        self.transform.shapes()
    }

    /// The transform (to reproduce or inspect a crop).
    pub fn transform(&self) -> &MultiCropTransform {
        &self.transform
    }

    /// The batch settings the loader was made with.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The batches of epoch `epoch`, in order.
    pub fn epoch(&mut self, epoch: u64) -> Epoch<'_> {
        let c = &self.cfg;
        let mut order = epoch_order(self.len, c.seed, epoch, c.shuffle, c.rank, c.world_size, c.drop_last);
        let steps = steps(order.len(), c.batch_size, c.drop_last);
        order.truncate(steps * c.batch_size);
        if let Some(subset) = &self.subset {
            order.iter_mut().for_each(|p| *p = subset[*p]);
        }
        Epoch::new(&mut self.engine, epoch, order, steps)
    }
}

fn steps(samples: usize, batch: usize, drop_last: bool) -> usize {
    if drop_last {
        samples / batch
    } else {
        samples.div_ceil(batch)
    }
}

/// The evaluation loader: every image once, in index order, `[batch, H, W, C]` centre crops and labels;
/// the last batch may be smaller.
pub struct EvalLoader {
    engine: Engine,
    transform: EvalTransform,
    len: usize,
    batch_size: usize,
}

impl EvalLoader {
    /// Uses `batch_size`, `workers`, `prefetch`, `layout` and `channels` of `cfg`.
    pub fn new(dataset: &Dataset, eval: &EvalConfig, cfg: &LoaderConfig) -> Result<EvalLoader> {
        let channels = check_common(dataset, cfg)?;
        let m = dataset.manifest();
        let transform = EvalTransform::new(eval, channels, cfg.layout, &m.pixel_mean, &m.pixel_std)?;
        let shared = Shared {
            dataset: dataset.clone(),
            transform: Transform::Eval(transform.clone()),
            seed: 0,
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        let engine = Engine::new(shared, vec![transform.shape()], cfg)?;
        Ok(EvalLoader { engine, transform, len: dataset.len(), batch_size: cfg.batch_size })
    }

    /// Number of batches.
    pub fn steps(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// The transform (to reproduce or inspect the evaluation crop of one image).
    pub fn transform(&self) -> &EvalTransform {
        &self.transform
    }

    /// All images in index order.
    pub fn iter(&mut self) -> Epoch<'_> {
        let steps = self.steps();
        Epoch::new(&mut self.engine, 0, (0..self.len).collect(), steps)
    }
}
