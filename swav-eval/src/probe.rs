//! Linear probe: a softmax classifier trained on frozen features.
//!
//! Conventions:
//! - Inputs: each feature row is L2-normalised, then every dimension is standardised with the
//!   training set's mean and standard deviation (`(x - mean) / (std + 1e-6)`, the same constants for
//!   the test set), as the PyTorch Fashion-MNIST reference evaluation does. Standardising makes one learning
//!   rate fit features of any scale (a random network's and a trained one's).
//! - Model: `logits = W x + b`, `W` `[classes, dim]` and `b` start at zero; loss: mean softmax
//!   cross-entropy over the mini-batch.
//! - Optimiser: SGD with momentum (PyTorch semantics: `v = mu v + g; w -= lr v`), weight decay on `W`
//!   only, learning rate following a cosine from `lr` to 0 over all steps (per step), mini-batches
//!   drawn from a fresh permutation every epoch (SplitMix64 keyed by (seed, epoch)); the last
//!   smaller batch is kept.
//! - Deterministic: single-threaded, fixed order, so the same features and seed give the same
//!   classifier bit for bit.

use serde::{Deserialize, Serialize};
use swav_core::rng::SplitMix64;
use swav_tensor::matmul::{matmul, MatMut, MatRef, Threads};

use crate::features::Features;
use crate::knn::{accuracy, l2_normalized};
use crate::EvalError;

/// Settings of the linear probe's training (see the module docs); the default is 30 epochs of
/// batches of 256, lr 0.1, momentum 0.9, weight decay 1e-4, seed 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Passes over the training features (at least 1).
    pub epochs: usize,
    /// Rows per SGD step (capped at the number of training rows).
    pub batch_size: usize,
    /// Peak learning rate (start of the cosine).
    pub lr: f32,
    /// SGD momentum, in `[0, 1)`.
    pub momentum: f32,
    /// Weight decay, added to the gradient as `weight_decay * w`, on the weight matrix only (not the bias).
    pub weight_decay: f32,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
}

impl ProbeConfig {
    /// Refuses settings that cannot train (checked before any feature is extracted).
    pub fn validate(&self) -> Result<(), EvalError> {
        if self.epochs == 0
            || self.batch_size == 0
            || !(self.lr.is_finite() && self.lr > 0.0)
            || !(0.0..1.0).contains(&self.momentum)
            || !(self.weight_decay.is_finite() && self.weight_decay >= 0.0)
        {
            return Err(EvalError::Invalid(format!(
                "linear probe settings: need epochs >= 1, batch_size >= 1, lr > 0, 0 <= momentum < 1, weight_decay >= 0 (got {self:?})"
            )));
        }
        Ok(())
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { epochs: 30, batch_size: 256, lr: 0.1, momentum: 0.9, weight_decay: 1e-4, seed: 0 }
    }
}

/// A trained probe with the standardisation it was trained with.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearProbe {
    /// `[classes, dim]`, row-major.
    pub weight: Vec<f32>,
    /// `[classes]`.
    pub bias: Vec<f32>,
    /// Output classes (rows of `weight`).
    pub classes: usize,
    /// Feature dimensions it takes (columns of `weight`).
    pub dim: usize,
    /// Per-dimension mean of the L2-normalised training features.
    pub mean: Vec<f32>,
    /// Per-dimension `std + 1e-6` of the same (sample standard deviation); rows enter the classifier
    /// as `(x - mean) / scale`.
    pub scale: Vec<f32>,
}

impl LinearProbe {
    /// L2-normalised and standardised copies of the rows.
    fn standardize(&self, f: &Features) -> Vec<f32> {
        standardize(l2_normalized(f), self.dim, &self.mean, &self.scale)
    }

    /// The predicted class of every row.
    pub fn predict(&self, f: &Features) -> Result<Vec<u32>, EvalError> {
        if f.dim != self.dim {
            return Err(EvalError::Invalid(format!(
                "the probe takes {} dimensions, these features have {}",
                self.dim, f.dim
            )));
        }
        f.check_finite("features")?;
        let x = self.standardize(f);
        let mut logits = vec![0.0f32; f.n * self.classes];
        self.logits(&x, f.n, &mut logits);
        Ok(logits
            .chunks_exact(self.classes)
            .map(|row| super::knn::argmax(&row.iter().map(|&v| v as f64).collect::<Vec<_>>()))
            .collect())
    }

    fn logits(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let c = self.classes;
        for row in out.chunks_exact_mut(c) {
            row.copy_from_slice(&self.bias);
        }
        matmul(
            MatMut::new(out, rows, c),
            MatRef::new(x, rows, self.dim),
            MatRef::new(&self.weight, c, self.dim).t(),
            true,
            Threads::Serial,
        );
    }
}

fn standardize(mut x: Vec<f32>, dim: usize, mean: &[f32], scale: &[f32]) -> Vec<f32> {
    for row in x.chunks_exact_mut(dim) {
        for ((v, m), s) in row.iter_mut().zip(mean).zip(scale) {
            *v = (*v - m) / s;
        }
    }
    x
}

/// Stream tag of the probe's shuffles ("PROBE" in ASCII).
const PROBE_STREAM: u64 = 0x0050_524F_4245;

/// Trains a probe on labelled features (see the module docs).
pub fn train_linear_probe(train: &Features, cfg: &ProbeConfig) -> Result<LinearProbe, EvalError> {
    let labels = train.labels_for("the linear probe (training set)")?;
    if train.n == 0 || train.dim == 0 {
        return Err(EvalError::Invalid("the linear probe needs at least one training image".into()));
    }
    cfg.validate()?;
    train.check_finite("training features")?;
    let (n, d) = (train.n, train.dim);
    let c = train.classes.max(labels.iter().max().map_or(0, |&m| m as usize + 1)).max(1);

    // Standardisation constants of the L2-normalised training rows (f64 sums).
    let x = l2_normalized(train);
    let mut sum = vec![0.0f64; d];
    let mut sq = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for (j, &v) in row.iter().enumerate() {
            sum[j] += v as f64;
            sq[j] += v as f64 * v as f64;
        }
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
    let scale: Vec<f32> = (0..d)
        .map(|j| {
            let m = sum[j] / n as f64;
            let var = if n > 1 { ((sq[j] - n as f64 * m * m) / (n - 1) as f64).max(0.0) } else { 0.0 };
            (var.sqrt() + 1e-6) as f32
        })
        .collect();
    let x = standardize(x, d, &mean, &scale);

    let mut probe = LinearProbe { weight: vec![0.0; c * d], bias: vec![0.0; c], classes: c, dim: d, mean, scale };
    let mut v_w = vec![0.0f32; c * d];
    let mut v_b = vec![0.0f32; c];
    let b = cfg.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(b);
    let total = (steps_per_epoch * cfg.epochs) as f64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut xb = vec![0.0f32; b * d];
    let mut logits = vec![0.0f32; b * c];
    let mut g_w = vec![0.0f32; c * d];
    let mut g_b = vec![0.0f32; c];
    let mut step = 0usize;
    for epoch in 0..cfg.epochs {
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        SplitMix64::from_key(&[cfg.seed, epoch as u64, PROBE_STREAM]).shuffle(&mut order);
        for chunk in order.chunks(b) {
            let rows = chunk.len();
            for (r, &i) in chunk.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
            }
            let (xb, logits) = (&xb[..rows * d], &mut logits[..rows * c]);
            probe.logits(xb, rows, logits);
            // Softmax, minus the one-hot target, over the batch size: d loss / d logits.
            for (r, &i) in chunk.iter().enumerate() {
                let z = &mut logits[r * c..(r + 1) * c];
                let max = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut total = 0.0f32;
                z.iter_mut().for_each(|v| {
                    *v = (*v - max).exp();
                    total += *v;
                });
                z.iter_mut().for_each(|v| *v /= total * rows as f32);
                z[labels[i] as usize] -= 1.0 / rows as f32;
            }
            // g_w = dlogits^T xb, g_b = column sums of dlogits.
            matmul(
                MatMut::new(&mut g_w, c, d),
                MatRef::new(logits, rows, c).t(),
                MatRef::new(xb, rows, d),
                false,
                Threads::Serial,
            );
            g_b.iter_mut().for_each(|g| *g = 0.0);
            for row in logits.chunks_exact(c) {
                g_b.iter_mut().zip(row).for_each(|(g, v)| *g += v);
            }
            let lr = (0.5 * cfg.lr as f64 * (1.0 + (std::f64::consts::PI * step as f64 / total).cos())) as f32;
            for ((w, v), g) in probe.weight.iter_mut().zip(&mut v_w).zip(&g_w) {
                *v = cfg.momentum * *v + g + cfg.weight_decay * *w;
                *w -= lr * *v;
            }
            for ((w, v), g) in probe.bias.iter_mut().zip(&mut v_b).zip(&g_b) {
                *v = cfg.momentum * *v + g;
                *w -= lr * *v;
            }
            step += 1;
        }
    }
    if probe.weight.iter().chain(&probe.bias).any(|v| !v.is_finite()) {
        return Err(EvalError::Invalid(format!("the linear probe diverged (lr {}): lower --probe-lr", cfg.lr)));
    }
    Ok(probe)
}

/// Trains a probe on `train` and returns its accuracy on `test`.
pub fn linear_probe_top1(train: &Features, test: &Features, cfg: &ProbeConfig) -> Result<f64, EvalError> {
    let truth = test.labels_for("linear probe accuracy (test set)")?;
    let probe = train_linear_probe(train, cfg)?;
    Ok(accuracy(&probe.predict(test)?, truth))
}
