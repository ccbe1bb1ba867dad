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
    /// The current values.
    pub value: Tensor,
    /// The gradient summed over the backwards since the last [`Param::zero_grad`]; same shape and
    /// device as `value`.
    pub grad: Tensor,
    /// How `value` and `grad` are laid out (checkpoints convert to PyTorch's layout).
    pub layout: Layout,
}

impl Param {
    /// A parameter holding `value`, with a zero gradient on the same device.
    pub fn new(value: Tensor, layout: Layout) -> Param {
        let grad = Tensor::zeros(value.shape(), value.device());
        Param { value, grad, layout }
    }

    /// A CPU parameter of zeros in the plain layout (a bias, a batch norm's shift).
    pub fn zeros(shape: &[usize]) -> Param {
        Param::new(Tensor::zeros(shape, Device::Cpu), Layout::Plain)
    }

    /// Clears the accumulated gradient (backwards add to it).
    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
    }
}

/// One named entry of a model.
pub enum Slot<'a> {
    /// A trainable parameter (`weight`, `bias`).
    Param(&'a mut Param),
    /// A tensor that is saved but not trained (`running_mean`, `running_var`).
    Buffer(&'a mut Tensor),
    /// `num_batches_tracked` of a batch norm (int64 in PyTorch checkpoints).
    Counter(&'a mut i64),
}

/// The callback of a visit: full name and the entry.
pub type Visitor<'v> = dyn FnMut(&str, Slot<'_>) + 'v;

/// Called during a backward pass with a part of the model (and the name prefix to visit it with)
/// as soon as its parameter gradients are final, so that a data-parallel run can start averaging them
/// while the rest of the backward runs. Every parameter is handed over exactly once per backward.
pub type GradReady<'r> = dyn FnMut(&str, &mut dyn Visit) + 'r;

/// Models and layers whose entries can be enumerated by name.
pub trait Visit {
    /// Calls `f` with every entry and its full name, `prefix` followed by the entry's own dotted name,
    /// always in the same order.
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>);

    /// Clears the gradient of every parameter (before the backward of a new step).
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
