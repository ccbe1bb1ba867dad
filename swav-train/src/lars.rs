//! SGD with momentum wrapped in LARC (apex, `clip=False`), the official SwAV optimiser.
//!
//! Per parameter tensor, when `||w|| > 0` and `||g|| > 0`:
//!   `g <- (g + wd w) * trust ||w|| / (||g|| + wd ||w|| + 1e-8)`
//! otherwise `g` is used unchanged (LARC then applies no weight decay either); the inner SGD has no
//! weight decay of its own: `buf <- momentum buf + g`, `w <- w - lr buf` (PyTorch's SGD; its first
//! step sets `buf = g`, which is the same from a zero buffer). With `lars = false` it is plain SGD with
//! weight decay: `g <- g + wd w`. Frozen parameters are skipped entirely (no decay, no momentum), as a
//! parameter whose `.grad` is `None` in PyTorch.

use std::collections::BTreeMap;

use swav_model::param::{Slot, Visit};
use swav_tensor::Tensor;

/// The optimiser's hyper-parameters and state (one momentum buffer per parameter).
#[derive(Clone, Debug)]
pub struct Lars {
    /// Momentum of the inner SGD.
    pub momentum: f64,
    /// Weight decay, applied inside the LARC scaling (or plainly when `lars` is false).
    pub weight_decay: f64,
    /// LARC trust coefficient.
    pub trust_coefficient: f64,
    /// Whether LARC scaling is applied; false gives plain SGD with weight decay.
    pub lars: bool,
    /// Momentum buffer of each parameter, by name.
    pub buffers: BTreeMap<String, Tensor>,
}

const LARC_EPS: f64 = 1e-8;

impl Lars {
    /// An optimiser with empty momentum buffers (created on each parameter's first step).
    pub fn new(momentum: f64, weight_decay: f64, trust_coefficient: f64, lars: bool) -> Lars {
        Lars { momentum, weight_decay, trust_coefficient, lars, buffers: BTreeMap::new() }
    }

    /// One step over every parameter of `model` except those for which `frozen(name)` is true.
    pub fn step(&mut self, model: &mut impl Visit, lr: f64, frozen: impl Fn(&str) -> bool) {
        model.visit("", &mut |name, slot| {
            let Slot::Param(p) = slot else { return };
            if frozen(name) {
                return;
            }
            let (wd, mom) = (self.weight_decay as f32, self.momentum as f32);
            let w = p.value.as_slice();
            let g = p.grad.as_slice();
            let scale = if self.lars {
                let (wn, gn) = (p.value.norm(), p.grad.norm());
                (wn > 0.0 && gn > 0.0)
                    .then(|| (self.trust_coefficient * wn / (gn + self.weight_decay * wn + LARC_EPS)) as f32)
            } else {
                Some(1.0)
            };
            let buf = self
                .buffers
                .entry(name.to_string())
                .or_insert_with(|| Tensor::zeros(p.value.shape(), p.value.device()));
            let b = buf.as_mut_slice();
            match scale {
                Some(s) => {
                    for ((bv, &gv), &wv) in b.iter_mut().zip(g).zip(w) {
                        *bv = mom * *bv + (gv + wd * wv) * s;
                    }
                }
                None => {
                    for (bv, &gv) in b.iter_mut().zip(g) {
                        *bv = mom * *bv + gv;
                    }
                }
            }
            let lr = lr as f32;
            for (wv, &bv) in p.value.as_mut_slice().iter_mut().zip(b.iter()) {
                *wv -= lr * bv;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swav_model::param::{Layout, Param, Visitor};

    struct Two {
        a: Param,
        b: Param,
    }
    impl Visit for Two {
        fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
            f(&format!("{prefix}a"), Slot::Param(&mut self.a));
            f(&format!("{prefix}b"), Slot::Param(&mut self.b));
        }
    }

    fn param(v: &[f32], g: &[f32]) -> Param {
        let mut p = Param::new(Tensor::from_slice(&[v.len()], v).unwrap(), Layout::Plain);
        p.grad = Tensor::from_slice(&[g.len()], g).unwrap();
        p
    }

    #[test]
    fn two_steps_match_the_larc_formula_in_f64() {
        let (w0, g) = ([3.0f32, -4.0], [0.5f32, 1.0]);
        let mut m = Two { a: param(&w0, &g), b: param(&[1.0, 1.0], &[0.0, 0.0]) };
        let mut opt = Lars::new(0.9, 1e-2, 0.001, true);
        let (wd, lr) = (1e-2f64, 0.5f64);
        // Reference in f64.
        let mut w: Vec<f64> = w0.iter().map(|&v| v as f64).collect();
        let mut buf = [0.0f64; 2];
        for _ in 0..2 {
            opt.step(&mut m, lr, |_| false);
            let wn = (w[0] * w[0] + w[1] * w[1]).sqrt();
            let gn = ((g[0] as f64).powi(2) + (g[1] as f64).powi(2)).sqrt();
            let s = 0.001 * wn / (gn + wd * wn + 1e-8);
            for i in 0..2 {
                buf[i] = 0.9 * buf[i] + (g[i] as f64 + wd * w[i]) * s;
                w[i] -= lr * buf[i];
            }
        }
        for i in 0..2 {
            assert!((m.a.value.as_slice()[i] as f64 - w[i]).abs() < 1e-6, "{:?} vs {w:?}", m.a.value.as_slice());
        }
        // A zero gradient: LARC leaves g (= 0) alone and applies no weight decay.
        assert_eq!(m.b.value.as_slice(), &[1.0, 1.0]);
    }

    #[test]
    fn frozen_parameters_are_untouched() {
        let mut m = Two { a: param(&[1.0, 2.0], &[1.0, 1.0]), b: param(&[1.0, 2.0], &[1.0, 1.0]) };
        let mut opt = Lars::new(0.9, 1e-6, 0.001, true);
        opt.step(&mut m, 1.0, |n| n == "b");
        assert_ne!(m.a.value.as_slice(), &[1.0, 2.0]);
        assert_eq!(m.b.value.as_slice(), &[1.0, 2.0]);
        assert!(!opt.buffers.contains_key("b"));
    }

    #[test]
    fn plain_sgd_applies_weight_decay_to_the_gradient() {
        let mut m = Two { a: param(&[2.0], &[1.0]), b: param(&[0.0], &[0.0]) };
        let mut opt = Lars::new(0.0, 0.5, 0.001, false);
        opt.step(&mut m, 0.1, |_| false);
        assert!((m.a.value.as_slice()[0] - (2.0 - 0.1 * (1.0 + 0.5 * 2.0))).abs() < 1e-6);
    }
}
