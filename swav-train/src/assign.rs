//! Cluster assignment of one crop: the codes `q` that its swapped prediction targets.
//!
//! Official order: `s = concat(queue_scores, crop_scores)` (the queue's stored embeddings scored by
//! the current prototypes, when the queue is in use), `Q = sinkhorn(s)`, keep the crop's own (last
//! `batch`) rows. The queue rows only shape the equipartition constraint.

use crate::TrainError;

/// The codes `[batch, k]` (row-major, rows summing to 1) of one crop from its scores `[batch, k]` and, when the
/// queue is in use, the queue's scores `[rows, k]` prepended before Sinkhorn; only the crop's own rows are returned.
pub fn codes_for_crop(
    crop_scores: &[f32],
    queue_scores: Option<&[f32]>,
    batch: usize,
    k: usize,
    params: &swav_sinkhorn::Params,
) -> Result<Vec<f32>, TrainError> {
    codes_for_crop_on(crop_scores, queue_scores, batch, k, params, &swav_sinkhorn::SingleProcess)
}

/// [`codes_for_crop`] for one rank of a distributed run: Sinkhorn's sums are all-reduced by `reducer`
/// (every rank passes the same number of rows: its batch and its own queue).
pub fn codes_for_crop_on(
    crop_scores: &[f32],
    queue_scores: Option<&[f32]>,
    batch: usize,
    k: usize,
    params: &swav_sinkhorn::Params,
    reducer: &dyn swav_sinkhorn::Reducer,
) -> Result<Vec<f32>, TrainError> {
    let sink = |s: &[f32], rows: usize| {
        let mut q = vec![0f32; rows * k];
        swav_sinkhorn::sinkhorn_into(s, rows, k, params, reducer, &mut q)
            .map_err(|e| TrainError::Sinkhorn(e.to_string()))
            .map(|()| q)
    };
    match queue_scores {
        None => sink(crop_scores, batch),
        Some(q) => {
            let mut all = Vec::with_capacity(q.len() + crop_scores.len());
            all.extend_from_slice(q);
            all.extend_from_slice(crop_scores);
            let rows = all.len() / k;
            let codes = sink(&all, rows)?;
            Ok(codes[(rows - batch) * k..].to_vec())
        }
    }
}
