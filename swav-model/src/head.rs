//! The SwAV projection head and prototypes (official names `projection_head.*`, `prototypes.*`).
//!
//! Head: `Linear(features -> hidden_mlp) - BatchNorm1d - ReLU - Linear(hidden_mlp -> feat_dim)`
//! (`projection_head.0 / .1 / .3`); without the BN: `projection_head.0 / .2`; with `hidden_mlp = 0` a
//! single `Linear` named `projection_head`. Prototypes: bias-free `Linear(feat_dim -> K)` named
//! `prototypes` (one head) or `prototypes.prototypes{i}` (several heads, as the official
//! `MultiPrototypes`).

use swav_tensor::ops::batchnorm::{BnCache, Fused};
use swav_tensor::ops::elementwise::{relu_backward, relu_forward};
use swav_tensor::Tensor;

use crate::config::ModelConfig;
use crate::init::InitRng;
use crate::layers::{BatchNorm, Linear};
use crate::param::{Visit, Visitor};
use crate::Result;

/// The projection head from the backbone's pooled features to the `feat_dim` embedding (before its L2
/// normalisation).
// One head per model: boxing the larger variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ProjectionHead {
    /// `fc1 - [bn] - ReLU - fc2`, with `hidden_mlp` hidden units.
    Mlp {
        /// Features to `hidden_mlp`.
        fc1: Linear,
        /// BatchNorm1d on the hidden units, fused with the ReLU (absent without `head_bn`).
        bn: Option<BatchNorm>,
        /// `hidden_mlp` to `feat_dim`.
        fc2: Linear,
    },
    /// A single linear layer from the features to `feat_dim` (`hidden_mlp = 0`).
    Linear(Linear),
}

/// What [`ProjectionHead::backward`] needs from [`ProjectionHead::forward_train`].
pub struct HeadActs {
    input: Tensor,
    hidden: Option<(Tensor, Tensor, Option<BnCache>)>,
}

impl ProjectionHead {
    /// The head `cfg` describes on `features` input channels, initialised from `rng`.
    pub fn new(cfg: &ModelConfig, features: usize, rng: &mut InitRng) -> ProjectionHead {
        if cfg.hidden_mlp == 0 {
            return ProjectionHead::Linear(Linear::new(features, cfg.feat_dim, true, rng));
        }
        let fc1 = Linear::new(features, cfg.hidden_mlp, true, rng);
        let bn = cfg.head_bn.then(|| BatchNorm::new(cfg.hidden_mlp));
        let fc2 = Linear::new(cfg.hidden_mlp, cfg.feat_dim, true, rng);
        ProjectionHead::Mlp { fc1, bn, fc2 }
    }

    /// Training mode (the batch norm uses and updates batch statistics): `x: [rows, features]` to
    /// `[rows, feat_dim]`, with the activations for the backward (which keep `x`).
    pub fn forward_train(&mut self, x: Tensor) -> Result<(Tensor, HeadActs)> {
        match self {
            ProjectionHead::Linear(fc) => Ok((fc.forward(&x)?, HeadActs { input: x, hidden: None })),
            ProjectionHead::Mlp { fc1, bn, fc2 } => {
                let h = fc1.forward(&x)?;
                let (a, cache) = match bn {
                    Some(bn) => {
                        let (a, c) = bn.forward_train(&h, None, true)?;
                        (a, Some(c))
                    }
                    None => (relu_forward(&h)?, None),
                };
                let out = fc2.forward(&a)?;
                Ok((out, HeadActs { input: x, hidden: Some((h, a, cache)) }))
            }
        }
    }

    /// Evaluation mode (running statistics): `x: [rows, features]` to `[rows, feat_dim]`.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ProjectionHead::Linear(fc) => fc.forward(x),
            ProjectionHead::Mlp { fc1, bn, fc2 } => {
                let h = fc1.forward(x)?;
                let a = match bn {
                    Some(bn) => bn.forward_eval(&h, None, true)?,
                    None => relu_forward(&h)?,
                };
                fc2.forward(&a)
            }
        }
    }

    /// Accumulates the head's parameter gradients from `dout`, the gradient of its output; returns the
    /// gradient of its input (the backbone features).
    pub fn backward(&mut self, acts: HeadActs, dout: &Tensor) -> Result<Tensor> {
        match (self, acts.hidden) {
            (ProjectionHead::Linear(fc), _) => Ok(fc.backward(&acts.input, dout, true)?.expect("dx requested")),
            (ProjectionHead::Mlp { fc1, bn, fc2 }, Some((h, a, cache))) => {
                let da = fc2.backward(&a, dout, true)?.expect("dx requested");
                let dh = match (bn, cache) {
                    (Some(bn), Some(cache)) => bn.backward(&h, &a, &da, &cache, Fused::RELU)?.0,
                    _ => relu_backward(&a, &da)?,
                };
                Ok(fc1.backward(&acts.input, &dh, true)?.expect("dx requested"))
            }
            (ProjectionHead::Mlp { .. }, None) => unreachable!("an MLP head's forward keeps its hidden activations"),
        }
    }
}

impl Visit for ProjectionHead {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        match self {
            ProjectionHead::Linear(fc) => fc.visit(&format!("{prefix}projection_head."), f),
            ProjectionHead::Mlp { fc1, bn, fc2 } => {
                fc1.visit(&format!("{prefix}projection_head.0."), f);
                match bn {
                    Some(bn) => {
                        bn.visit(&format!("{prefix}projection_head.1."), f);
                        fc2.visit(&format!("{prefix}projection_head.3."), f);
                    }
                    None => fc2.visit(&format!("{prefix}projection_head.2."), f),
                }
            }
        }
    }
}

/// One or several bias-free linear heads on the normalised embedding.
#[derive(Clone, Debug)]
pub struct Prototypes {
    /// One `Linear(feat_dim -> K)` without bias per entry of the configuration's `prototypes`; the
    /// rows of a weight are the prototypes.
    pub heads: Vec<Linear>,
}

impl Prototypes {
    /// The prototype heads `cfg` describes, initialised from `rng` (not yet normalised).
    pub fn new(cfg: &ModelConfig, rng: &mut InitRng) -> Prototypes {
        Prototypes { heads: cfg.prototypes.iter().map(|&k| Linear::new(cfg.feat_dim, k, false, rng)).collect() }
    }

    /// Scales every prototype (row) to unit L2 norm, as the official code does before each step.
    pub fn normalize(&mut self) -> Result<()> {
        for head in &mut self.heads {
            if head.weight.value.runtime().is_some() {
                // In place: the weight keeps its (persistent) block.
                let normalized = swav_tensor::ops::normalize::l2_normalize_forward(&head.weight.value)?.0;
                head.weight.value.copy_from(&normalized)?;
                continue;
            }
            let d = head.weight.value.dim(1);
            for row in head.weight.value.as_mut_slice().chunks_exact_mut(d) {
                let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt() as f32;
                let inv = 1.0 / norm.max(swav_tensor::ops::normalize::NORM_EPS);
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
        Ok(())
    }
}

impl Visit for Prototypes {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        if self.heads.len() == 1 {
            self.heads[0].visit(&format!("{prefix}prototypes."), f);
        } else {
            for (i, head) in self.heads.iter_mut().enumerate() {
                head.visit(&format!("{prefix}prototypes.prototypes{i}."), f);
            }
        }
    }
}
