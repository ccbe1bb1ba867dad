//! One SwAV iteration, in the order of the official `main_swav.py` training loop:
//!
//! 1. the learning rate of this iteration (given by the caller's schedule);
//! 2. normalise the prototypes (no gradient);
//! 3. forward every crop: embeddings `z` and scores `z C^T`;
//! 4. for each crop in `crops_for_assign`, its codes `q` by Sinkhorn, with the queue's scores prepended
//!    once the queue is full, then push the crop's embeddings into the queue;
//! 5. the swapped-prediction loss over every other crop;
//! 6. backward; the prototypes get no update while `iteration < freeze_prototypes_niters`;
//! 7. LARS step.

use swav_model::param::Visit;
use swav_model::SwavModel;
use swav_tensor::ops::linear::linear_forward;
use swav_tensor::{profile, Tensor};

use crate::assign::codes_for_crop;
use crate::config::TrainConfig;
use crate::lars::Lars;
use crate::loss::swapped_prediction_loss;
use crate::queue::Queue;
use crate::TrainError;

/// What one step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f64,
    /// Entropy (nats) of the mean code distribution of the first assigned crop: ln(K) when every
    /// prototype is used equally, 0 when all images go to one prototype.
    pub cluster_entropy: f64,
    /// Prototypes that are the argmax code of at least one image of the batch.
    pub clusters_used: usize,
}

/// Everything a step updates.
pub struct SwavState {
    pub model: SwavModel,
    pub optimizer: Lars,
    pub queue: Option<Queue>,
}

/// Runs one iteration on `groups` (crop groups `[count * batch, h, w, c]`, crop-major, in crop order).
pub fn swav_step(
    state: &mut SwavState,
    cfg: &TrainConfig,
    groups: Vec<Tensor>,
    batch: usize,
    iteration: usize,
    lr: f64,
) -> Result<StepStats, TrainError> {
    let crops: usize = groups.iter().map(|g| g.dim(0) / batch).sum();
    let model = &mut state.model;

    model.normalize_prototypes();
    model.zero_grad();
    let (out, acts) = model.forward_train(groups)?;
    let scores = out.scores[0].as_slice();
    let k = out.scores[0].dim(1);
    if let Some(bad) = scores.iter().find(|v| !v.is_finite()) {
        // The network diverged: report it as a non-finite loss before anything is updated.
        return Ok(StepStats { loss: *bad as f64, cluster_entropy: f64::NAN, clusters_used: 0 });
    }
    let dim = out.embedding.dim(1);

    let sinkhorn = swav_sinkhorn::Params::new(cfg.epsilon, cfg.sinkhorn_iterations);
    let codes_scope = profile::scope("codes (sinkhorn)");
    let mut codes = Vec::with_capacity(cfg.crops_for_assign.len());
    for (j, &crop) in cfg.crops_for_assign.iter().enumerate() {
        let rows = crop * batch..(crop + 1) * batch;
        let queue_scores = match &state.queue {
            Some(q) if q.is_full(j) => Some(linear_forward(&q.rows[j], &model.prototypes.heads[0].weight.value, None)?),
            _ => None,
        };
        let q = codes_for_crop(
            &scores[rows.start * k..rows.end * k],
            queue_scores.as_ref().map(Tensor::as_slice),
            batch,
            k,
            &sinkhorn,
        )?;
        codes.push(q);
        if let Some(queue) = &mut state.queue {
            queue.push(j, &out.embedding.as_slice()[rows.start * dim..rows.end * dim]);
        }
    }

    drop(codes_scope);
    let loss_scope = profile::scope("loss");
    let loss = swapped_prediction_loss(scores, k, batch, crops, &cfg.crops_for_assign, &codes, cfg.temperature)?;
    if !loss.loss.is_finite() {
        return Ok(StepStats { loss: loss.loss, cluster_entropy: f64::NAN, clusters_used: 0 });
    }
    drop(loss_scope);
    let dscores = Tensor::from_vec(out.scores[0].shape(), loss.dscores)?;
    model.backward(acts, &out, &[dscores])?;

    let _optimizer_scope = profile::scope("optimizer");
    let frozen = iteration < cfg.freeze_prototypes_niters;
    state.optimizer.step(model, lr, |name| frozen && name.starts_with("prototypes."));
    Ok(cluster_stats(&codes[0], k, loss.loss))
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
