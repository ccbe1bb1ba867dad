//! The learning rate of every iteration, exactly as the official code builds its table:
//! `np.linspace(start_warmup, base_lr, steps_per_epoch * warmup_epochs)` (both ends included), then
//! `final + 0.5 (base - final)(1 + cos(pi t / T))` for `t` in `0..T`, `T = steps_per_epoch * (epochs -
//! warmup_epochs)`. Iterations past the end keep the last value.

#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub final_lr: f64,
    pub start_warmup: f64,
    pub warmup_steps: usize,
    pub cosine_steps: usize,
}

impl LrSchedule {
    pub fn new(
        base_lr: f64,
        final_lr: f64,
        start_warmup: f64,
        warmup_epochs: usize,
        epochs: usize,
        steps_per_epoch: usize,
    ) -> Self {
        LrSchedule {
            base_lr,
            final_lr,
            start_warmup,
            warmup_steps: steps_per_epoch * warmup_epochs,
            cosine_steps: steps_per_epoch * epochs.saturating_sub(warmup_epochs),
        }
    }

    pub fn total_steps(&self) -> usize {
        self.warmup_steps + self.cosine_steps
    }

    pub fn lr(&self, iteration: usize) -> f64 {
        if iteration < self.warmup_steps {
            if self.warmup_steps == 1 {
                return self.start_warmup;
            }
            let f = iteration as f64 / (self.warmup_steps - 1) as f64;
            return self.start_warmup + (self.base_lr - self.start_warmup) * f;
        }
        if self.cosine_steps == 0 {
            return self.base_lr;
        }
        let t = (iteration - self.warmup_steps).min(self.cosine_steps - 1) as f64;
        let progress = std::f64::consts::PI * t / self.cosine_steps as f64;
        self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1.0 + progress.cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_official_table() {
        // warm-up of 2 epochs x 5 steps from 0.3 to 4.8 (linspace includes both ends), then cosine.
        let s = LrSchedule::new(4.8, 0.0048, 0.3, 2, 6, 5);
        assert_eq!(s.total_steps(), 30);
        assert!((s.lr(0) - 0.3).abs() < 1e-12);
        assert!((s.lr(9) - 4.8).abs() < 1e-12);
        assert!((s.lr(4) - (0.3 + 4.5 * 4.0 / 9.0)).abs() < 1e-12);
        assert!((s.lr(10) - 4.8).abs() < 1e-12);
        let t = 7.0;
        let want = 0.0048 + 0.5 * (4.8 - 0.0048) * (1.0 + (std::f64::consts::PI * t / 20.0).cos());
        assert!((s.lr(17) - want).abs() < 1e-12);
        assert!(s.lr(29) > 0.0048 && s.lr(29) < 0.05);
        assert_eq!(s.lr(500), s.lr(29));
        // No warm-up: starts at base_lr.
        let s = LrSchedule::new(0.6, 0.0006, 0.0, 0, 4, 3);
        assert!((s.lr(0) - 0.6).abs() < 1e-12);
    }
}
