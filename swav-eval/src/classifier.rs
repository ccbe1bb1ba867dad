//! The loss and the scores of a classifier's logits, as both official evaluations (`eval_linear.py`,
//! `eval_semisup.py`) train and measure: PyTorch's `CrossEntropyLoss` (mean over the batch) and
//! top-1 / top-5 accuracy.
//!
//! For logits `z` `[B, C]` (row-major) and labels `y`:
//! - loss `= mean_b (logsumexp(z_b) - z_b[y_b])`;
//! - gradient `d loss / d z_bk = (softmax(z_b)_k - [k == y_b]) / B`.
//!
//! Each row is computed in f64 with its maximum subtracted (no overflow whatever the logits), and the
//! gradient rounded to f32 once. Top-k: a row is correct when fewer than `k` classes rank before its
//! label, a class ranking before it when its logit is larger, or equal with a lower index (`torch.topk`
//! leaves the order of ties unspecified; this rule is deterministic). With `C <= k` every row is
//! correct, as in PyTorch (which needs `k <= C` and is then trivially right).

use serde::{Deserialize, Serialize};

use crate::EvalError;

/// The classes ranked before `label` in one row of logits (0: the label is the top-1 prediction).
pub fn rank_of(row: &[f32], label: usize) -> usize {
    let target = row[label];
    row.iter().enumerate().filter(|&(k, &v)| v > target || (v == target && k < label)).count()
}

/// Checks the shapes and labels of a batch: `logits.len() == labels.len() * classes`, labels below
/// `classes`, logits finite.
fn check(logits: &[f32], classes: usize, labels: &[u32]) -> Result<(), EvalError> {
    if classes == 0 || logits.len() != labels.len() * classes {
        return Err(EvalError::Invalid(format!(
            "{} logits for {} labels of {classes} classes",
            logits.len(),
            labels.len()
        )));
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(EvalError::Invalid(format!("label {l} is not one of the {classes} classes")));
    }
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(EvalError::Invalid(
            "the classifier's outputs are not finite: training diverged (lower the learning rate)".into(),
        ));
    }
    Ok(())
}

/// The mean cross-entropy of the batch and its gradient with respect to the logits (see the module
/// docs).
pub fn cross_entropy(logits: &[f32], classes: usize, labels: &[u32]) -> Result<(f64, Vec<f32>), EvalError> {
    check(logits, classes, labels)?;
    let b = labels.len() as f64;
    let mut grad = vec![0.0f32; logits.len()];
    let mut loss = 0.0f64;
    for ((row, g), &y) in logits.chunks_exact(classes).zip(grad.chunks_exact_mut(classes)).zip(labels) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        loss += total.ln() + max - row[y as usize] as f64;
        for (k, (gk, e)) in g.iter_mut().zip(&exps).enumerate() {
            let onehot = if k == y as usize { 1.0 } else { 0.0 };
            *gk = ((e / total - onehot) / b) as f32;
        }
    }
    Ok((loss / b, grad))
}

/// Running loss and top-1 / top-5 counts over batches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Rows seen.
    pub seen: usize,
    /// Sum over rows of the cross-entropy (so that the mean is exact over unequal batches).
    pub loss_sum: f64,
    /// Rows whose label is the top-1 prediction.
    pub top1: usize,
    /// Rows whose label is among the top 5 predictions.
    pub top5: usize,
}

impl Tally {
    /// Adds the rows of a batch of logits whose mean loss is `mean_loss`.
    pub fn add(&mut self, logits: &[f32], classes: usize, labels: &[u32], mean_loss: f64) -> Result<(), EvalError> {
        check(logits, classes, labels)?;
        for (row, &y) in logits.chunks_exact(classes).zip(labels) {
            let r = rank_of(row, y as usize);
            self.top1 += usize::from(r < 1);
            self.top5 += usize::from(r < 5);
        }
        self.seen += labels.len();
        self.loss_sum += mean_loss * labels.len() as f64;
        Ok(())
    }

    /// Adds a batch of logits: its loss and its scores.
    pub fn add_batch(&mut self, logits: &[f32], classes: usize, labels: &[u32]) -> Result<(), EvalError> {
        let (loss, _) = cross_entropy(logits, classes, labels)?;
        self.add(logits, classes, labels, loss)
    }

    /// The mean loss, top-1 and top-5 accuracy (fractions; 0 when nothing was seen).
    pub fn means(&self) -> (f64, f64, f64) {
        if self.seen == 0 {
            return (0.0, 0.0, 0.0);
        }
        let n = self.seen as f64;
        (self.loss_sum / n, self.top1 as f64 / n, self.top5 as f64 / n)
    }
}

/// Whether a mean training loss is far above the loss of a classifier that knows nothing (`ln C`):
/// the sign of a learning rate too high for the features' scale (the official rates assume a
/// ResNet-50's features; a small or barely trained network's can be much larger).
pub fn loss_far_above_chance(loss: f64, classes: usize) -> bool {
    loss.is_nan() || loss > 2.0 * (classes.max(2) as f64).ln() + 1.0
}

/// Validation accuracy after one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// The epoch (1-based: after `epoch` epochs of training).
    pub epoch: usize,
    /// Top-1 accuracy, a fraction.
    pub top1: f64,
    /// Top-5 accuracy, a fraction.
    pub top5: f64,
}

/// The official report of a run: the best epoch by validation top-1 (the first of equals, as the
/// official scripts keep a strictly better one only) and the last.
pub fn best_and_last(history: &[Accuracy]) -> Option<(Accuracy, Accuracy)> {
    let last = *history.last()?;
    let best = history.iter().fold(history[0], |b, a| if a.top1 > b.top1 { *a } else { b });
    Some((best, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradient_matches_finite_differences_of_the_loss() {
        let logits = [0.3f32, -1.2, 2.0, 0.0, 0.5, 0.5, -3.0, 1.0];
        let labels = [2u32, 1];
        let (_, grad) = cross_entropy(&logits, 4, &labels).unwrap();
        for i in 0..logits.len() {
            let h = 1e-3f32;
            let (mut up, mut down) = (logits, logits);
            up[i] += h;
            down[i] -= h;
            let fd = (cross_entropy(&up, 4, &labels).unwrap().0 - cross_entropy(&down, 4, &labels).unwrap().0)
                / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-4, "logit {i}: {fd} vs {}", grad[i]);
        }
        // Huge logits: no overflow.
        let (loss, g) = cross_entropy(&[1e30, 0.0], 2, &[1]).unwrap();
        assert!(loss == 1e30f32 as f64 && g == [1.0, -1.0], "{loss} {g:?}");
    }

    #[test]
    fn top_k_counts_ties_by_index_and_bad_batches_are_refused() {
        let mut t = Tally::default();
        // Row 0: label 1 ties with class 0 (lower index ranks first): not top-1, top-5.
        // Row 1: label 0 is the largest.
        t.add_batch(&[1.0, 1.0, 0.0, 2.0, 0.0, 0.0], 3, &[1, 0]).unwrap();
        assert_eq!((t.seen, t.top1, t.top5), (2, 1, 2));
        assert!(t.add_batch(&[0.0; 6], 3, &[3, 0]).is_err());
        assert!(t.add_batch(&[0.0; 5], 3, &[0, 0]).is_err());
        assert!(t.add_batch(&[f32::NAN, 0.0, 0.0], 3, &[0]).is_err());
        let h = [
            Accuracy { epoch: 1, top1: 0.5, top5: 0.9 },
            Accuracy { epoch: 2, top1: 0.7, top5: 0.8 },
            Accuracy { epoch: 3, top1: 0.7, top5: 1.0 },
            Accuracy { epoch: 4, top1: 0.6, top5: 1.0 },
        ];
        let (best, last) = best_and_last(&h).unwrap();
        assert_eq!((best.epoch, last.epoch), (2, 4));
        assert!(best_and_last(&[]).is_none());
        assert!(!loss_far_above_chance(1.2, 3) && loss_far_above_chance(30.0, 3) && loss_far_above_chance(f64::NAN, 3));
    }
}
