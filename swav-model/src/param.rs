//! Parameters, buffers and the visitor that names them.
//!
//! Every layer implements `visit(prefix, f)`, calling `f` with the full torchvision / official SwAV
//! name of each parameter (`layer1.0.conv1.weight`), buffer (`bn1.running_mean`) and counter
//! (`bn1.num_batches_tracked`). Checkpoints, optimizers and gradient resets all go through it, so
//! names are defined in exactly one place.

use swav_tensor::{Device, Tensor};

/// How a parameter's values are laid out in memory, when that differs from PyTorch's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same layout as PyTorch.
    Plain,
    /// Convolution weight kept as `[out, kh, kw, in]` (PyTorch: `[out, in, kh, kw]`).
    Ohwi,
}

/// A trainable tensor and its accumulated gradient.
#[derive(Clone, Debug)]
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
    pub layout: Layout,
}

impl Param {
    pub fn new(value: Tensor, layout: Layout) -> Param {
        let grad = Tensor::zeros(value.shape(), value.device());
        Param { value, grad, layout }
    }

    pub fn zeros(shape: &[usize]) -> Param {
        Param::new(Tensor::zeros(shape, Device::Cpu), Layout::Plain)
    }

    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
    }
}

/// One named entry of a model.
pub enum Slot<'a> {
    Param(&'a mut Param),
    Buffer(&'a mut Tensor),
    /// `num_batches_tracked` of a batch norm (int64 in PyTorch checkpoints).
    Counter(&'a mut i64),
}

/// The callback of a visit: full name and the entry.
pub type Visitor<'v> = dyn FnMut(&str, Slot<'_>) + 'v;

/// Models and layers whose entries can be enumerated by name.
pub trait Visit {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>);

    fn zero_grad(&mut self) {
        self.visit("", &mut |_, slot| {
            if let Slot::Param(p) = slot {
                p.zero_grad()
            }
        });
    }

    /// Number of trainable values.
    fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.visit("", &mut |_, slot| {
            if let Slot::Param(p) = slot {
                n += p.value.len()
            }
        });
        n
    }
}
