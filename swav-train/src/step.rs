//! One SwAV iteration, in the order of the official `main_swav.py` training loop:
//!
//! 1. the learning rate of this iteration (given by the caller's schedule);
//! 2. normalise the prototypes (no gradient);
//! 3. forward every crop: embeddings `z` and scores `z C^T`;
//! 4. for each crop in `crops_for_assign`, its codes `q` by Sinkhorn, with the queue's scores prepended
//!    once the queue is full, then push the crop's embeddings into the queue;
//! 5. the swapped-prediction loss over every other crop;
//!
//! With several prototype heads (`model.prototypes = [k1, k2, ...]`), steps 4-5 run per head (each head's
//! codes from its own scores and its own product with the queue) and the loss is the heads' mean.
//! 6. backward; the prototypes get no update while `iteration < freeze_prototypes_niters`;
//! 7. LARS step.

use std::sync::Arc;
use swav_model::param::Visit;
use swav_model::SwavModel;
use swav_tensor::ops::linear::linear_forward;

use swav_tensor::collective::{SingleProcess, BUCKET_BYTES};
use swav_tensor::{profile, Collective, Tensor};

use crate::assign::codes_for_crop_on;
use crate::config::TrainConfig;
use crate::device::{self, DeviceSinkhorn};
use crate::distributed::{self, CollectiveReducer, GradientAverager};
use crate::lars::Lars;
use crate::loss::swapped_prediction_loss;
use crate::queue::Queue;
use crate::TrainError;

/// What one step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The loss of the step, averaged over heads.
    pub loss: f64,
    /// Entropy (nats) of the mean code distribution of the first assigned crop (first head): ln(K) when every
    /// prototype is used equally, 0 when all images go to one prototype.
    pub cluster_entropy: f64,
    /// Prototypes that are the argmax code of at least one image of the batch.
    pub clusters_used: usize,
}

/// Everything a step updates.
pub struct SwavState {
    /// The network being trained.
    pub model: SwavModel,
    /// The optimiser and its momentum buffers.
    pub optimizer: Lars,
    /// The embedding queue, when `train.queue_length > 0`.
    pub queue: Option<Queue>,
    /// Sinkhorn's device kernels, compiled on first use (unused on the CPU).
    pub device_sinkhorn: DeviceSinkhorn,
    /// Gradient averaging overlapped with the backward, made on the first distributed step (before
    /// `collective`, so that its thread and channel go before the collective they come from).
    pub(crate) gradient_averager: Option<GradientAverager>,
    /// Size of the gradient buckets of a data-parallel run ([`BUCKET_BYTES`] by default).
    pub gradient_bucket_bytes: usize,
    /// The ranks of a data-parallel run ([`SingleProcess`] alone by default).
    pub collective: Arc<dyn Collective>,
    /// Give every rank rank 0's batch-norm buffers before each forward (DDP's `broadcast_buffers`);
    /// off when the batch norms are synchronised, whose buffers agree anyway.
    pub broadcast_buffers: bool,
}

impl SwavState {
    /// A state with no queue and no momentum yet, on one process.
    pub fn new(model: SwavModel, optimizer: Lars) -> SwavState {
        SwavState {
            model,
            optimizer,
            queue: None,
            device_sinkhorn: DeviceSinkhorn::default(),
            gradient_averager: None,
            gradient_bucket_bytes: BUCKET_BYTES,
            collective: Arc::new(SingleProcess),
            broadcast_buffers: true,
        }
    }
}

/// A step's report as [`start_step`] returns it: on a CUDA device its numbers are still being computed
/// or copied back, and [`PendingStats::wait`] waits for them.
#[derive(Debug)]
pub struct PendingStats(Pending);

#[derive(Debug)]
enum Pending {
    Ready(StepStats),
    /// `[loss, cluster entropy, clusters used]` on their way from the device.
    Device(swav_tensor::PendingValues),
}

impl PendingStats {
    /// The report (waiting for the device to finish the step).
    pub fn wait(self) -> Result<StepStats, TrainError> {
        match self.0 {
            Pending::Ready(s) => Ok(s),
            Pending::Device(values) => {
                let v = values.wait()?;
                Ok(StepStats { loss: v[0] as f64, cluster_entropy: v[1] as f64, clusters_used: v[2] as usize })
            }
        }
    }
}

/// Runs one iteration on `groups` (crop groups `[count * batch, h, w, c]`, crop-major, in crop order,
/// on the model's device) and returns its report.
pub fn swav_step(
    state: &mut SwavState,
    cfg: &TrainConfig,
    groups: Vec<Tensor>,
    batch: usize,
    iteration: usize,
    lr: f64,
) -> Result<StepStats, TrainError> {
    start_step(state, cfg, groups, batch, iteration, lr)?.wait()
}

/// [`swav_step`] without waiting: on a CUDA device the step is queued and its report comes back
/// later (nothing in the step waits for the host, and a non-finite loss is caught on the device,
/// where it stops the update); on the CPU the report is ready.
pub fn start_step(
    state: &mut SwavState,
    cfg: &TrainConfig,
    groups: Vec<Tensor>,
    batch: usize,
    iteration: usize,
    lr: f64,
) -> Result<PendingStats, TrainError> {
    // On the CPU the step's thousands of parallel ops fork from a compute thread (see
    // `on_compute_thread`): a sixth of the context switches of a ResNet-50 step, 3% faster. Not where
    // other ranks are threads of this process (see `Collective::alone_in_process`).
    if state.model.device().is_cuda() || !state.collective.alone_in_process() {
        return step_on_this_thread(state, cfg, groups, batch, iteration, lr);
    }
    swav_tensor::on_compute_thread(|| step_on_this_thread(state, cfg, groups, batch, iteration, lr))
}

fn step_on_this_thread(
    state: &mut SwavState,
    cfg: &TrainConfig,
    groups: Vec<Tensor>,
    batch: usize,
    iteration: usize,
    lr: f64,
) -> Result<PendingStats, TrainError> {
    let crops: usize = groups.iter().map(|g| g.dim(0) / batch).sum();
    let on_device = state.model.device().is_cuda();
    // What the step allocates on a device comes from the per-step pool.
    let _step_pool = groups.first().and_then(Tensor::runtime).map(|rt| rt.in_step());
    let world = state.collective.clone();
    let distributed = world.world_size() > 1;
    if distributed && !state.gradient_averager.as_ref().is_some_and(|a| a.serves(&world)) {
        state.gradient_averager = Some(GradientAverager::new(&world, state.gradient_bucket_bytes)?);
    }
    let model = &mut state.model;

    model.normalize_prototypes()?;
    model.zero_grad();
    if distributed && state.broadcast_buffers {
        distributed::broadcast_from_rank0(model, world.as_ref(), false)?;
    }
    let (out, acts) = model.forward_train(groups)?;
    // On one device the loss kernel's flag stops a bad update without the host looking; across ranks
    // the host looks (the ranks must agree before Sinkhorn's collectives, or one would stop early and
    // leave the others waiting).
    if !on_device || distributed {
        let host: Vec<std::borrow::Cow<[f32]>> =
            out.scores.iter().map(|s| if on_device { s.to_vec().into() } else { s.as_slice().into() }).collect();
        let mut bad = host.iter().flat_map(|s| s.iter()).find(|v| !v.is_finite()).map_or(0.0, |v| {
            if v.is_nan() {
                f32::NAN
            } else {
                *v
            }
        });
        if distributed {
            // Every rank takes the same branch: one that stopped here would leave the others waiting.
            let mut flag = [bad];
            world.all_reduce_sum(&mut flag).map_err(distributed::err)?;
            bad = flag[0];
        }
        if bad != 0.0 {
            // The network diverged: report it as a non-finite loss before anything is updated.
            let loss = if bad.is_finite() { f64::INFINITY } else { bad as f64 };
            let stats = StepStats { loss, cluster_entropy: f64::NAN, clusters_used: 0 };
            return Ok(PendingStats(Pending::Ready(stats)));
        }
    }

    // Every prototype head gets its own codes (from the queue as it was before this batch), then the
    // batch's embeddings join the queue once: the queue holds embeddings, which the heads share.
    let sinkhorn = swav_sinkhorn::Params::new(cfg.epsilon, cfg.sinkhorn_iterations);
    let codes_scope = profile::scope("codes (sinkhorn)");
    let mut codes = Vec::with_capacity(out.scores.len());
    for (scores, head) in out.scores.iter().zip(&model.prototypes.heads) {
        let mut head_codes = Vec::with_capacity(cfg.crops_for_assign.len());
        for (j, &crop) in cfg.crops_for_assign.iter().enumerate() {
            let crop_scores = scores.narrow(crop * batch, batch)?;
            let queue_scores = match &state.queue {
                Some(q) if q.is_full(j)? => Some(linear_forward(&q.rows[j], &head.weight.value, None)?),
                _ => None,
            };
            let reducer = CollectiveReducer(world.as_ref());
            let q = if on_device {
                let queue_scores = queue_scores.as_ref();
                device::codes_for_crop(&mut state.device_sinkhorn, &crop_scores, queue_scores, &sinkhorn, reducer)?
            } else {
                let (k, q) = (scores.dim(1), queue_scores.as_ref().map(Tensor::as_slice));
                Tensor::from_vec(
                    &[batch, k],
                    codes_for_crop_on(crop_scores.as_slice(), q, batch, k, &sinkhorn, &reducer)?,
                )?
            };
            head_codes.push(q);
        }
        codes.push(head_codes);
    }
    if let Some(queue) = &mut state.queue {
        for (j, &crop) in cfg.crops_for_assign.iter().enumerate() {
            queue.push(j, &out.embedding.narrow(crop * batch, batch)?)?;
        }
    }
    drop(codes_scope);

    // The loss is the mean over heads of each head's swapped-prediction loss.
    let loss_scope = profile::scope("loss");
    let heads = out.scores.len();
    let mut dscores = Vec::with_capacity(heads);
    let (loss, skip) = if on_device {
        let mut losses = Vec::with_capacity(heads);
        for (scores, head_codes) in out.scores.iter().zip(&codes) {
            let l = device::swapped_prediction_loss(scores, head_codes, batch, &cfg.crops_for_assign, cfg.temperature)?;
            losses.push(l);
        }
        let (loss, skip) = if heads == 1 {
            let l = losses.pop().expect("one head");
            dscores.push(l.dscores);
            (l.loss, l.skip)
        } else {
            let mean = device::mean_loss(&losses.iter().map(|l| &l.loss).collect::<Vec<_>>())?;
            for mut l in losses {
                l.dscores.scale(1.0 / heads as f32);
                dscores.push(l.dscores);
            }
            mean
        };
        let loss = if distributed {
            // The global batch's loss, on every rank; all ranks stop together when it is not finite.
            let mut sum = [loss.to_vec()[0]];
            world.all_reduce_sum(&mut sum).map_err(distributed::err)?;
            let global = sum[0] as f64 / world.world_size() as f64;
            if !global.is_finite() {
                return Ok(PendingStats(Pending::Ready(StepStats {
                    loss: global,
                    cluster_entropy: f64::NAN,
                    clusters_used: 0,
                })));
            }
            Tensor::from_slice(&[1], &[global as f32])?.to_device(loss.device())?
        } else {
            loss
        };
        (Loss::Device(loss), Some(skip))
    } else {
        let mut total = 0.0;
        for (scores, head_codes) in out.scores.iter().zip(&codes) {
            let k = scores.dim(1);
            let host: Vec<Vec<f32>> = head_codes.iter().map(|c| c.as_slice().to_vec()).collect();
            let l = swapped_prediction_loss(
                scores.as_slice(),
                k,
                batch,
                crops,
                &cfg.crops_for_assign,
                &host,
                cfg.temperature,
            )?;
            total += l.loss;
            let mut d = Tensor::from_vec(scores.shape(), l.dscores)?;
            if heads > 1 {
                d.scale(1.0 / heads as f32);
            }
            dscores.push(d);
        }
        let mut loss = total / heads as f64;
        if distributed {
            // The global batch's loss (each rank's is the mean over its own images).
            let mut sum = [loss as f32];
            world.all_reduce_sum(&mut sum).map_err(distributed::err)?;
            loss = sum[0] as f64 / world.world_size() as f64;
        }
        (Loss::Host(loss), None)
    };
    drop(loss_scope);
    if let Loss::Host(loss) = loss {
        if !loss.is_finite() {
            return Ok(PendingStats(Pending::Ready(StepStats { loss, cluster_entropy: f64::NAN, clusters_used: 0 })));
        }
    }
    match state.gradient_averager.as_mut().filter(|_| distributed) {
        Some(averager) => {
            // Each bucket's all-reduce starts while the rest of the backward runs.
            model.backward_with(acts, &out, &dscores, Some(&mut |prefix, part| averager.ready(prefix, part)))?;
            let _scope = profile::scope("all-reduce gradients (wait)");
            averager.finish(model)?;
        }
        None => model.backward(acts, &out, &dscores)?,
    }

    let _optimizer_scope = profile::scope("optimizer");
    let frozen = iteration < cfg.freeze_prototypes_niters;
    let frozen = |name: &str| frozen && name.starts_with("prototypes.");
    match &skip {
        // On the device the update reads the loss kernel's flag: a non-finite loss updates nothing.
        Some(skip) => device::lars_step(&mut state.optimizer, model, lr, frozen, skip)?,
        None => state.optimizer.step(model, lr, frozen),
    }
    match loss {
        Loss::Device(loss) => {
            let stats = Tensor::cat(&[&loss, &device::cluster_stats(&codes[0][0])?])?;
            Ok(PendingStats(Pending::Device(stats.to_vec_later()?)))
        }
        Loss::Host(loss) => {
            let k = out.scores[0].dim(1);
            Ok(PendingStats(Pending::Ready(cluster_stats(codes[0][0].as_slice(), k, loss))))
        }
    }
}

/// The loss where it was computed.
enum Loss {
    Host(f64),
    /// f32 `[1]` on the device.
    Device(Tensor),
}

fn cluster_stats(codes: &[f32], k: usize, loss: f64) -> StepStats {
    let mut mean = vec![0.0f64; k];
    let mut used = vec![false; k];
    for row in codes.chunks_exact(k) {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            mean[i] += v as f64;
            if v > row[best] {
                best = i;
            }
        }
        used[best] = true;
    }
    let total: f64 = mean.iter().sum();
    let entropy =
        if total > 0.0 { mean.iter().map(|&m| m / total).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum() } else { 0.0 };
    StepStats { loss, cluster_entropy: entropy, clusters_used: used.iter().filter(|&&u| u).count() }
}
