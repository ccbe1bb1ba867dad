//! PyTorch checkpoints (`.pth`, `.pth.tar`, `.pt`) read safely, without Python: the official SwAV
//! weights (`swav_800ep_pretrain.pth.tar`, torch.hub `facebookresearch/swav:main`), training checkpoints
//! `{"epoch", "state_dict", "optimizer", "amp"}` and torchvision ResNet state dicts.
//!
//! ```no_run
//! use swav_model::checkpoint::{load_model_state, LoadOptions};
//! use swav_model::torch::read_torch_file;
//! use swav_model::{ModelConfig, SwavModel};
//!
//! let file = read_torch_file("swav_800ep_pretrain.pth.tar".as_ref())?;
//! println!("{} tensors from {} ({:?} format)", file.state.tensors.len(), file.container, file.format);
//! let mut model = SwavModel::new(ModelConfig::swav_resnet50(), 0)?;
//! // The loader strips the `module.` prefix of DistributedDataParallel.
//! load_model_state(&mut model, &file.state, "", LoadOptions::default())?;
//! # Ok::<(), swav_model::ModelError>(())
//! ```
//!
//! # Formats
//! - The zip archive of PyTorch >= 1.6 (`zip.rs`): `<folder>/data.pkl` plus one uncompressed entry per
//!   storage, `<folder>/byteorder`.
//! - The legacy stream of PyTorch < 1.6 (`legacy.rs`), what the official 2020 checkpoints are (saved by
//!   PyTorch 1.4): five pickles, then each storage as an element count and raw data.
//!
//! [`is_torch_file`] tells them (and safetensors) apart by content. Both hold a pickle whose tensors are
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` views of storages that live
//! outside the pickle. Storages of f32, f16, bf16 and f64 become [`Value::F32`] (f16 and bf16 exactly,
//! f64 rounded to nearest); i64, i32, i16, i8, u8 and bool become [`Value::I64`]. Views are made
//! contiguous (offsets, any strides, 0-d tensors); several tensors may share a storage.
//!
//! # Safety
//! A pickle is a program, and `torch.load` without `weights_only=True` runs it: a checkpoint can call
//! `os.system`. This reader runs none of it. Its pickle machine (`pickle.rs`) accepts only the opcodes
//! that state dicts use and only the globals `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the `torch.*Storage`
//! classes (exactly the set the fixtures written by PyTorch name); it refuses any other global by name
//! (`refusing global os.system`) at the opcode that names it. The allowed "calls" build descriptions in
//! Rust. Lengths, offsets, sizes and strides are checked against the bytes actually present before
//! anything is allocated; pickle objects take at most one arena node and one stack slot per input byte
//! (about 80 bytes per byte at worst, while a vector doubles), and the tensors produced from a file at
//! most 16 bytes per byte of it (`tensor.rs`). Nothing recurses, so nesting and cycles cannot overflow
//! the stack, and no input makes the reader panic.
//!
//! Refused on purpose: whole pickled modules (`torch.save(model)`: they name the model's classes),
//! numpy scalars (`numpy.core.multiarray.scalar`), TorchScript archives, sparse and quantized tensors,
//! stride-0 views larger than their storage (`expand`), and the storage views of pre-1.0 files.
//!
//! # Which dictionary is the state dict
//! The top-level object if it is a dict of tensors ([`Container::Bare`]); otherwise the largest dict of
//! tensors reachable through string keys of nested dicts (`OrderedDict` or `dict`, any depth), the
//! shallowest and then the first in file order on ties ([`Container::Key`]). In a training checkpoint
//! that is `state_dict`, not the optimizer's per-parameter `{"momentum_buffer": ...}` dicts (reached
//! through int keys, and smaller). Scalars (int, float, bool, str, None) of the dicts on the way are
//! reported in [`TorchFile::entries`], e.g. `epoch = 800`.
//!
//! # Crates: what was adopted, and why the pickle machine is our own
//! Candidates for the pickle machine, compared on what this reader must guarantee:
//!
//! | crate | maintenance | `BINPERSID` (PyTorch's storages) | refuses unknown globals by name | `REDUCE` | allocation safety | dependencies |
//! |---|---|---|---|---|---|---|
//! | `serde-pickle` 1.2 | maintained | no: the opcode is not implemented, no PyTorch file parses | no: an unknown global becomes an anonymous `Global::Other` (or `None` with `replace_unresolved_globals`), its name lost | never runs code; a fixed set (`set`, `bytearray`, `_codecs.encode`, ...) applied | lengths read incrementally (safe); memo references copied by a recursive conversion, so shared or deeply nested structures cost exponential memory or the stack | serde, num-bigint, num-traits, byteorder, iter-read |
//! | `repugnant-pickle` 0.0.1 | a single release, "low effort scraping" by its own description | yes | no: globals are kept as data, every caller must walk the tree | symbolic, never run | memo references resolved by deep copies (exponential on shared structures); an `expect` on a missing memo id panics | nom 7, anyhow, num-bigint, once_cell, zip 0.6 |
//! | `candle-core::pickle` 0.9 | maintained, inside candle | yes | no: unknown globals become `Object::Class`, their calls `Object::Reduce` | symbolic, never run | `vec![0; len]` with a 32-bit length from the file before reading it; memo `GET` deep-copies | all of candle-core (gemm, half, safetensors, zip, rayon, ...) |
//!
//! None runs code, but none refuses what it does not know: each returns a tree in which a malicious
//! global is just data, so safety would rest on every caller's walk of it; none bounds memory by the
//! input (a 4-byte length allocates 4 GiB, shared memo entries are deep-copied, conversion recurses);
//! one cannot read PyTorch's storages at all and another is a whole framework. Adapting one would mean
//! rewriting its core, so the machine is our own (`pickle.rs`): the allow-list is checked at the
//! `GLOBAL` opcode itself, objects live in an arena so a memo `GET` copies an index, and every length
//! is checked before allocation.
//!
//! For the zip container we adopt `rawzip` 0.5: no dependencies, no `unsafe`, zip64, zero-copy slices
//! of an in-memory archive, and its minimum Rust version (1.85) is the workspace's. The `zip` crate
//! (9.x) needs Rust 1.89 and is built around the compression codecs that PyTorch never uses; a
//! hand-written reader would have to redo zip64 and the directory checks. On top of it `zip.rs`
//! refuses compressed and overlapping entries and checks every CRC-32.

mod error;
pub(crate) mod legacy;
pub(crate) mod pickle;
pub(crate) mod tensor;
pub(crate) mod zip;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::path::Path;

pub use error::TorchError;

use crate::checkpoint::{NamedTensors, Value};
use crate::{ModelError, Result};
use pickle::{Node, NodeId, Pickle};
use tensor::{Budget, StorageData, View};

/// A PyTorch file's state dict and what surrounded it.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchFile {
    /// The tensors, named exactly as in the file (a `module.` prefix is kept; the loader strips it).
    /// `metadata` is empty: scalars of the file are in [`TorchFile::entries`].
    pub state: NamedTensors,
    /// Where in the file the state dict was.
    pub container: Container,
    /// Scalars (int, float, bool, str, None) of the dicts that lead to the state dict, e.g.
    /// `epoch -> "800"`, `arch -> "resnet50"`; keys of nested dicts are joined with `.`.
    /// Python's spelling: `True`, `False`, `None`, floats with a decimal point.
    pub entries: BTreeMap<String, String>,
    /// Which of PyTorch's two formats the file uses.
    pub format: TorchFormat,
}

/// Where the state dict was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Container {
    /// The file's top-level object is the state dict (`torch.save(model.state_dict())`).
    Bare,
    /// The state dict is the value at this path of string keys, e.g. `["state_dict"]` or `["model"]`.
    Key(Vec<String>),
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Container::Bare => write!(f, "a bare state dict"),
            Container::Key(path) => {
                let quoted: Vec<String> = path.iter().map(|k| format!("{k:?}")).collect();
                write!(f, "key {}", quoted.join(" > "))
            }
        }
    }
}

/// PyTorch's two file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchFormat {
    /// The zip archive of PyTorch >= 1.6.
    Zip,
    /// The stream of PyTorch < 1.6 (`_use_new_zipfile_serialization=False`).
    Legacy,
}

/// Reads a PyTorch checkpoint file (zip or legacy format, told apart by content).
pub fn read_torch_file(path: &Path) -> Result<TorchFile> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    parse(&bytes).map_err(|source| ModelError::Torch { path: path.display().to_string(), source })
}

/// Reads a PyTorch checkpoint held in memory; errors name the file `<memory>`.
pub fn read_torch_bytes(bytes: &[u8]) -> Result<TorchFile> {
    parse(bytes).map_err(|source| ModelError::Torch { path: "<memory>".into(), source })
}

/// Whether a file that starts with `bytes_prefix` (give at least its first 9 bytes) is a PyTorch file
/// rather than a safetensors file, by content: a zip local header, or a pickle protocol opcode
/// (`0x80`, protocol 2 to 5) followed by an opcode this reader runs.
///
/// A safetensors file starts with the little-endian length of its JSON header, then `{` at byte 8; a
/// header length whose first bytes look like a pickle (e.g. 640 = `80 02 00 ...`) is told apart by
/// that `{` and by the third byte, which is never 0 in a pickle.
pub fn is_torch_file(bytes_prefix: &[u8]) -> bool {
    if bytes_prefix.get(8) == Some(&b'{') {
        return false;
    }
    match bytes_prefix {
        [b'P', b'K', 3, 4, ..] => true,
        [0x80, 2..=5, op, ..] => pickle::is_supported_opcode(*op),
        _ => false,
    }
}

/// Where storages come from: the zip archive's entries or the legacy stream's tail.
#[derive(Clone, Copy)]
enum Source<'s, 'a> {
    Zip(&'s zip::Archive<'a>),
    Legacy(&'s legacy::Legacy<'a>),
}

impl Source<'_, '_> {
    fn storage<'k>(
        &'k self,
        key: &'k str,
        dtype: tensor::DType,
        numel: u64,
    ) -> std::result::Result<StorageData<'k>, TorchError> {
        let (bytes, big_endian) = match self {
            Source::Zip(a) => (a.storage(key, dtype, numel)?, a.big_endian),
            // The legacy writer converts every storage to little-endian.
            Source::Legacy(l) => (l.storage(key, dtype, numel)?, false),
        };
        Ok(StorageData { key, bytes, dtype, big_endian })
    }
}

fn parse(bytes: &[u8]) -> std::result::Result<TorchFile, TorchError> {
    if bytes.starts_with(zip::MAGIC) {
        let archive = zip::Archive::open(bytes)?;
        let (pickle, _) = pickle::unpickle(archive.pickle)?;
        build(&pickle, Source::Zip(&archive), TorchFormat::Zip, bytes.len())
    } else if is_torch_file(bytes) {
        let legacy = legacy::Legacy::read(bytes)?;
        build(&legacy.pickle, Source::Legacy(&legacy), TorchFormat::Legacy, bytes.len())
    } else {
        Err(TorchError::NotTorch)
    }
}

fn build(
    pickle: &Pickle,
    source: Source<'_, '_>,
    format: TorchFormat,
    file_len: usize,
) -> std::result::Result<TorchFile, TorchError> {
    let found = find_state_dict(pickle)?;
    let mut budget = Budget::for_input(file_len);
    let mut tensors = BTreeMap::new();
    for &(key, value) in pickle.dict(found.dict).unwrap_or_default() {
        let name = pickle.str(key).unwrap_or_default();
        tensors.insert(name.to_string(), read_tensor(pickle, source, name, value, &mut budget)?);
    }
    let state = NamedTensors { tensors, metadata: BTreeMap::new() };
    Ok(TorchFile { state, container: found.container, entries: found.entries, format })
}

/// One tensor of the state dict: its storage's bytes, then its view, checked and copied out.
fn read_tensor(
    pickle: &Pickle,
    source: Source<'_, '_>,
    name: &str,
    id: NodeId,
    budget: &mut Budget,
) -> std::result::Result<Value, TorchError> {
    let not_tensor = || TorchError::Tensor { name: name.to_string(), detail: "not a tensor".into() };
    let Node::Tensor(t) = pickle.node(id) else {
        return Err(not_tensor());
    };
    let Node::Storage(s) = pickle.node(t.storage) else {
        return Err(not_tensor());
    };
    let key = pickle.str(s.key).unwrap_or_default();
    let storage = source.storage(key, s.dtype, s.numel)?;
    let (size, stride) = (pickle.uints(t.size), pickle.uints(t.stride));
    tensor::materialize(name, storage, View { offset: t.offset, size: &size, stride: &stride }, budget)
}

/// The state dict, where it was, and the scalars on the way.
struct Found {
    dict: NodeId,
    container: Container,
    entries: BTreeMap<String, String>,
}

/// A dict whose keys are all strings and whose values are all tensors (and which is not empty).
fn is_state_dict(pickle: &Pickle, id: NodeId) -> Option<usize> {
    let items = pickle.dict(id)?;
    let ok = !items.is_empty()
        && items.iter().all(|&(k, v)| pickle.str(k).is_some() && matches!(pickle.node(v), Node::Tensor(_)));
    ok.then_some(items.len())
}

/// Breadth-first search of nested dicts through string keys (see the module docs for the rule). Each
/// dict is visited once, so shared or cyclic structures cost no more than their size.
fn find_state_dict(pickle: &Pickle) -> std::result::Result<Found, TorchError> {
    let root = pickle.root();
    if is_state_dict(pickle, root).is_some() {
        return Ok(Found { dict: root, container: Container::Bare, entries: BTreeMap::new() });
    }
    // Each visited dict: (node, parent index, key that led to it).
    let mut visited: Vec<(NodeId, usize, NodeId)> = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([(root, usize::MAX, root)]);
    let mut best: Option<(usize, usize)> = None; // (tensor count, index in `visited`)
    while let Some((id, parent, key)) = queue.pop_front() {
        let index = visited.len();
        visited.push((id, parent, key));
        if let Some(n) = is_state_dict(pickle, id) {
            if best.is_none_or(|(m, _)| n > m) {
                best = Some((n, index));
            }
            continue;
        }
        for &(k, v) in pickle.dict(id).unwrap_or_default() {
            if pickle.str(k).is_some() && pickle.dict(v).is_some() && seen.insert(v) {
                queue.push_back((v, index, k));
            }
        }
    }
    let Some((_, index)) = best else {
        return Err(TorchError::NoStateDict(format!(
            "the top-level object is a {} and no dict of tensors is reachable through string keys",
            pickle::kind(pickle.node(root))
        )));
    };
    Ok(path_to(pickle, &visited, index))
}

/// The key path from the root to `visited[index]`, and the scalars of the dicts along it.
fn path_to(pickle: &Pickle, visited: &[(NodeId, usize, NodeId)], index: usize) -> Found {
    let (mut keys, mut ancestors) = (Vec::new(), Vec::new());
    let mut i = index;
    while let Some(&(_, parent, key)) = visited.get(i) {
        if parent == usize::MAX {
            break;
        }
        keys.push(pickle.str(key).unwrap_or_default().to_string());
        ancestors.push(parent);
        i = parent;
    }
    keys.reverse();
    ancestors.reverse();
    let mut entries = BTreeMap::new();
    for (depth, &a) in ancestors.iter().enumerate() {
        let prefix: String = keys[..depth].iter().map(|k| format!("{k}.")).collect();
        collect_scalars(pickle, visited[a].0, &prefix, &mut entries);
    }
    Found { dict: visited[index].0, container: Container::Key(keys), entries }
}

fn collect_scalars(pickle: &Pickle, dict: NodeId, prefix: &str, out: &mut BTreeMap<String, String>) {
    for &(k, v) in pickle.dict(dict).unwrap_or_default() {
        let Some(key) = pickle.str(k) else { continue };
        let text = match pickle.node(v) {
            Node::None => "None".to_string(),
            Node::Bool(true) => "True".to_string(),
            Node::Bool(false) => "False".to_string(),
            Node::Int(i) => i.to_string(),
            Node::Float(x) => format!("{x:?}"),
            Node::Str(s) => s.to_string(),
            _ => continue,
        };
        out.insert(format!("{prefix}{key}"), text);
    }
}
