//! The learning rate of every iteration, exactly as the official code builds its table:
//! `np.linspace(start_warmup, base_lr, steps_per_epoch * warmup_epochs)` (both ends included), then
//! `final + 0.5 (base - final)(1 + cos(pi t / T))` for `t` in `0..T`, `T = steps_per_epoch * (epochs -
//! warmup_epochs)`. Iterations past the end keep the last value.

/// The per-iteration learning rate table, computed on demand.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of the warm-up.
    pub base_lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub final_lr: f64,
    /// Learning rate at the first warm-up iteration.
    pub start_warmup: f64,
    /// Iterations of linear warm-up (`steps_per_epoch * warmup_epochs`).
    pub warmup_steps: usize,
    /// Iterations of cosine decay after the warm-up.
    pub cosine_steps: usize,
}

impl LrSchedule {
    /// The schedule of a run of `epochs` epochs of `steps_per_epoch` iterations, the first `warmup_epochs` warming up.
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

    /// Iterations covered by the table; later ones keep the last rate.
    pub fn total_steps(&self) -> usize {
        self.warmup_steps + self.cosine_steps
    }

    /// The learning rate of iteration `iteration` (0-based).
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

/// `torch.optim.lr_scheduler.CosineAnnealingLR(T_max = t_max, eta_min)` stepped once per epoch, as
/// the official linear evaluation does: the learning rate of epoch `epoch` (0-based) is
/// `eta_min + (base - eta_min)(1 + cos(pi epoch / t_max)) / 2`. PyTorch computes it recursively, which
/// equals this closed form up to rounding for `epoch <= t_max`; past `t_max` this keeps `eta_min`.
pub fn cosine_annealing(base: f64, eta_min: f64, t_max: usize, epoch: usize) -> f64 {
    if t_max == 0 {
        return base;
    }
    let t = epoch.min(t_max) as f64;
    eta_min + 0.5 * (base - eta_min) * (1.0 + (std::f64::consts::PI * t / t_max as f64).cos())
}

/// `torch.optim.lr_scheduler.MultiStepLR(milestones, gamma)` stepped once per epoch, as the official
/// semi-supervised evaluation does: the learning rate of epoch `epoch` (0-based) is `base` multiplied
/// by `gamma` at each milestone at or before it, in PyTorch's order (one multiplication per milestone
/// epoch, by `gamma^k` for a milestone listed `k` times), so the bits are PyTorch's: `0.02 * 0.2 * 0.2`,
/// not `0.02 * 0.04`.
pub fn multi_step(base: f64, milestones: &[usize], gamma: f64, epoch: usize) -> f64 {
    let mut passed: Vec<usize> = milestones.iter().copied().filter(|&m| m <= epoch).collect();
    passed.sort_unstable();
    let mut lr = base;
    let mut i = 0;
    while i < passed.len() {
        let k = passed[i..].iter().take_while(|&&m| m == passed[i]).count();
        lr *= gamma.powi(k as i32);
        i += k;
    }
    lr
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

    #[test]
    fn per_epoch_schedules_match_pytorch() {
        // CosineAnnealingLR(T_max=100, eta_min=0) from 0.3, PyTorch's recursive form run in f64:
        // lr_e = eta + (lr_{e-1} - eta)(1 + cos(pi e / T)) / (1 + cos(pi (e - 1) / T)).
        let (base, t) = (0.3f64, 100usize);
        let mut torch = base;
        for e in 0..=t {
            if e > 0 {
                let pi = std::f64::consts::PI;
                torch *= (1.0 + (pi * e as f64 / t as f64).cos()) / (1.0 + (pi * (e - 1) as f64 / t as f64).cos());
            }
            assert!((cosine_annealing(base, 0.0, t, e) - torch).abs() < 1e-12, "epoch {e}");
        }
        assert_eq!(cosine_annealing(base, 0.0, t, 0), base);
        assert!((cosine_annealing(base, 0.0, t, 50) - 0.15).abs() < 1e-12);
        assert!((cosine_annealing(base, 0.01, t, 100) - 0.01).abs() < 1e-12);
        assert_eq!(cosine_annealing(base, 0.01, t, 400), cosine_annealing(base, 0.01, t, 100));
        // MultiStepLR([12, 16], 0.2): x1 for epochs 0-11, x0.2 for 12-15, x0.04 from 16.
        let lrs: Vec<f64> = (0..20).map(|e| multi_step(0.01, &[12, 16], 0.2, e)).collect();
        assert!(lrs[..12].iter().all(|&l| l == 0.01));
        assert!(lrs[12..16].iter().all(|&l| l == 0.01 * 0.2));
        assert!(lrs[16..].iter().all(|&l| l == 0.01 * 0.2 * 0.2));
        assert_eq!(multi_step(1.0, &[3, 3], 0.5, 3), 0.25);
    }
}
