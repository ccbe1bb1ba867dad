//! ResNet backbones in torchvision's layout (the official SwAV ResNet-50 has the same names).
//!
//! A block is a chain of convolutions, each followed by a batch norm; every BN but the last applies a
//! ReLU, the last adds the shortcut and then applies the ReLU (fused into one pass). A basic block
//! (ResNet-18/34) chains two 3x3 convolutions, a bottleneck (ResNet-50) 1x1, 3x3 (with the stride, as
//! torchvision v1.5) and 1x1 with 4x expansion. The shortcut is the identity, or a strided 1x1
//! convolution + BN (`downsample.0`, `downsample.1`) where the shape changes.
//!
//! Activations flow NHWC; the output is the globally average-pooled feature vector `[n, channels]`.
//! Training-mode forwards return the activations the backward needs; a block's input is not stored
//! twice: it is the previous block's output, passed back in by [`ResNet::backward`].

use swav_tensor::matmul::MulPrecision;
use swav_tensor::ops::batchnorm::{BnCache, Fused};
use swav_tensor::ops::conv::ConvGeom;
use swav_tensor::ops::pool::{
    global_avg_pool_backward, global_avg_pool_forward, max_pool_backward, max_pool_forward, PoolGeom, PoolIndices,
};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::Tensor;

use crate::config::{BlockKind, ModelConfig};
use crate::error::ModelError;
use crate::init::InitRng;
use crate::layers::{BatchNorm, Conv2d};
use crate::param::{GradReady, Visit, Visitor};
use crate::Result;

/// The projection shortcut of a block whose output shape differs from its input's
/// (`downsample.0`, `downsample.1`).
#[derive(Clone, Debug)]
pub struct Downsample {
    /// 1x1 convolution with the block's stride, to the block's output channels.
    pub conv: Conv2d,
    /// Batch norm after it, without ReLU.
    pub bn: BatchNorm,
}

/// One residual block, basic or bottleneck (see the module docs).
#[derive(Clone, Debug)]
pub struct Block {
    /// The convolutions in order (`conv1`, `conv2`, and `conv3` in a bottleneck): two for a basic
    /// block, three for a bottleneck.
    pub convs: Vec<Conv2d>,
    /// The batch norm after each convolution (`bn1`, ...), one per entry of `convs`.
    pub bns: Vec<BatchNorm>,
    /// The projection shortcut; `None` for the identity.
    pub downsample: Option<Downsample>,
}

/// What a block's backward needs from its training-mode forward.
pub struct BlockActs {
    /// Output of each convolution (input of its BN).
    conv_out: Vec<Tensor>,
    /// Output of each BN-ReLU but the last (input of the next convolution).
    hidden: Vec<Tensor>,
    caches: Vec<BnCache>,
    shortcut: Option<(Tensor, Tensor, BnCache)>,
    /// The block's output (also the next block's input).
    out: Tensor,
}

impl Block {
    fn new(kind: BlockKind, cin: usize, planes: usize, stride: usize, rng: &mut InitRng) -> Block {
        let (convs, cout) = match kind {
            BlockKind::Basic => {
                (vec![Conv2d::new(cin, planes, 3, stride, 1, rng), Conv2d::new(planes, planes, 3, 1, 1, rng)], planes)
            }
            BlockKind::Bottleneck => (
                vec![
                    Conv2d::new(cin, planes, 1, 1, 0, rng),
                    Conv2d::new(planes, planes, 3, stride, 1, rng),
                    Conv2d::new(planes, planes * 4, 1, 1, 0, rng),
                ],
                planes * 4,
            ),
        };
        let bns = convs.iter().map(|c| BatchNorm::new(c.out_channels())).collect();
        let downsample = (stride != 1 || cin != cout)
            .then(|| Downsample { conv: Conv2d::new(cin, cout, 1, stride, 0, rng), bn: BatchNorm::new(cout) });
        Block { convs, bns, downsample }
    }

    /// Channels of the block's output (of its last convolution).
    pub fn out_channels(&self) -> usize {
        self.convs.last().map_or(0, Conv2d::out_channels)
    }

    fn forward_train(&mut self, x: &Tensor) -> Result<BlockActs> {
        let last = self.convs.len() - 1;
        let mut conv_out = Vec::with_capacity(last + 1);
        let mut hidden = Vec::with_capacity(last);
        let mut caches = Vec::with_capacity(last + 1);
        for i in 0..last {
            let h = self.convs[i].forward(if i == 0 { x } else { &hidden[i - 1] })?;
            let (a, cache) = self.bns[i].forward_train(&h, None, true)?;
            conv_out.push(h);
            hidden.push(a);
            caches.push(cache);
        }
        let shortcut = match &mut self.downsample {
            Some(ds) => {
                let h = ds.conv.forward(x)?;
                let (y, cache) = ds.bn.forward_train(&h, None, false)?;
                Some((h, y, cache))
            }
            None => None,
        };
        let identity = shortcut.as_ref().map_or(x, |s| &s.1);
        let h = self.convs[last].forward(&hidden[last - 1])?;
        let (out, cache) = self.bns[last].forward_train(&h, Some(identity), true)?;
        conv_out.push(h);
        caches.push(cache);
        Ok(BlockActs { conv_out, hidden, caches, shortcut, out })
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut a = self.bns[0].forward_eval(&self.convs[0].forward(x)?, None, true)?;
        for i in 1..last {
            a = self.bns[i].forward_eval(&self.convs[i].forward(&a)?, None, true)?;
        }
        let identity = match &self.downsample {
            Some(ds) => Some(ds.bn.forward_eval(&ds.conv.forward(x)?, None, false)?),
            None => None,
        };
        let h = self.convs[last].forward(&a)?;
        self.bns[last].forward_eval(&h, Some(identity.as_ref().unwrap_or(x)), true)
    }

    /// Accumulates the block's parameter gradients; returns the gradient of its input `x`.
    fn backward(&mut self, x: &Tensor, acts: &BlockActs, dout: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let (mut d, dshortcut) =
            self.bns[last].backward(&acts.conv_out[last], &acts.out, dout, &acts.caches[last], Fused::RESIDUAL_RELU)?;
        let dshortcut = dshortcut.expect("a residual BN returns the shortcut's gradient");
        for i in (0..=last).rev() {
            let input = if i == 0 { x } else { &acts.hidden[i - 1] };
            let dinput = self.convs[i].backward(input, &d, true)?.expect("dx requested");
            if i == 0 {
                d = dinput;
            } else {
                d = self.bns[i - 1]
                    .backward(&acts.conv_out[i - 1], &acts.hidden[i - 1], &dinput, &acts.caches[i - 1], Fused::RELU)?
                    .0;
            }
        }
        match (&mut self.downsample, &acts.shortcut) {
            (Some(ds), Some((h, y, cache))) => {
                let (dh, _) = ds.bn.backward(h, y, &dshortcut, cache, Fused::NONE)?;
                d.add_assign(&ds.conv.backward(x, &dh, true)?.expect("dx requested"))?;
            }
            _ => d.add_assign(&dshortcut)?,
        }
        Ok(d)
    }
}

impl Visit for Block {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        for (i, (conv, bn)) in self.convs.iter_mut().zip(&mut self.bns).enumerate() {
            conv.visit(&format!("{prefix}conv{}.", i + 1), f);
            bn.visit(&format!("{prefix}bn{}.", i + 1), f);
        }
        if let Some(ds) = &mut self.downsample {
            ds.conv.visit(&format!("{prefix}downsample.0."), f);
            ds.bn.visit(&format!("{prefix}downsample.1."), f);
        }
    }
}

/// A ResNet backbone without its classifier: stem, four stages, global average pooling.
#[derive(Clone, Debug)]
pub struct ResNet {
    /// The stem convolution: 7x7 stride 2, or 3x3 stride 1 with the small-image stem.
    pub conv1: Conv2d,
    /// The stem's batch norm (with ReLU).
    pub bn1: BatchNorm,
    /// 3x3 stride-2 max-pool after the stem (absent with the small-image stem).
    pub maxpool: bool,
    /// The four stages (`layer1` .. `layer4`), each a list of blocks; every stage but the first halves
    /// the resolution in its first block and doubles the width.
    pub stages: Vec<Vec<Block>>,
    in_channels: usize,
}

/// What [`ResNet::backward`] needs from one training-mode forward.
pub struct ResNetActs {
    input: Tensor,
    stem_conv: Tensor,
    stem_cache: BnCache,
    stem_out: Tensor,
    pool_idx: Option<PoolIndices>,
    pooled: Option<Tensor>,
    blocks: Vec<BlockActs>,
}

impl ResNet {
    /// The backbone `cfg` describes, initialised from `rng`; refuses an invalid configuration.
    pub fn new(cfg: &ModelConfig, rng: &mut InitRng) -> Result<ResNet> {
        cfg.validate()?;
        let width = cfg.width();
        let (conv1, maxpool) = if cfg.small_stem {
            (Conv2d::new(cfg.in_channels, width, 3, 1, 1, rng), false)
        } else {
            (Conv2d::new(cfg.in_channels, width, 7, 2, 3, rng), true)
        };
        let bn1 = BatchNorm::new(width);
        let kind = cfg.arch.block();
        let mut cin = width;
        let mut stages = Vec::new();
        for (s, &depth) in cfg.arch.depths().iter().enumerate() {
            let planes = width << s;
            let mut blocks = Vec::new();
            for b in 0..depth {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let block = Block::new(kind, cin, planes, stride, rng);
                cin = block.out_channels();
                blocks.push(block);
            }
            stages.push(blocks);
        }
        Ok(ResNet { conv1, bn1, maxpool, stages, in_channels: cfg.in_channels })
    }

    /// Every batch norm of the backbone, in forward order.
    pub fn batchnorms_mut(&mut self) -> Vec<&mut BatchNorm> {
        let mut out = vec![&mut self.bn1];
        for block in self.stages.iter_mut().flatten() {
            out.extend(block.bns.iter_mut());
            if let Some(ds) = &mut block.downsample {
                out.push(&mut ds.bn);
            }
        }
        out
    }

    /// Lets every convolution of the backbone use `algo`.
    pub fn set_conv_algorithm(&mut self, algo: ConvAlgorithm) {
        self.for_each_conv(|c| c.algo = algo);
    }

    /// Lets every convolution of the backbone multiply at `precision` on the CPU.
    pub fn set_conv_precision(&mut self, precision: MulPrecision) {
        self.for_each_conv(|c| c.precision = precision);
    }

    fn for_each_conv(&mut self, mut f: impl FnMut(&mut Conv2d)) {
        f(&mut self.conv1);
        for block in self.stages.iter_mut().flatten() {
            block.convs.iter_mut().for_each(&mut f);
            if let Some(ds) = &mut block.downsample {
                f(&mut ds.conv);
            }
        }
    }

    /// The shape of every convolution a forward of `n` images of `h x w` runs, in forward order (what a
    /// measured convolution plan is measured on).
    pub fn conv_geometries(&self, n: usize, h: usize, w: usize) -> Result<Vec<ConvGeom>> {
        let mut out = Vec::new();
        let mut conv = |c: &Conv2d, (h, w): (usize, usize)| -> Result<(usize, usize)> {
            let shape = c.weight.value.shape();
            let g = ConvGeom::new(&[n, h, w, shape[3]], shape, c.stride, c.pad)?;
            out.push(g);
            Ok((g.oh, g.ow))
        };
        let mut hw = conv(&self.conv1, (h, w))?;
        if self.maxpool {
            let p = PoolGeom::new(&[n, hw.0, hw.1, self.conv1.out_channels()], 3, 2, 1)?;
            hw = (p.oh, p.ow);
        }
        for block in self.stages.iter().flatten() {
            let input = hw;
            for c in &block.convs {
                hw = conv(c, hw)?;
            }
            if let Some(ds) = &block.downsample {
                conv(&ds.conv, input)?;
            }
        }
        Ok(out)
    }

    /// Channels of the pooled features (the last block's output channels).
    pub fn out_channels(&self) -> usize {
        self.stages.last().and_then(|s| s.last()).map_or(0, Block::out_channels)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.shape() {
            &[n, h, w, c] if c == self.in_channels && n > 0 && h > 0 && w > 0 => Ok(()),
            s => Err(ModelError::Input(format!(
                "images must be NHWC with {} channels, got shape {s:?}",
                self.in_channels
            ))),
        }
    }

    /// Training mode (batch statistics; running statistics updated once per call). Returns the pooled
    /// features `[n, channels]` and the activations for [`ResNet::backward`].
    pub fn forward_train(&mut self, x: Tensor) -> Result<(Tensor, ResNetActs)> {
        self.check_input(&x)?;
        let stem_conv = self.conv1.forward(&x)?;
        let (stem_out, stem_cache) = self.bn1.forward_train(&stem_conv, None, true)?;
        let (pooled, pool_idx) = if self.maxpool {
            let (p, idx) = max_pool_forward(&stem_out, 3, 2, 1)?;
            (Some(p), Some(idx))
        } else {
            (None, None)
        };
        let mut blocks: Vec<BlockActs> = Vec::new();
        for block in self.stages.iter_mut().flatten() {
            let input = blocks.last().map_or_else(|| pooled.as_ref().unwrap_or(&stem_out), |b| &b.out);
            let acts = block.forward_train(input)?;
            blocks.push(acts);
        }
        let last = blocks.last().map_or_else(|| pooled.as_ref().unwrap_or(&stem_out), |b| &b.out);
        let features = global_avg_pool_forward(last)?;
        Ok((features, ResNetActs { input: x, stem_conv, stem_cache, stem_out, pool_idx, pooled, blocks }))
    }

    /// Evaluation mode (running statistics), nothing kept for a backward.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let mut a = self.bn1.forward_eval(&self.conv1.forward(x)?, None, true)?;
        if self.maxpool {
            a = max_pool_forward(&a, 3, 2, 1)?.0;
        }
        for block in self.stages.iter().flatten() {
            a = block.forward_eval(&a)?;
        }
        Ok(global_avg_pool_forward(&a)?)
    }

    /// Accumulates every parameter gradient from the gradient of the pooled features. The input
    /// gradient is not computed (the images need none).
    pub fn backward(&mut self, acts: ResNetActs, dfeatures: &Tensor) -> Result<()> {
        self.backward_with(acts, dfeatures, None)
    }

    /// [`ResNet::backward`], handing each block (then the stem) to `ready` once its gradients are
    /// final. Pass `ready` only on the last backward of a step: earlier ones are accumulated into.
    pub fn backward_with(
        &mut self,
        acts: ResNetActs,
        dfeatures: &Tensor,
        mut ready: Option<&mut GradReady<'_>>,
    ) -> Result<()> {
        let ResNetActs { input, stem_conv, stem_cache, stem_out, pool_idx, pooled, blocks } = acts;
        let stem_final = pooled.as_ref().unwrap_or(&stem_out);
        let last = blocks.last().map_or(stem_final, |b| &b.out);
        let mut d = global_avg_pool_backward(last, dfeatures)?;
        // `i` counts the blocks across stages, as `blocks` holds their activations.
        let mut i = blocks.len();
        for (s, stage) in self.stages.iter_mut().enumerate().rev() {
            for (b, block) in stage.iter_mut().enumerate().rev() {
                i -= 1;
                let input = if i == 0 { stem_final } else { &blocks[i - 1].out };
                d = block.backward(input, &blocks[i], &d)?;
                if let Some(ready) = ready.as_mut() {
                    ready(&block_prefix(s, b), block);
                }
            }
        }
        drop(blocks);
        if let Some(idx) = &pool_idx {
            d = max_pool_backward(stem_out.shape(), idx, &d)?;
        }
        let (dstem, _) = self.bn1.backward(&stem_conv, &stem_out, &d, &stem_cache, Fused::RELU)?;
        if let Some(ready) = ready.as_mut() {
            ready("bn1.", &mut self.bn1);
        }
        self.conv1.backward(&input, &dstem, false)?;
        if let Some(ready) = ready.as_mut() {
            ready("conv1.", &mut self.conv1);
        }
        Ok(())
    }
}

/// The torchvision name of block `block` of stage `stage` (both from 0): `layer1.0.`.
fn block_prefix(stage: usize, block: usize) -> String {
    format!("layer{}.{block}.", stage + 1)
}

impl Visit for ResNet {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        self.conv1.visit(&format!("{prefix}conv1."), f);
        self.bn1.visit(&format!("{prefix}bn1."), f);
        for (s, stage) in self.stages.iter_mut().enumerate() {
            for (b, block) in stage.iter_mut().enumerate() {
                block.visit(&format!("{prefix}{}", block_prefix(s, b)), f);
            }
        }
    }
}
