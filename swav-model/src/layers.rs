//! The three layers with parameters: convolution, batch norm and linear. Each wraps the engine's op
//! with its parameters and names; the networks compose them.

use std::borrow::Cow;
use swav_tensor::matmul::MulPrecision;
use swav_tensor::ops::batchnorm::{
    batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward, sync_batchnorm_backward,
    sync_batchnorm_train_forward, BnCache, BnParams, Fused,
};
use swav_tensor::ops::conv::{conv2d_backward, conv2d_forward, ConvParams};
use swav_tensor::ops::linear::{linear_backward, linear_forward};
use swav_tensor::ops::winograd::ConvAlgorithm;

use swav_tensor::{Collective, DType, Device, Tensor};

use crate::init::InitRng;
use crate::param::{Layout, Param, Slot, Visit, Visitor};
use crate::Result;

/// `t` in `dtype`: itself, or a copy when it is stored otherwise. Under mixed precision the layers
/// compute in bf16 on copies of the fp32 master weights, made per call: the weights change every
/// step, and a copy costs far less than the layer.
fn in_dtype(t: &Tensor, dtype: DType) -> Result<Cow<'_, Tensor>> {
    Ok(if t.dtype() == dtype { Cow::Borrowed(t) } else { Cow::Owned(t.to_dtype(dtype)?) })
}

/// Convolution without bias; weight `[out, kh, kw, in]` (OHWI) in memory.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The kernel `[out, kh, kw, in]` ([`Layout::Ohwi`]).
    pub weight: Param,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on each side, in pixels.
    pub pad: usize,
    /// The algorithms this layer's convolutions may use (see [`SwavModel::set_conv_algorithm`](crate::SwavModel::set_conv_algorithm)).
    pub algo: ConvAlgorithm,
    /// What this layer's CPU products multiply (see [`SwavModel::set_conv_precision`](crate::SwavModel::set_conv_precision)).
    pub precision: MulPrecision,
}

impl Conv2d {
    /// A `k x k` convolution from `cin` to `cout` channels, Kaiming-normal initialised (fan-out) from
    /// `rng`, with the default algorithms.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, rng: &mut InitRng) -> Conv2d {
        let values = rng.kaiming_normal_fan_out(cout * k * k * cin, cout * k * k);
        let weight = Tensor::from_vec(&[cout, k, k, cin], values).expect("shape matches length");
        Conv2d {
            weight: Param::new(weight, Layout::Ohwi),
            stride,
            pad,
            algo: ConvAlgorithm::default(),
            precision: MulPrecision::F32,
        }
    }

    /// Channels of the output.
    pub fn out_channels(&self) -> usize {
        self.weight.value.dim(0)
    }

    fn params(&self) -> ConvParams {
        ConvParams { stride: self.stride, pad: self.pad, algo: self.algo, precision: self.precision }
    }

    /// The convolution of `x: [n, h, w, in]` (NHWC): `[n, oh, ow, out]` on the device of `x`, with the
    /// weight in the dtype of `x` (bf16 under mixed precision).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = in_dtype(&self.weight.value, x.dtype())?;
        Ok(conv2d_forward(x, &w, self.params())?)
    }

    /// Backward of [`Conv2d::forward`] on the same `x`: accumulates the weight gradient and returns
    /// the input gradient when `want_dx`.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let p = self.params();
        let Param { value, grad, .. } = &mut self.weight;
        let w = in_dtype(value, x.dtype())?;
        Ok(conv2d_backward(x, &w, dy, p, grad, want_dx)?)
    }
}

impl Visit for Conv2d {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        f(&format!("{prefix}weight"), Slot::Param(&mut self.weight));
    }
}

/// Batch norm over the channel (last) dimension, BatchNorm1d and BatchNorm2d alike.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Scale (gamma) per channel `[c]`, initially 1.
    pub weight: Param,
    /// Shift (beta) per channel `[c]`, initially 0.
    pub bias: Param,
    /// Running mean per channel, used in evaluation mode.
    pub running_mean: Tensor,
    /// Running (unbiased) variance per channel, used in evaluation mode.
    pub running_var: Tensor,
    /// Training-mode forwards run so far (saved as PyTorch does; not used in the computation).
    pub num_batches_tracked: i64,
    /// Added to the variance before the square root (1e-5, PyTorch's default).
    pub eps: f32,
    /// Weight of the new batch in the running statistics update (0.1, PyTorch's default).
    pub momentum: f32,
    /// The ranks whose batches share the statistics in training mode (SyncBatchNorm), if any.
    pub sync: Option<std::sync::Arc<dyn Collective>>,
}

impl BatchNorm {
    /// A batch norm over `c` channels with PyTorch's initial values, on the CPU, not synchronised.
    pub fn new(c: usize) -> BatchNorm {
        BatchNorm {
            weight: Param::new(Tensor::full(&[c], 1.0, Device::Cpu), Layout::Plain),
            bias: Param::zeros(&[c]),
            running_mean: Tensor::zeros(&[c], Device::Cpu),
            running_var: Tensor::full(&[c], 1.0, Device::Cpu),
            num_batches_tracked: 0,
            eps: 1e-5,
            momentum: 0.1,
            sync: None,
        }
    }

    fn params(&self) -> BnParams<'_> {
        BnParams { gamma: &self.weight.value, beta: &self.bias.value, eps: self.eps }
    }

    /// Training mode: batch statistics, running statistics updated.
    pub fn forward_train(&mut self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<(Tensor, BnCache)> {
        let p = BnParams { gamma: &self.weight.value, beta: &self.bias.value, eps: self.eps };
        let (rm, rv) = (&mut self.running_mean, &mut self.running_var);
        let out = match &self.sync {
            Some(group) => sync_batchnorm_train_forward(x, &p, rm, rv, self.momentum, residual, relu, group.as_ref())?,
            None => batchnorm_train_forward(x, &p, rm, rv, self.momentum, residual, relu)?,
        };
        self.num_batches_tracked += 1;
        Ok(out)
    }

    /// Evaluation mode: normalises with the running statistics, which are left unchanged. Like
    /// [`BatchNorm::forward_train`], adds `residual` after the normalisation and then applies a ReLU
    /// when `relu`, in the same pass.
    pub fn forward_eval(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        Ok(batchnorm_eval_forward(x, &self.params(), &self.running_mean, &self.running_var, residual, relu)?)
    }

    /// Returns `dx` and, when fused with a residual, the residual's gradient.
    pub fn backward(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        cache: &BnCache,
        fused: Fused,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let p = BnParams { gamma: &self.weight.value, beta: &self.bias.value, eps: self.eps };
        let (dgamma, dbeta) = (&mut self.weight.grad, &mut self.bias.grad);
        Ok(match &self.sync {
            Some(group) => sync_batchnorm_backward(x, y, dy, &p, cache, fused, dgamma, dbeta, group.as_ref())?,
            None => batchnorm_backward(x, y, dy, &p, cache, fused, dgamma, dbeta)?,
        })
    }
}

impl Visit for BatchNorm {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        f(&format!("{prefix}weight"), Slot::Param(&mut self.weight));
        f(&format!("{prefix}bias"), Slot::Param(&mut self.bias));
        f(&format!("{prefix}running_mean"), Slot::Buffer(&mut self.running_mean));
        f(&format!("{prefix}running_var"), Slot::Buffer(&mut self.running_var));
        f(&format!("{prefix}num_batches_tracked"), Slot::Counter(&mut self.num_batches_tracked));
    }
}

/// `y = x w^T (+ b)`, weight `[out, in]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Param,
    /// `[out]`, if the layer has a bias.
    pub bias: Option<Param>,
    /// The storage of the GEMM's inputs: `F32`, or `Bf16` under mixed precision on a CUDA device
    /// (input and weight cast to bf16, fp32 accumulation and output, like PyTorch's autocast).
    pub compute: DType,
}

impl Linear {
    /// A layer from `fin` to `fout` features, with or without a bias, initialised as PyTorch does
    /// (`U(-1/sqrt(fin), 1/sqrt(fin))`) from `rng`.
    pub fn new(fin: usize, fout: usize, bias: bool, rng: &mut InitRng) -> Linear {
        let w = Tensor::from_vec(&[fout, fin], rng.uniform_fan_in(fout * fin, fin)).expect("shape matches length");
        let b = bias.then(|| {
            Param::new(Tensor::from_vec(&[fout], rng.uniform_fan_in(fout, fin)).expect("shape"), Layout::Plain)
        });
        Linear { weight: Param::new(w, Layout::Plain), bias: b, compute: DType::F32 }
    }

    /// `x: [rows, in]` to `[rows, out]` (fp32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xc, w) = (in_dtype(x, self.compute)?, in_dtype(&self.weight.value, self.compute)?);
        Ok(linear_forward(&xc, &w, self.bias.as_ref().map(|b| &b.value))?)
    }

    /// Backward of [`Linear::forward`] on the same `x`: accumulates the weight and bias gradients and
    /// returns the input gradient (fp32) when `want_dx`.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let xc = in_dtype(x, self.compute)?;
        let w = in_dtype(&self.weight.value, self.compute)?;
        let db = self.bias.as_mut().map(|b| &mut b.grad);
        Ok(linear_backward(&xc, &w, dy, &mut self.weight.grad, db, want_dx)?)
    }
}

impl Visit for Linear {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        f(&format!("{prefix}weight"), Slot::Param(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(&format!("{prefix}bias"), Slot::Param(b));
        }
    }
}
