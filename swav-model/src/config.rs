//! What network to build. Serialisable, so presets and checkpoints carry it (TOML / JSON).

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The backbones of the paper and torchvision (feature channels below are at the arch's default width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// ResNet-18: basic blocks, depths 2-2-2-2, 512 feature channels.
    Resnet18,
    /// ResNet-34: basic blocks, depths 3-4-6-3, 512 feature channels.
    Resnet34,
    /// ResNet-50: bottleneck blocks, depths 3-4-6-3, 2048 feature channels.
    Resnet50,
    /// ResNet-50 twice as wide (width 128, 4096 feature channels).
    Resnet50w2,
    /// ResNet-50 four times as wide (width 256, 8192 feature channels).
    Resnet50w4,
    /// ResNet-50 five times as wide (width 320, 10240 feature channels).
    Resnet50w5,
}

/// The residual block of a ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions, no expansion (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 convolutions with 4x expansion (ResNet-50 and its wide variants).
    Bottleneck,
}

impl Arch {
    /// The arch of a name as [`Arch::name`] gives it (`resnet50`, ...); any other name is
    /// [`ModelError::Config`].
    pub fn parse(name: &str) -> Result<Arch, ModelError> {
        Ok(match name {
            "resnet18" => Arch::Resnet18,
            "resnet34" => Arch::Resnet34,
            "resnet50" => Arch::Resnet50,
            "resnet50w2" => Arch::Resnet50w2,
            "resnet50w4" => Arch::Resnet50w4,
            "resnet50w5" => Arch::Resnet50w5,
            other => {
                return Err(ModelError::Config(format!(
                    "unknown arch `{other}` (expected resnet18, resnet34, resnet50, resnet50w2, resnet50w4, resnet50w5)"
                )))
            }
        })
    }

    /// The name used in configurations and metadata (`resnet50`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Resnet50w2 => "resnet50w2",
            Arch::Resnet50w4 => "resnet50w4",
            Arch::Resnet50w5 => "resnet50w5",
        }
    }

    /// The kind of residual block.
    pub fn block(self) -> BlockKind {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => BlockKind::Basic,
            _ => BlockKind::Bottleneck,
        }
    }

    /// Blocks in each of the four stages.
    pub fn depths(self) -> [usize; 4] {
        match self {
            Arch::Resnet18 => [2, 2, 2, 2],
            _ => [3, 4, 6, 3],
        }
    }

    /// Channels of the stem and of the first stage's blocks (64 x the widening factor).
    pub fn default_width(self) -> usize {
        match self {
            Arch::Resnet50w2 => 128,
            Arch::Resnet50w4 => 256,
            Arch::Resnet50w5 => 320,
            _ => 64,
        }
    }
}

fn default_in_channels() -> usize {
    3
}

fn default_true() -> bool {
    true
}

/// Backbone, projection head and prototypes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The backbone.
    pub arch: Arch,
    /// Channels of the stem and first stage; later stages double it. Defaults to the arch's (64 for
    /// ResNet-18/34/50); smaller values make narrow networks for CPU budgets.
    #[serde(default)]
    pub width: Option<usize>,
    /// 3x3 stride-1 stem without max-pool, for images of about 32 px.
    #[serde(default)]
    pub small_stem: bool,
    /// Channels of the input images (3 by default).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Hidden units of the projection head; 0 makes the head a single linear layer.
    pub hidden_mlp: usize,
    /// BatchNorm1d between the head's two linear layers (the official head has it).
    #[serde(default = "default_true")]
    pub head_bn: bool,
    /// Dimension of the embedding (the official `feat_dim`, 128).
    pub feat_dim: usize,
    /// Number of prototypes of each head (one head: `[3000]`).
    pub prototypes: Vec<usize>,
    /// Batch norms use the statistics of the batches of several ranks in a distributed training
    /// (SyncBatchNorm; the official scripts' `--sync_bn`). No effect on one process or in evaluation.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync_bn: bool,
    /// Ranks per SyncBatchNorm group, consecutive ranks together (apex's `syncbn_process_group_size`);
    /// 0 means every rank of the run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sync_bn_group: usize,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl ModelConfig {
    /// The official SwAV ResNet-50: head 2048-2048-128, 3000 prototypes.
    pub fn swav_resnet50() -> ModelConfig {
        ModelConfig {
            arch: Arch::Resnet50,
            width: None,
            small_stem: false,
            in_channels: 3,
            hidden_mlp: 2048,
            head_bn: true,
            feat_dim: 128,
            prototypes: vec![3000],
            sync_bn: false,
            sync_bn_group: 0,
        }
    }

    /// Channels of the stem and first stage: `width`, else the arch's default.
    pub fn width(&self) -> usize {
        self.width.unwrap_or(self.arch.default_width())
    }

    /// Channels of the pooled backbone features.
    pub fn feature_dim(&self) -> usize {
        let expansion = if self.arch.block() == BlockKind::Bottleneck { 4 } else { 1 };
        self.width() * 8 * expansion
    }

    /// The same network under its one canonical description: the arch that names the width
    /// (`resnet50` at width 128 is `resnet50w2`) and `width` only where it is not the arch's default.
    /// Two configurations build the same network exactly when their canonical forms are equal, which
    /// is what a configuration detected from a state dict (always canonical) is compared with.
    /// `head_bn` is `true` when the head is a single linear layer (`hidden_mlp = 0`), where it has no
    /// effect.
    pub fn canonical(&self) -> ModelConfig {
        let width = self.width();
        let arch = match (self.arch.block(), width) {
            (BlockKind::Bottleneck, 64) => Arch::Resnet50,
            (BlockKind::Bottleneck, 128) => Arch::Resnet50w2,
            (BlockKind::Bottleneck, 256) => Arch::Resnet50w4,
            (BlockKind::Bottleneck, 320) => Arch::Resnet50w5,
            (BlockKind::Bottleneck, _) => Arch::Resnet50,
            (BlockKind::Basic, _) => self.arch,
        };
        let width = (width != arch.default_width()).then_some(width);
        let head_bn = self.head_bn || self.hidden_mlp == 0;
        ModelConfig { arch, width, head_bn, ..self.clone() }
    }

    /// Number of values in the model's state (parameters, running statistics and batch counters), by
    /// arithmetic on the configuration alone: a file's claims are checked with it before a network is
    /// allocated. In u128, so that absurd configurations cannot overflow.
    pub fn state_values(&self) -> u128 {
        self.backbone_state_values() + self.head_state_values()
    }

    /// The part of [`ModelConfig::state_values`] in the backbone (`conv1`, `bn1`, `layer*`): what a
    /// backbone-only file must hold.
    pub fn backbone_state_values(&self) -> u128 {
        self.backbone_values().0
    }

    /// The part of [`ModelConfig::state_values`] in the projection head and the prototypes.
    pub fn head_state_values(&self) -> u128 {
        let bn = |c: u128| 4 * c + 1;
        let (f, h, d) = (self.backbone_values().1, self.hidden_mlp as u128, self.feat_dim as u128);
        let head = if h == 0 { f * d + d } else { f * h + h + h * d + d + if self.head_bn { bn(h) } else { 0 } };
        head + self.prototypes.iter().map(|&k| k as u128 * d).sum::<u128>()
    }

    /// (values of the backbone's state, channels of its features).
    fn backbone_values(&self) -> (u128, u128) {
        let w = self.width() as u128;
        let conv = |cin: u128, cout: u128, k: u128| cin * cout * k * k;
        let bn = |c: u128| 4 * c + 1;
        let stem_k = if self.small_stem { 3 } else { 7 };
        let mut total = conv(self.in_channels as u128, w, stem_k) + bn(w);
        let mut cin = w;
        for (s, &depth) in self.arch.depths().iter().enumerate() {
            let planes = w << s;
            for b in 0..depth {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let cout = match self.arch.block() {
                    BlockKind::Basic => {
                        total += conv(cin, planes, 3) + conv(planes, planes, 3) + 2 * bn(planes);
                        planes
                    }
                    BlockKind::Bottleneck => {
                        total += conv(cin, planes, 1) + conv(planes, planes, 3) + conv(planes, 4 * planes, 1);
                        total += 2 * bn(planes) + bn(4 * planes);
                        4 * planes
                    }
                };
                if stride != 1 || cin != cout {
                    total += conv(cin, cout, 1) + bn(cout);
                }
                cin = cout;
            }
        }
        (total, cin)
    }

    /// Activation values one image of `size x size` pixels produces in a training-mode forward of the
    /// backbone (every convolution's output, which the batch norm after it keeps too), by arithmetic on
    /// the configuration: with [`ModelConfig::state_values`], the basis of a run's memory estimate.
    pub fn activation_values(&self, size: usize) -> u128 {
        self.conv_outputs(size).iter().sum()
    }

    /// The largest convolution output of one image of `size x size` pixels: an evaluation-mode forward
    /// holds a few of these at a time.
    pub fn peak_activation_values(&self, size: usize) -> u128 {
        self.conv_outputs(size).into_iter().max().unwrap_or(0)
    }

    /// The number of values of every convolution's output, for one image of `size x size` pixels.
    fn conv_outputs(&self, size: usize) -> Vec<u128> {
        let out = |s: u128, k: u128, stride: u128, pad: u128| (s + 2 * pad).saturating_sub(k) / stride + 1;
        let w = self.width() as u128;
        let mut s = size as u128;
        let mut outputs = Vec::new();
        if self.small_stem {
            outputs.push(s * s * w);
        } else {
            s = out(s, 7, 2, 3);
            outputs.push(s * s * w);
            s = out(s, 3, 2, 1);
        }
        let mut cin = w;
        for (stage, &depth) in self.arch.depths().iter().enumerate() {
            let planes = w << stage;
            for b in 0..depth {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let so = out(s, 3, stride, 1);
                let cout = match self.arch.block() {
                    BlockKind::Basic => {
                        outputs.extend([so * so * planes, so * so * planes]);
                        planes
                    }
                    BlockKind::Bottleneck => {
                        outputs.extend([s * s * planes, so * so * planes, so * so * 4 * planes]);
                        4 * planes
                    }
                };
                if stride != 1 || cin != cout {
                    outputs.push(so * so * cout);
                }
                s = so;
                cin = cout;
            }
        }
        outputs
    }

    /// Refuses ([`ModelError::Config`]) a zero width, input channel count or `feat_dim`, and a prototype
    /// head without prototypes.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: &str| Err(ModelError::Config(what.to_string()));
        if self.width() == 0 {
            return bad("width must be positive");
        }
        if self.in_channels == 0 {
            return bad("in_channels must be positive");
        }
        if self.feat_dim == 0 {
            return bad("feat_dim must be positive");
        }
        if self.prototypes.contains(&0) {
            return bad("every prototype head needs at least one prototype");
        }
        Ok(())
    }
}
