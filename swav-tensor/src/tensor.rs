//! A dense tensor: a shape and its storage on one device. Row-major (the last dimension is
//! contiguous); the meaning of the dimensions (NHWC, OHWI, ...) is each op's documented convention.
//!
//! CPU tensors hold f32 values in host memory from the caching allocator (`alloc`). CUDA tensors hold
//! a block of device memory (`cuda::runtime::DeviceBuffer`) of f32 or bf16 values ([`DType`]): bf16
//! for activations under mixed precision, f32 for everything else. Host access (`as_slice`) is for CPU
//! tensors; [`Tensor::to_device`] and [`Tensor::to_vec`] move values between devices.

use std::sync::Arc;

use crate::cuda::runtime::{self, DevPtr, DeviceBuffer, DeviceRuntime};
use crate::error::{shape_err, TensorError};
use crate::ops::elementwise_cuda;
use crate::{Device, Result};

/// The element type of a tensor's storage (CPU tensors are always f32).
pub use crate::cuda::plan::Storage as DType;

enum Memory {
    /// Host memory from the caching allocator, returned to it on drop.
    Cpu(Vec<f32>),
    /// A block on a CUDA device, returned to its runtime's cache on drop.
    Cuda { buf: DeviceBuffer, dtype: DType },
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Cpu(v) = self {
            crate::alloc::give(std::mem::take(v));
        }
    }
}

fn dtype_bytes(d: DType) -> usize {
    match d {
        DType::F32 => 4,
        DType::Bf16 => 2,
    }
}

/// A tensor; see the module docs.
pub struct Tensor {
    shape: Vec<usize>,
    memory: Memory,
}

impl Clone for Tensor {
    fn clone(&self) -> Tensor {
        match &self.memory {
            Memory::Cpu(v) => {
                let mut copy = crate::alloc::take(v.len());
                copy.copy_from_slice(v);
                Tensor { shape: self.shape.clone(), memory: Memory::Cpu(copy) }
            }
            Memory::Cuda { buf, dtype } => {
                let rt = buf.runtime().clone();
                let copy =
                    rt.alloc(buf.bytes()).and_then(|b| rt.backend().copy(b.ptr(), buf.ptr(), buf.bytes()).map(|()| b));
                let copy = copy.unwrap_or_else(|e| panic!("copying a tensor on {}: {e}", self.device()));
                Tensor { shape: self.shape.clone(), memory: Memory::Cuda { buf: copy, dtype: *dtype } }
            }
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.memory {
            Memory::Cpu(v) => f.debug_struct("Tensor").field("shape", &self.shape).field("values", v).finish(),
            Memory::Cuda { buf, dtype } => {
                f.debug_struct("Tensor").field("shape", &self.shape).field("dtype", dtype).field("memory", buf).finish()
            }
        }
    }
}

/// Equal shapes and equal values (copied to the host when needed): for tests.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape && self.to_vec() == other.to_vec()
    }
}

impl Tensor {
    /// Zeros on `device` (f32). A CUDA device is opened on first use; a device that cannot be opened
    /// is a programming error here (open it first with `cuda::runtime::runtime`, which reports why).
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        match device {
            Device::Cpu => {
                Tensor { shape: shape.to_vec(), memory: Memory::Cpu(crate::alloc::zeros(shape.iter().product())) }
            }
            Device::Cuda(i) => {
                let rt = runtime::runtime(i).unwrap_or_else(|e| panic!("{e}"));
                Tensor::device_zeros(&rt, shape, DType::F32).unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }

    /// A tensor whose values are unspecified (left over from an earlier tensor): for ops that
    /// overwrite every value, saving the zero-fill.
    pub fn for_overwrite(shape: &[usize], device: Device) -> Tensor {
        match device {
            Device::Cpu => {
                Tensor { shape: shape.to_vec(), memory: Memory::Cpu(crate::alloc::take(shape.iter().product())) }
            }
            Device::Cuda(i) => {
                let rt = runtime::runtime(i).unwrap_or_else(|e| panic!("{e}"));
                Tensor::device_uninit(&rt, shape, DType::F32).unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }

    /// `value` everywhere, on `device` (f32).
    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        let mut t = Tensor::for_overwrite(shape, device);
        t.fill(value);
        t
    }

    /// A CUDA tensor of `dtype` whose values are unspecified.
    pub fn device_uninit(rt: &Arc<DeviceRuntime>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes =
            n.checked_mul(dtype_bytes(dtype)).ok_or_else(|| shape_err("tensor", format!("{shape:?} is too large")))?;
        Ok(Tensor { shape: shape.to_vec(), memory: Memory::Cuda { buf: rt.alloc(bytes)?, dtype } })
    }

    /// An f32 CUDA tensor holding `values` (a loader batch): copied on the device's copy stream,
    /// so that the copy overlaps the work queued before, into a block of the upload pool (see
    /// [`DeviceRuntime::alloc_upload`]). Later work on the device sees the values.
    pub fn upload(rt: &Arc<DeviceRuntime>, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: values.len() });
        }
        let (buf, after) = rt.alloc_upload(4 * values.len())?;
        rt.backend().upload_after(buf.ptr(), &f32_bytes(values), &after)?;
        Ok(Tensor { shape: shape.to_vec(), memory: Memory::Cuda { buf, dtype: DType::F32 } })
    }

    /// A CUDA tensor of `dtype` filled with zeros.
    pub fn device_zeros(rt: &Arc<DeviceRuntime>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = Tensor::device_uninit(rt, shape, dtype)?;
        let (ptr, bytes) = t.device_block().expect("a device tensor");
        rt.backend().zero(ptr, bytes)?;
        Ok(t)
    }

    /// A CPU tensor owning `data`, which must hold exactly `shape.product()` values.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: data.len() });
        }
        Ok(Tensor { shape: shape.to_vec(), memory: Memory::Cpu(data) })
    }

    /// A CPU tensor holding a copy of `data`.
    pub fn from_slice(shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(TensorError::Len { shape: shape.to_vec(), expected, got: data.len() });
        }
        let mut t = Tensor::for_overwrite(shape, Device::Cpu);
        t.as_mut_slice().copy_from_slice(data);
        Ok(t)
    }

    /// The sizes of the dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Size of dimension `i`.
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the values live.
    pub fn device(&self) -> Device {
        match &self.memory {
            Memory::Cpu(_) => Device::Cpu,
            Memory::Cuda { buf, .. } => Device::Cuda(buf.runtime().ordinal()),
        }
    }

    /// The element type of the storage.
    pub fn dtype(&self) -> DType {
        match &self.memory {
            Memory::Cpu(_) => DType::F32,
            Memory::Cuda { dtype, .. } => *dtype,
        }
    }

    /// The runtime of a CUDA tensor.
    pub fn runtime(&self) -> Option<&Arc<DeviceRuntime>> {
        match &self.memory {
            Memory::Cpu(_) => None,
            Memory::Cuda { buf, .. } => Some(buf.runtime()),
        }
    }

    /// The device address and byte length of a CUDA tensor's block.
    pub fn device_block(&self) -> Option<(DevPtr, usize)> {
        match &self.memory {
            Memory::Cpu(_) => None,
            Memory::Cuda { buf, .. } => Some((buf.ptr(), self.len() * dtype_bytes(self.dtype()))),
        }
    }

    /// The allocator pool of a CUDA tensor's block.
    pub fn device_pool(&self) -> Option<crate::cuda::runtime::Pool> {
        match &self.memory {
            Memory::Cpu(_) => None,
            Memory::Cuda { buf, .. } => Some(buf.pool()),
        }
    }

    /// The device address of a CUDA tensor (panics for a CPU tensor: an op's dispatch error).
    pub fn ptr(&self) -> DevPtr {
        self.device_block()
            .unwrap_or_else(|| panic!("a CPU tensor {:?} where a device tensor was expected", self.shape))
            .0
    }

    fn cpu_only(&self) -> ! {
        panic!(
            "tensor {:?} is on {}: host access needs a CPU tensor (copy it with to_device(Device::Cpu))",
            self.shape,
            self.device()
        )
    }

    /// The values of a CPU tensor.
    pub fn as_slice(&self) -> &[f32] {
        match &self.memory {
            Memory::Cpu(v) => v,
            Memory::Cuda { .. } => self.cpu_only(),
        }
    }

    /// The values of a CPU tensor, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if !matches!(self.memory, Memory::Cpu(_)) {
            self.cpu_only()
        }
        match &mut self.memory {
            Memory::Cpu(v) => v,
            Memory::Cuda { .. } => unreachable!("checked above"),
        }
    }

    /// A host copy of the values (as f32), whatever the device.
    pub fn to_vec(&self) -> Vec<f32> {
        match &self.memory {
            Memory::Cpu(v) => v.to_vec(),
            Memory::Cuda { buf, dtype } => {
                let mut bytes = vec![0u8; self.len() * dtype_bytes(*dtype)];
                buf.runtime()
                    .backend()
                    .download(buf.ptr(), &mut bytes)
                    .unwrap_or_else(|e| panic!("reading a tensor back from {}: {e}", self.device()));
                decode(&bytes, *dtype)
            }
        }
    }

    /// The first `n` values (as f32): a short read for a device tensor.
    pub(crate) fn leading_values(&self, n: usize) -> Result<Vec<f32>> {
        let n = n.min(self.len());
        match &self.memory {
            Memory::Cpu(v) => Ok(v[..n].to_vec()),
            Memory::Cuda { buf, dtype } => {
                let mut bytes = vec![0u8; n * dtype_bytes(*dtype)];
                buf.runtime().backend().download(buf.ptr(), &mut bytes)?;
                Ok(decode(&bytes, *dtype))
            }
        }
    }

    /// Overwrites the values of an f32 tensor with `values` (as many), in place: the block stays.
    pub(crate) fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.len() || self.dtype() != DType::F32 {
            return Err(shape_err(
                "write_f32",
                format!("{} values into {:?} {:?}", values.len(), self.dtype(), self.shape),
            ));
        }
        match &mut self.memory {
            Memory::Cpu(v) => v.copy_from_slice(values),
            Memory::Cuda { buf, .. } => buf.runtime().backend().upload(buf.ptr(), &f32_bytes(values))?,
        }
        Ok(())
    }

    /// The values, read when [`PendingValues::wait`] is called: a device tensor's copy is queued behind
    /// the work already on its stream and the host goes on (on the CPU they are there already).
    pub fn to_vec_later(&self) -> Result<PendingValues> {
        match &self.memory {
            Memory::Cpu(v) => Ok(PendingValues::Ready(v.to_vec())),
            Memory::Cuda { buf, dtype } => {
                let pending = buf.runtime().backend().download_later(buf.ptr(), self.len() * dtype_bytes(*dtype))?;
                Ok(PendingValues::Copying(pending, *dtype))
            }
        }
    }

    /// The values, by value (a copy for device tensors).
    pub fn into_vec(mut self) -> Vec<f32> {
        match &mut self.memory {
            Memory::Cpu(v) => std::mem::take(v),
            Memory::Cuda { .. } => self.to_vec(),
        }
    }

    /// The same values on `device` (a copy; f32 on the CPU, the same dtype between devices).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match (&self.memory, device) {
            (Memory::Cpu(v), Device::Cpu) => Tensor::from_slice(&self.shape, v),
            (Memory::Cuda { .. }, Device::Cpu) => Tensor::from_vec(&self.shape, self.to_vec()),
            (_, Device::Cuda(_)) if self.device() == device => Ok(self.clone()),
            (_, Device::Cuda(i)) => {
                let rt = runtime::runtime(i)?;
                let t = Tensor::device_uninit(&rt, &self.shape, DType::F32)?;
                rt.backend().upload(t.ptr(), &f32_bytes(&self.to_vec()))?;
                Ok(t)
            }
        }
    }

    /// The same values stored as `dtype` on the same device (a copy; bf16 rounds to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let rt = self.runtime().ok_or_else(|| shape_err("to_dtype", "CPU tensors are f32 only"))?;
        let out = Tensor::device_uninit(rt, &self.shape, dtype)?;
        let plan = elementwise_cuda::cast(self.len(), self.dtype(), dtype)?;
        rt.run(
            &elementwise_cuda::SOURCE,
            &plan,
            &[(elementwise_cuda::X, self.ptr()), (elementwise_cuda::Y, out.ptr())],
        )?;
        Ok(out)
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

    /// Sets every value to `value`.
    pub fn fill(&mut self, value: f32) {
        match &mut self.memory {
            Memory::Cpu(v) => v.fill(value),
            Memory::Cuda { buf, dtype } => {
                let (rt, n) = (buf.runtime().clone(), self.shape.iter().product::<usize>());
                if n == 0 {
                    return;
                }
                let plan = elementwise_cuda::fill(n, *dtype, value).expect("n > 0");
                rt.run(&elementwise_cuda::SOURCE, &plan, &[(elementwise_cuda::X, buf.ptr())])
                    .unwrap_or_else(|e| panic!("fill on cuda:{}: {e}", rt.ordinal()));
            }
        }
    }

    /// `self += other`, elementwise.
    pub fn add_assign(&mut self, other: &Tensor) -> Result<()> {
        self.check_same_shape("add_assign", other)?;
        match &mut self.memory {
            Memory::Cpu(v) => crate::ops::elementwise::add_assign_cpu(v, other.as_slice()),
            Memory::Cuda { buf, dtype } => {
                if other.device() != Device::Cuda(buf.runtime().ordinal()) || other.dtype() != *dtype {
                    return Err(shape_err("add_assign", "operands on different devices or of different types"));
                }
                if other.is_empty() {
                    return Ok(());
                }
                let rt = buf.runtime().clone();
                let plan = elementwise_cuda::add(other.len(), *dtype)?;
                rt.run(
                    &elementwise_cuda::SOURCE,
                    &plan,
                    &[(elementwise_cuda::Y, buf.ptr()), (elementwise_cuda::X, other.ptr())],
                )?;
            }
        }
        Ok(())
    }

    /// Overwrites the values with `other`'s (same shape, dtype and device), keeping this tensor's
    /// block: its address stays what earlier work and the allocator's pool know.
    pub fn copy_from(&mut self, other: &Tensor) -> Result<()> {
        self.check_same_shape("copy_from", other)?;
        if self.device() != other.device() || self.dtype() != other.dtype() {
            return Err(shape_err(
                "copy_from",
                format!("{:?} on {} from {:?} on {}", self.dtype(), self.device(), other.dtype(), other.device()),
            ));
        }
        match (&mut self.memory, &other.memory) {
            (Memory::Cpu(dst), Memory::Cpu(src)) => dst.copy_from_slice(src),
            (Memory::Cuda { buf, dtype }, Memory::Cuda { buf: src, .. }) => {
                let bytes = self.shape.iter().product::<usize>() * dtype_bytes(*dtype);
                buf.runtime().backend().copy(buf.ptr(), src.ptr(), bytes)?;
            }
            _ => unreachable!("devices checked above"),
        }
        Ok(())
    }

    /// Multiplies every value by `factor`.
    pub fn scale(&mut self, factor: f32) {
        match &mut self.memory {
            Memory::Cpu(v) => v.iter_mut().for_each(|a| *a *= factor),
            Memory::Cuda { buf, dtype } => {
                assert_eq!(*dtype, DType::F32, "scale is for f32 tensors");
                let (rt, n) = (buf.runtime().clone(), self.shape.iter().product::<usize>());
                if n > 0 {
                    let plan = elementwise_cuda::scale(n, factor).expect("n > 0");
                    rt.run(&elementwise_cuda::SOURCE, &plan, &[(elementwise_cuda::X, buf.ptr())])
                        .unwrap_or_else(|e| panic!("scale on cuda:{}: {e}", rt.ordinal()));
                }
            }
        }
    }

    /// Euclidean norm, accumulated in f64 (on the host).
    pub fn norm(&self) -> f64 {
        let norm = |v: &[f32]| v.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        match &self.memory {
            Memory::Cpu(v) => norm(v),
            Memory::Cuda { .. } => norm(&self.to_vec()),
        }
    }

    /// An error unless `other` has the same shape.
    pub fn check_same_shape(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.shape != other.shape {
            return Err(shape_err(op, format!("{:?} vs {:?}", self.shape, other.shape)));
        }
        Ok(())
    }

    /// Concatenation along the first dimension (the batch); all other dimensions, the device and the
    /// dtype must agree.
    pub fn cat(parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| shape_err("cat", "no tensors"))?;
        let inner = &first.shape[1..];
        let mut rows = 0;
        for p in parts {
            if &p.shape[1..] != inner || p.device() != first.device() || p.dtype() != first.dtype() {
                return Err(shape_err(
                    "cat",
                    format!("{:?} on {} vs {:?} on {}", p.shape, p.device(), first.shape, first.device()),
                ));
            }
            rows += p.shape[0];
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        if let Some(rt) = first.runtime() {
            let out = Tensor::device_uninit(rt, &shape, first.dtype())?;
            let mut at = 0;
            for p in parts {
                let (src, bytes) = p.device_block().expect("a device tensor");
                rt.backend().copy(out.ptr() + at as u64, src, bytes)?;
                at += bytes;
            }
            return Ok(out);
        }
        let mut out = Tensor::for_overwrite(&shape, Device::Cpu);
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
            return Err(shape_err("narrow", format!("rows {start}..{} of {:?}", start + count, self.shape)));
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = count;
        if let Some(rt) = self.runtime() {
            let out = Tensor::device_uninit(rt, &shape, self.dtype())?;
            let size = dtype_bytes(self.dtype());
            rt.backend().copy(out.ptr(), self.ptr() + (start * row * size) as u64, count * row * size)?;
            return Ok(out);
        }
        let mut out = Tensor::for_overwrite(&shape, Device::Cpu);
        out.as_mut_slice().copy_from_slice(&self.as_slice()[start * row..(start + count) * row]);
        Ok(out)
    }
}

/// f32 values as little-endian bytes (what a device copy takes).
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian f32 or bf16 bytes as f32 values.
fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::Bf16 => {
            bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
        }
    }
}

/// A tensor's values on their way to the host ([`Tensor::to_vec_later`]).
#[derive(Debug)]
pub enum PendingValues {
    /// Already on the host.
    Ready(Vec<f32>),
    /// A device copy in flight, of values stored as this type.
    Copying(crate::cuda::runtime::PendingDownload, DType),
}

impl PendingValues {
    /// Waits for the copy; the values as f32.
    pub fn wait(self) -> Result<Vec<f32>> {
        match self {
            PendingValues::Ready(v) => Ok(v),
            PendingValues::Copying(pending, dtype) => Ok(decode(&pending.wait()?, dtype)),
        }
    }
}
