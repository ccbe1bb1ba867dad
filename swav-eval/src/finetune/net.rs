//! The fine-tuned network and its training step: the pretrained backbone plus a new linear head,
//! both trained, named as torchvision's ResNet (`conv1.weight`, ..., `fc.weight`, `fc.bias`) so that
//! its model files load anywhere a torchvision state dict does (swav-rs's `ModelFile` reads the
//! backbone and leaves `fc` out).
//!
//! The step follows `eval_semisup.py`'s `train()`: training-mode forward (batch statistics, running
//! statistics updated), `CrossEntropyLoss`, backward through head and backbone, one SGD step with two
//! parameter groups: the trunk at `lr_trunk`, the head (`fc.*`, the official `'head' in name`) at
//! `lr_head`, the same momentum and weight decay (official: 0.9 and 0). PyTorch's SGD is
//! `swav_train::lars::Lars` without LARC; its momentum buffers are keyed by parameter name, so one
//! optimiser serves both groups.

use swav_model::init::InitRng;
use swav_model::layers::Linear;
use swav_model::param::{Visit, Visitor};
use swav_model::resnet::ResNet;
use swav_tensor::Tensor;
use swav_train::lars::Lars;

use crate::classifier::cross_entropy;
use crate::EvalError;

/// The prefix of the head's parameter names.
pub const HEAD: &str = "fc.";

/// Whether a parameter belongs to the head group (learning rate `lr_head`).
pub fn is_head(name: &str) -> bool {
    name.starts_with(HEAD)
}

/// Backbone + linear head.
#[derive(Clone, Debug)]
pub struct Classifier {
    /// The pretrained ResNet, fine-tuned.
    pub backbone: ResNet,
    /// `Linear(features, classes)`, new.
    pub fc: Linear,
}

/// Stream tag of the head's initialisation ("FC" in ASCII).
const FC_STREAM: u64 = 0x4643;

impl Classifier {
    /// `backbone` with a new head of `classes` outputs, initialised as PyTorch's `nn.Linear`
    /// (`U(-1/sqrt(F), 1/sqrt(F))` for weight and bias, as the official head, which keeps its default
    /// initialisation), drawn from `seed`.
    pub fn new(backbone: ResNet, classes: usize, seed: u64) -> Classifier {
        let features = backbone.out_channels();
        let fc = Linear::new(features, classes, true, &mut InitRng::new(seed ^ FC_STREAM));
        Classifier { backbone, fc }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.fc.weight.value.dim(0)
    }

    /// Evaluation-mode logits `[n, classes]` of NHWC images.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.fc.forward(&self.backbone.forward_eval(images)?)?)
    }
}

impl Visit for Classifier {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        self.backbone.visit(prefix, f);
        self.fc.visit(&format!("{prefix}{HEAD}"), f);
    }
}

/// One training step on a batch (see the module docs). Returns the batch's mean loss and its
/// training-mode logits.
pub fn train_step(
    net: &mut Classifier,
    opt: &mut Lars,
    images: Tensor,
    labels: &[u32],
    lr_trunk: f64,
    lr_head: f64,
) -> Result<(f64, Tensor), EvalError> {
    net.zero_grad();
    let (features, acts) = net.backbone.forward_train(images)?;
    let logits = net.fc.forward(&features)?;
    let (loss, grad) = cross_entropy(logits.as_slice(), net.classes(), labels)?;
    let dlogits = Tensor::from_vec(logits.shape(), grad)?;
    let dfeatures = net.fc.backward(&features, &dlogits, true)?.expect("dx requested");
    net.backbone.backward(acts, &dfeatures)?;
    opt.step(net, lr_trunk, is_head);
    opt.step(net, lr_head, |name| !is_head(name));
    Ok((loss, logits))
}
