//! The whole SwAV network and its multi-crop forward, as the official `ResNet.forward`:
//! crops arrive grouped by resolution (one tensor `[count * batch, h, w, c]` per run of equal size);
//! the backbone runs once per group (so batch-norm statistics are per group), the pooled features of
//! all groups are concatenated, and the head, the L2 normalisation and the prototypes run once on all
//! of them. Returns the embeddings `z` and the scores `z C^T` of each prototype head.

use swav_tensor::ops::normalize::{l2_normalize_backward, l2_normalize_forward};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::{Device, Tensor};

use crate::config::ModelConfig;
use crate::head::{HeadActs, ProjectionHead, Prototypes};
use crate::init::InitRng;
use crate::param::{GradReady, Slot, Visit, Visitor};
use crate::resnet::{ResNet, ResNetActs};
use crate::{ModelError, Result};

/// The SwAV network: ResNet backbone, projection head and prototypes.
#[derive(Clone, Debug)]
pub struct SwavModel {
    /// The configuration the network was built from.
    pub config: ModelConfig,
    /// The ResNet, whose pooled features are the representation evaluated downstream.
    pub backbone: ResNet,
    /// The projection head on the backbone features.
    pub head: ProjectionHead,
    /// The prototype heads on the normalised embedding.
    pub prototypes: Prototypes,
}

/// Outputs of one multi-crop forward, rows in crop order (the groups' rows concatenated).
pub struct SwavOutput {
    /// L2-normalised embeddings `[rows, feat_dim]`.
    pub embedding: Tensor,
    /// `embedding . C_h^T` for each prototype head `h`: `[rows, K_h]`.
    pub scores: Vec<Tensor>,
}

/// What [`SwavModel::backward`] needs from [`SwavModel::forward_train`].
pub struct SwavActs {
    backbone: Vec<ResNetActs>,
    group_rows: Vec<usize>,
    head: HeadActs,
    norms: Tensor,
}

impl SwavModel {
    /// A network built from `config` on the CPU, initialised deterministically from `seed` (see
    /// [`crate::init`]); refuses an invalid configuration ([`ModelError::Config`]).
    pub fn new(config: ModelConfig, seed: u64) -> Result<SwavModel> {
        config.validate()?;
        let mut rng = InitRng::new(seed);
        let backbone = ResNet::new(&config, &mut rng)?;
        let head = ProjectionHead::new(&config, backbone.out_channels(), &mut rng);
        let prototypes = Prototypes::new(&config, &mut rng);
        Ok(SwavModel { config, backbone, head, prototypes })
    }

    /// Training-mode forward of crop groups `[count * batch, h, w, c]` (NHWC), in crop order.
    pub fn forward_train(&mut self, groups: Vec<Tensor>) -> Result<(SwavOutput, SwavActs)> {
        if groups.is_empty() {
            return Err(ModelError::Input("no crops to forward".into()));
        }
        let mut features = Vec::with_capacity(groups.len());
        let mut backbone = Vec::with_capacity(groups.len());
        let mut group_rows = Vec::with_capacity(groups.len());
        for g in groups {
            group_rows.push(g.dim(0));
            let (f, acts) = self.backbone.forward_train(g)?;
            features.push(f);
            backbone.push(acts);
        }
        let features = Tensor::cat(&features.iter().collect::<Vec<_>>())?;
        let (h, head) = self.head.forward_train(features)?;
        let (embedding, norms) = l2_normalize_forward(&h)?;
        let scores = self.prototypes.heads.iter().map(|p| p.forward(&embedding)).collect::<Result<Vec<_>>>()?;
        Ok((SwavOutput { embedding, scores }, SwavActs { backbone, group_rows, head, norms }))
    }

    /// Accumulates all parameter gradients from the gradients of the scores (one per head).
    pub fn backward(&mut self, acts: SwavActs, out: &SwavOutput, dscores: &[Tensor]) -> Result<()> {
        self.backward_with(acts, out, dscores, None)
    }

    /// [`SwavModel::backward`], handing each part of the model to `ready` as soon as its gradients are
    /// final: the prototypes and the projection head first, then the backbone's blocks from the last
    /// during the last crop group's backward, the stem at the end. Every parameter is handed over once.
    pub fn backward_with(
        &mut self,
        acts: SwavActs,
        out: &SwavOutput,
        dscores: &[Tensor],
        mut ready: Option<&mut GradReady<'_>>,
    ) -> Result<()> {
        if dscores.len() != self.prototypes.heads.len() {
            return Err(ModelError::Input(format!(
                "{} score gradients for {} prototype heads",
                dscores.len(),
                self.prototypes.heads.len()
            )));
        }
        let mut dz = Tensor::zeros(out.embedding.shape(), out.embedding.device());
        for (head, ds) in self.prototypes.heads.iter_mut().zip(dscores) {
            dz.add_assign(&head.backward(&out.embedding, ds, true)?.expect("dx requested"))?;
        }
        let dh = l2_normalize_backward(&out.embedding, &acts.norms, &dz)?;
        if let Some(ready) = ready.as_mut() {
            ready("", &mut self.prototypes);
        }
        let dfeatures = self.head.backward(acts.head, &dh)?;
        if let Some(ready) = ready.as_mut() {
            ready("", &mut self.head);
        }
        let groups = acts.backbone.len();
        let mut start = 0;
        for (g, (bb_acts, rows)) in acts.backbone.into_iter().zip(acts.group_rows).enumerate() {
            let d = dfeatures.narrow(start, rows)?;
            // Only the last group's backward leaves a block's gradients final.
            let ready = if g + 1 == groups { ready.as_deref_mut() } else { None };
            self.backbone.backward_with(bb_acts, &d, ready)?;
            start += rows;
        }
        Ok(())
    }

    /// Pooled backbone features in evaluation mode `[n, channels]`.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        self.backbone.forward_eval(images)
    }

    /// Evaluation-mode features, embeddings and scores.
    pub fn forward_eval(&self, images: &Tensor) -> Result<(Tensor, SwavOutput)> {
        let features = self.backbone.forward_eval(images)?;
        let (embedding, _) = l2_normalize_forward(&self.head.forward_eval(&features)?)?;
        let scores = self.prototypes.heads.iter().map(|p| p.forward(&embedding)).collect::<Result<Vec<_>>>()?;
        Ok((features, SwavOutput { embedding, scores }))
    }

    /// The convolution algorithms the backbone may use (all give the convolution; they differ in
    /// speed and in the last bits, so a training run records its choice).
    pub fn set_conv_algorithm(&mut self, algo: ConvAlgorithm) {
        self.backbone.set_conv_algorithm(algo);
    }

    /// What the backbone's convolutions multiply on the CPU: f32, or factors rounded to bf16 with fp32
    /// accumulation (the head stays f32).
    pub fn set_conv_precision(&mut self, precision: swav_tensor::matmul::MulPrecision) {
        self.backbone.set_conv_precision(precision);
    }

    /// The shape of every backbone convolution for `n` images of `h x w` (see [`ResNet::conv_geometries`]).
    pub fn conv_geometries(&self, n: usize, h: usize, w: usize) -> Result<Vec<swav_tensor::ops::conv::ConvGeom>> {
        self.backbone.conv_geometries(n, h, w)
    }

    /// Makes every batch norm (backbone and head) share its training statistics with the ranks of
    /// `group` (SyncBatchNorm); `None` goes back to per-process statistics. Every rank must run the same
    /// forwards and backwards in the same order, since each batch norm is a collective.
    pub fn set_sync_batchnorm(&mut self, group: Option<std::sync::Arc<dyn swav_tensor::Collective>>) {
        let mut bns = self.backbone.batchnorms_mut();
        if let crate::head::ProjectionHead::Mlp { bn: Some(bn), .. } = &mut self.head {
            bns.push(bn);
        }
        for bn in bns {
            bn.sync = group.clone();
        }
    }

    /// The storage of the head's and the prototypes' GEMM inputs: `DType::Bf16` under mixed precision
    /// on a CUDA device (fp32 accumulation and outputs), `DType::F32` otherwise (the default).
    pub fn set_linear_compute(&mut self, compute: swav_tensor::DType) {
        match &mut self.head {
            crate::head::ProjectionHead::Mlp { fc1, fc2, .. } => {
                fc1.compute = compute;
                fc2.compute = compute;
            }
            crate::head::ProjectionHead::Linear(fc) => fc.compute = compute,
        }
        for p in &mut self.prototypes.heads {
            p.compute = compute;
        }
    }

    /// Scales every prototype to unit L2 norm.
    pub fn normalize_prototypes(&mut self) -> Result<()> {
        self.prototypes.normalize()
    }

    /// Moves every parameter, gradient and running statistic to `device` (batch counters stay on the
    /// host). The model then runs every op on that device.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        let mut error = None;
        self.visit("", &mut |name, slot| {
            if error.is_some() {
                return;
            }
            let moved = match slot {
                Slot::Param(p) => {
                    p.value.to_device(device).and_then(|v| Ok((v, p.grad.to_device(device)?))).map(|(v, g)| {
                        p.value = v;
                        p.grad = g;
                    })
                }
                Slot::Buffer(t) => t.to_device(device).map(|v| *t = v),
                Slot::Counter(_) => Ok(()),
            };
            if let Err(e) = moved {
                error = Some(ModelError::Input(format!("moving `{name}` to {device}: {e}")));
            }
        });
        error.map_or(Ok(()), Err)
    }

    /// Where the model's parameters are.
    pub fn device(&self) -> Device {
        self.prototypes.heads.first().map_or(Device::Cpu, |h| h.weight.value.device())
    }
}

impl Visit for SwavModel {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        self.backbone.visit(prefix, f);
        self.head.visit(prefix, f);
        self.prototypes.visit(prefix, f);
    }
}
