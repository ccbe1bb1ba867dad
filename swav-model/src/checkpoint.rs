//! safetensors checkpoints with torchvision / official SwAV names and PyTorch layouts.
//!
//! Convolution weights are stored OIHW (PyTorch) and converted to our OHWI at load, back at save, so a
//! torchvision ResNet loads our backbone unchanged. `num_batches_tracked` is an int64 scalar as in
//! PyTorch. Loading accepts F32/F16/BF16/F64 tensors, strips the `module.` prefix that
//! DistributedDataParallel adds to every name (the official release has it), and reports missing and
//! unexpected names. Files are written atomically: temporary file, fsync, rename.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use swav_tensor::Tensor;

use crate::param::{Layout, Slot, Visit};
use crate::{ModelError, Result};

/// One tensor of a checkpoint, in PyTorch's layout.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Floating-point values (F16, BF16 and F64 tensors are converted to f32 on reading).
    F32 {
        /// The shape (PyTorch's layout).
        shape: Vec<usize>,
        /// The values, row-major.
        data: Vec<f32>,
    },
    /// Integer values (batch counters; I32 tensors are widened on reading).
    I64 {
        /// The shape (`[]` for a scalar).
        shape: Vec<usize>,
        /// The values, row-major.
        data: Vec<i64>,
    },
}

impl Value {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32 { shape, .. } | Value::I64 { shape, .. } => shape,
        }
    }

    /// A host copy of `t` as F32, shape unchanged (no layout conversion).
    pub fn from_tensor(t: &Tensor) -> Value {
        Value::F32 { shape: t.shape().to_vec(), data: t.to_vec() }
    }
}

/// A set of named tensors plus string metadata: what a safetensors file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamedTensors {
    /// The tensors by name, sorted.
    pub tensors: BTreeMap<String, Value>,
    /// The safetensors `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
}

/// What [`load_model_state`] matched.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Model entries given a value from the file.
    pub loaded: usize,
    /// Model entries the file lacks (batch counters excepted: PyTorch also loads checkpoints without them).
    pub missing: Vec<String>,
    /// File entries under the prefix that the model does not have (names without `module.`).
    pub unexpected: Vec<String>,
}

/// What [`load_model_state`] tolerates; the default is an exact match.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Leave model entries absent from the file at their current values instead of failing.
    pub allow_missing: bool,
    /// Ignore file entries the model does not have instead of failing.
    pub allow_unexpected: bool,
}

impl NamedTensors {
    /// Reads a safetensors file ([`ModelError::Io`], [`ModelError::Format`]).
    pub fn read(path: &Path) -> Result<NamedTensors> {
        let bytes =
            std::fs::read(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        Self::from_bytes(&bytes).map_err(|detail| ModelError::Format { path: path.display().to_string(), detail })
    }

    /// Parses the bytes of a safetensors file; F32/F16/BF16/F64 tensors become [`Value::F32`], I64/I32
    /// [`Value::I64`]. The error says what is wrong (another dtype, a damaged header...).
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<NamedTensors, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let value = decode(&name, &view)?;
            tensors.insert(name, value);
        }
        Ok(NamedTensors { tensors, metadata })
    }

    /// The safetensors encoding (F32 and I64 tensors, the metadata as `__metadata__`).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, v)| match v {
                Value::F32 { shape, data } => {
                    (name.clone(), Dtype::F32, shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                Value::I64 { shape, data } => {
                    (name.clone(), Dtype::I64, shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
            })
            .collect();
        let views = raw
            .iter()
            .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.as_str(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Format { path: "<memory>".into(), detail: e.to_string() })?;
        let info: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        safetensors::tensor::serialize(views, Some(info))
            .map_err(|e| ModelError::Format { path: "<memory>".into(), detail: e.to_string() })
    }

    /// Writes atomically (see [`swav_core::fs::atomic_write`]): a crash leaves the old file or the new
    /// one, never a partial checkpoint.
    pub fn write(&self, path: &Path) -> Result<()> {
        atomic_write(path, &self.to_bytes()?)
    }

    /// An F32 tensor by name, with its shape.
    pub fn f32(&self, name: &str) -> Result<(&[usize], &[f32])> {
        match self.tensors.get(name) {
            Some(Value::F32 { shape, data }) => Ok((shape, data)),
            Some(Value::I64 { .. }) => Err(ModelError::TensorDtype { name: name.into(), dtype: "I64".into() }),
            None => Err(ModelError::Mismatch(format!("tensor `{name}` is missing"))),
        }
    }

    /// An F32 tensor by name as a CPU [`Tensor`], in the file's (PyTorch) layout.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (shape, data) = self.f32(name)?;
        Ok(Tensor::from_slice(shape, data)?)
    }
}

fn decode(name: &str, view: &TensorView<'_>) -> std::result::Result<Value, String> {
    let shape = view.shape().to_vec();
    let b = view.data();
    let f32s = |f: fn(&[u8]) -> f32, size: usize| Value::F32 {
        shape: shape.clone(),
        data: b.chunks_exact(size).map(f).collect(),
    };
    Ok(match view.dtype() {
        Dtype::F32 => f32s(|c| f32::from_le_bytes(c.try_into().unwrap()), 4),
        Dtype::F64 => f32s(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32, 8),
        Dtype::F16 => f32s(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32(), 2),
        Dtype::BF16 => f32s(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32(), 2),
        Dtype::I64 => {
            Value::I64 { shape, data: b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect() }
        }
        Dtype::I32 => Value::I64 {
            shape,
            data: b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        },
        other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
    })
}

/// Writes `bytes` to `path` atomically (swav-core's [`swav_core::fs::atomic_write`]), reporting a
/// failure as a checkpoint error.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    swav_core::fs::atomic_write(path, bytes)
        .map_err(|e| ModelError::Io { path: e.path.display().to_string(), source: e.source })
}

/// The PyTorch (OIHW) shape of an OHWI weight.
pub fn oihw_shape(ohwi: &[usize]) -> Vec<usize> {
    vec![ohwi[0], ohwi[3], ohwi[1], ohwi[2]]
}

/// OHWI `[o, kh, kw, i]` -> OIHW `[o, i, kh, kw]`.
pub fn ohwi_to_oihw(shape: &[usize], data: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let [o, kh, kw, i] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for a in 0..o {
        for y in 0..kh {
            for x in 0..kw {
                for c in 0..i {
                    out[((a * i + c) * kh + y) * kw + x] = data[((a * kh + y) * kw + x) * i + c];
                }
            }
        }
    }
    (vec![o, i, kh, kw], out)
}

/// OIHW `[o, i, kh, kw]` -> OHWI `[o, kh, kw, i]`.
pub fn oihw_to_ohwi(shape: &[usize], data: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let [o, i, kh, kw] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for a in 0..o {
        for c in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out[((a * kh + y) * kw + x) * i + c] = data[((a * i + c) * kh + y) * kw + x];
                }
            }
        }
    }
    (vec![o, kh, kw, i], out)
}

/// A parameter-shaped tensor in PyTorch's layout.
fn to_torch(t: &Tensor, layout: Layout) -> Value {
    match layout {
        Layout::Ohwi => {
            let (shape, data) = ohwi_to_oihw(t.shape(), &t.to_vec());
            Value::F32 { shape, data }
        }
        Layout::Plain => Value::from_tensor(t),
    }
}

/// The model's parameters, buffers and counters, named and in PyTorch's layouts.
pub fn model_state(model: &mut impl Visit) -> NamedTensors {
    let mut state = NamedTensors::default();
    model.visit("", &mut |name, slot| {
        let value = match slot {
            Slot::Param(p) => to_torch(&p.value, p.layout),
            Slot::Buffer(t) => Value::from_tensor(t),
            Slot::Counter(c) => Value::I64 { shape: vec![], data: vec![*c] },
        };
        state.tensors.insert(name.to_string(), value);
    });
    state
}

/// The accumulated gradient of every parameter, named and in PyTorch's layouts.
pub fn model_grads(model: &mut impl Visit) -> NamedTensors {
    let mut grads = NamedTensors::default();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            grads.tensors.insert(name.to_string(), to_torch(&p.grad, p.layout));
        }
    });
    grads
}

/// Loads the entries named `prefix + model name` (or `prefix + "module." + model name`) into the model.
/// Shapes must match exactly; the error names the tensor.
pub fn load_model_state(
    model: &mut impl Visit,
    state: &NamedTensors,
    prefix: &str,
    opts: LoadOptions,
) -> Result<LoadReport> {
    // Map stripped names to file names, so `module.conv1.weight` serves `conv1.weight`.
    let mut by_name: BTreeMap<String, &str> = BTreeMap::new();
    for key in state.tensors.keys() {
        if let Some(rest) = key.strip_prefix(prefix) {
            by_name.insert(rest.strip_prefix("module.").unwrap_or(rest).to_string(), key);
        }
    }
    let mut report = LoadReport::default();
    let mut error: Option<ModelError> = None;
    let mut used = std::collections::BTreeSet::new();
    model.visit("", &mut |name, slot| {
        if error.is_some() {
            return;
        }
        let Some(&key) = by_name.get(name) else {
            // PyTorch itself tolerates checkpoints without `num_batches_tracked` (older versions).
            if !matches!(slot, Slot::Counter(_)) {
                report.missing.push(name.to_string());
            }
            return;
        };
        used.insert(name.to_string());
        if let Err(e) = assign(name, slot, &state.tensors[key]) {
            error = Some(e);
        } else {
            report.loaded += 1;
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    report.unexpected = by_name.keys().filter(|k| !used.contains(*k)).cloned().collect();
    let list = |v: &[String]| {
        let shown: Vec<&str> = v.iter().take(8).map(String::as_str).collect();
        let more = if v.len() > 8 { format!(" and {} more", v.len() - 8) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    };
    if !opts.allow_missing && !report.missing.is_empty() {
        return Err(ModelError::Mismatch(format!(
            "{} tensors missing from the checkpoint: {}",
            report.missing.len(),
            list(&report.missing)
        )));
    }
    if !opts.allow_unexpected && !report.unexpected.is_empty() {
        return Err(ModelError::Mismatch(format!(
            "{} tensors in the checkpoint are not in the model: {}",
            report.unexpected.len(),
            list(&report.unexpected)
        )));
    }
    Ok(report)
}

fn assign(name: &str, slot: Slot<'_>, value: &Value) -> Result<()> {
    let mismatch = |want: &[usize]| ModelError::TensorShape {
        name: name.into(),
        got: value.shape().to_vec(),
        want: want.to_vec(),
    };
    match (slot, value) {
        (Slot::Param(p), Value::F32 { shape, data }) => {
            let (shape, data) = if p.layout == Layout::Ohwi {
                if shape.len() != 4 {
                    return Err(mismatch(&oihw_shape(p.value.shape())));
                }
                oihw_to_ohwi(shape, data)
            } else {
                (shape.clone(), data.clone())
            };
            if shape != p.value.shape() {
                let want =
                    if p.layout == Layout::Ohwi { oihw_shape(p.value.shape()) } else { p.value.shape().to_vec() };
                return Err(mismatch(&want));
            }
            p.value.as_mut_slice().copy_from_slice(&data);
        }
        (Slot::Buffer(t), Value::F32 { shape, data }) => {
            if shape != t.shape() {
                return Err(mismatch(t.shape()));
            }
            t.as_mut_slice().copy_from_slice(data);
        }
        (Slot::Counter(c), Value::I64 { data, .. }) if data.len() == 1 => *c = data[0],
        (Slot::Counter(c), Value::F32 { data, .. }) if data.len() == 1 => *c = data[0] as i64,
        (Slot::Counter(_), _) => return Err(mismatch(&[])),
        (_, Value::I64 { .. }) => return Err(ModelError::TensorDtype { name: name.into(), dtype: "I64".into() }),
    }
    Ok(())
}
