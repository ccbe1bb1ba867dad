//! A dense float32 tensor: a shape and its storage on one device. Row-major (the last dimension is
//! contiguous); the meaning of the dimensions (NHWC, OHWI, ...) is each op's documented convention.

use crate::error::TensorError;
use crate::{Device, Result};

#[derive(Debug, PartialEq)]
enum Storage {
    /// Host memory from the caching allocator (`alloc`), returned to it on drop.
    Cpu(Vec<f32>),
}

impl Clone for Storage {
    fn clone(&self) -> Storage {
        match self {
            Storage::Cpu(v) => {
                let mut copy = crate::alloc::take(v.len());
                copy.copy_from_slice(v);
                Storage::Cpu(copy)
            }
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::alloc::give(std::mem::take(v)),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        let n = shape.iter().product();
        match device {
            Device::Cpu => Tensor { shape: shape.to_vec(), storage: Storage::Cpu(crate::alloc::zeros(n)) },
        }
    }

    /// A tensor whose values are unspecified (left over from an earlier tensor): for ops that
    /// overwrite every value, saving the zero-fill.
    pub fn for_overwrite(shape: &[usize], device: Device) -> Tensor {
        let n = shape.iter().product();
        match device {
            Device::Cpu => Tensor { shape: shape.to_vec(), storage: Storage::Cpu(crate::alloc::take(n)) },
        }
    }

    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        let mut t = Tensor::zeros(shape, device);
        t.fill(value);
        t
    }

    /// A CPU tensor owning `data`, which must hold exactly `shape.product()` values.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: data.len() });
        }
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(data) })
    }

    pub fn from_slice(shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: data.len() });
        }
        let mut t = Tensor::for_overwrite(shape, Device::Cpu);
        t.as_mut_slice().copy_from_slice(data);
        Ok(t)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// The values of a CPU tensor.
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// A host copy of the values, whatever the device.
    pub fn to_vec(&self) -> Vec<f32> {
        self.as_slice().to_vec()
    }

    pub fn into_vec(mut self) -> Vec<f32> {
        match &mut self.storage {
            Storage::Cpu(v) => std::mem::take(v),
        }
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != self.len() {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: self.len() });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    pub fn fill(&mut self, value: f32) {
        self.as_mut_slice().fill(value);
    }

    /// `self += other`, elementwise.
    pub fn add_assign(&mut self, other: &Tensor) -> Result<()> {
        self.check_same_shape("add_assign", other)?;
        for (a, b) in self.as_mut_slice().iter_mut().zip(other.as_slice()) {
            *a += b;
        }
        Ok(())
    }

    pub fn scale(&mut self, factor: f32) {
        for a in self.as_mut_slice() {
            *a *= factor;
        }
    }

    /// Euclidean norm, accumulated in f64.
    pub fn norm(&self) -> f64 {
        self.as_slice().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }

    pub fn check_same_shape(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.shape != other.shape {
            return Err(crate::error::shape_err(op, format!("{:?} vs {:?}", self.shape, other.shape)));
        }
        Ok(())
    }

    /// Concatenation along the first dimension (the batch); all other dimensions must agree.
    pub fn cat(parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| crate::error::shape_err("cat", "no tensors"))?;
        let inner = &first.shape[1..];
        let mut rows = 0;
        for p in parts {
            if &p.shape[1..] != inner {
                return Err(crate::error::shape_err("cat", format!("{:?} vs {:?}", p.shape, first.shape)));
            }
            rows += p.shape[0];
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let mut out = Tensor::for_overwrite(&shape, first.device());
        let mut at = 0;
        for p in parts {
            out.as_mut_slice()[at..at + p.len()].copy_from_slice(p.as_slice());
            at += p.len();
        }
        Ok(out)
    }

    /// Rows `[start, start + count)` of the first dimension, copied.
    pub fn narrow(&self, start: usize, count: usize) -> Result<Tensor> {
        if self.shape.is_empty() || start + count > self.shape[0] {
            return Err(crate::error::shape_err(
                "narrow",
                format!("rows {start}..{} of {:?}", start + count, self.shape),
            ));
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = count;
        let mut out = Tensor::for_overwrite(&shape, self.device());
        out.as_mut_slice().copy_from_slice(&self.as_slice()[start * row..(start + count) * row]);
        Ok(out)
    }
}
