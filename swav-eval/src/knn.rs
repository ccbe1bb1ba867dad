//! Weighted k-nearest-neighbour classification on frozen features (the protocol of solo-learn, lightly
//! and DINO, Wu et al. 2018).
//!
//! Each row of both sets is L2-normalised; a test image's neighbours are the `k` training images of
//! highest cosine similarity `s`, each voting for its class with weight `exp(s / temperature)`; the
//! class with the largest total wins. Exact and deterministic: ties in similarity at the k-th place go
//! to the lower training index, ties in votes to the lower class.
//!
//! The similarities come from the engine's GEMM, one block of test rows against all training rows at a
//! time (blocks of at most 128 rows and 32 MiB of similarities, processed in parallel, each GEMM
//! single-threaded), so 10,000 x 60,000 x 512 takes seconds; the k-th largest similarity of a row is
//! found by selection (linear time), not by sorting.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use swav_tensor::matmul::{matmul, MatMut, MatRef, Threads};

use crate::features::Features;
use crate::EvalError;

/// Settings of the weighted k-NN; the default is the usual protocol, `k = 200`, temperature 0.1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Neighbours per test image (capped at the number of training images).
    pub k: usize,
    /// Temperature of the vote weights `exp(similarity / temperature)`.
    pub temperature: f32,
}

impl KnnConfig {
    /// Refuses settings that cannot classify (checked before any feature is extracted).
    pub fn validate(&self) -> Result<(), EvalError> {
        if self.k == 0 || !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EvalError::Invalid(format!(
                "k-NN needs k >= 1 and a positive temperature (got k = {}, temperature = {})",
                self.k, self.temperature
            )));
        }
        Ok(())
    }
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig { k: 200, temperature: 0.1 }
    }
}

/// At most this many test rows per GEMM block, and at most `SIMS_PER_BLOCK` similarities (32 MiB) per
/// block, so that memory stays bounded for large training sets.
const BLOCK: usize = 128;
const SIMS_PER_BLOCK: usize = 8 << 20;

/// Rows scaled to unit L2 norm (`x / max(||x||, 1e-12)`, as `torch.nn.functional.normalize`).
pub fn l2_normalized(f: &Features) -> Vec<f32> {
    let mut out = f.data.clone();
    if f.dim > 0 {
        for row in out.chunks_exact_mut(f.dim) {
            let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
            let inv = (1.0 / norm) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// The predicted class of every test row.
pub fn knn_predict(train: &Features, test: &Features, cfg: &KnnConfig) -> Result<Vec<u32>, EvalError> {
    let labels = train.labels_for("k-NN classification (training set)")?;
    if train.dim != test.dim {
        return Err(EvalError::Invalid(format!(
            "training features have {} dimensions, test features {}",
            train.dim, test.dim
        )));
    }
    if train.n == 0 {
        return Err(EvalError::Invalid("k-NN classification needs at least one training image".into()));
    }
    cfg.validate()?;
    train.check_finite("training features")?;
    test.check_finite("test features")?;
    let k = cfg.k.min(train.n);
    let classes = train.classes.max(labels.iter().max().map_or(0, |&m| m as usize + 1));
    let (n, d) = (train.n, train.dim);
    let train_n = l2_normalized(train);
    let test_n = l2_normalized(test);
    let inv_t = 1.0 / cfg.temperature as f64;

    let block_rows = (SIMS_PER_BLOCK / n).clamp(1, BLOCK);
    let blocks: Vec<Vec<u32>> = test_n
        .par_chunks(block_rows * d)
        .map(|block| {
            let rows = block.len() / d;
            let mut sims = vec![0.0f32; rows * n];
            matmul(
                MatMut::new(&mut sims, rows, n),
                MatRef::new(block, rows, d),
                MatRef::new(&train_n, n, d).t(),
                false,
                Threads::Serial,
            );
            let mut scratch = vec![0.0f32; n];
            let mut votes = vec![0.0f64; classes];
            sims.chunks_exact(n)
                .map(|row| {
                    // The k-th largest similarity, then every larger one plus the first equal ones.
                    scratch.copy_from_slice(row);
                    let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                    let kth = *kth;
                    let greater = row.iter().filter(|&&s| s > kth).count();
                    let mut equal_left = k - greater;
                    votes.iter_mut().for_each(|v| *v = 0.0);
                    for (j, &s) in row.iter().enumerate() {
                        let take = if s > kth {
                            true
                        } else if s == kth && equal_left > 0 {
                            equal_left -= 1;
                            true
                        } else {
                            false
                        };
                        if take {
                            votes[labels[j] as usize] += (s as f64 * inv_t).exp();
                        }
                    }
                    argmax(&votes)
                })
                .collect()
        })
        .collect();
    Ok(blocks.into_iter().flatten().collect())
}

/// Index of the largest value, the first one on ties.
pub(crate) fn argmax(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Fraction of test rows whose predicted class is their label.
pub fn knn_top1(train: &Features, test: &Features, cfg: &KnnConfig) -> Result<f64, EvalError> {
    let truth = test.labels_for("k-NN accuracy (test set)")?;
    let predicted = knn_predict(train, test, cfg)?;
    Ok(accuracy(&predicted, truth))
}

pub(crate) fn accuracy(predicted: &[u32], truth: &[u32]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    predicted.iter().zip(truth).filter(|(p, t)| p == t).count() as f64 / truth.len() as f64
}
