//! The collapse watch of a training run: SwAV's usual failure is every image going to a few
//! prototypes, where the loss sits at ln(K). The watch warns with the remedies the official code's
//! issue tracker converged on.

use crate::step::StepStats;

/// Warns (at most once per epoch) when the loss stays within 2% of ln(K) and the codes of a batch use
/// fewer than 10% of the prototypes on average: the signature of a collapse.
pub(crate) struct CollapseWatch {
    ln_k: f64,
    k: usize,
    window: usize,
    losses: Vec<f64>,
    used: Vec<usize>,
    last_warning: Option<usize>,
}

impl CollapseWatch {
    pub(crate) fn new(k: usize, steps_per_epoch: usize) -> CollapseWatch {
        CollapseWatch {
            ln_k: (k as f64).ln(),
            k,
            window: steps_per_epoch.clamp(10, 200),
            losses: Vec::new(),
            used: Vec::new(),
            last_warning: None,
        }
    }

    pub(crate) fn observe(&mut self, iteration: usize, s: &StepStats, active: bool) {
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
