//! The model file: one safetensors file holding a whole SwAV network with torchvision / official
//! SwAV tensor names (see [`crate::checkpoint`]) and, in its string metadata, everything needed to
//! use it without anything else: the network's configuration and its preprocessing. [`ModelFile`]
//! is the only reader and writer of that format; training, evaluation, embedding and export all go
//! through it, so the same file gets the same preprocessing everywhere.
//!
//! Metadata keys: [`META_FORMAT`] (`swav-rs`), [`META_CONFIG`] (the [`ModelConfig`] as JSON),
//! [`META_ARCH`] (for other tools), [`META_MEAN`], [`META_STD`], [`META_INPUT_SIZE`]; optionally
//! [`META_HEAD`] (`fresh`: the head and prototypes were never trained, the file was made from a
//! backbone), [`META_IMPORTED_FROM`], [`META_EPOCH`]; a writer may add its own keys (the trainer adds
//! `step`, `epoch`, `train_data`).
//!
//! [`ModelFile::read`] also reads the files of the PyTorch world, told apart by content, not by
//! extension: PyTorch checkpoints (`.pth`, `.pth.tar`: the official SwAV weights and training
//! checkpoints, torchvision state dicts; read by [`crate::torch`]) and safetensors state dicts without
//! swav-rs metadata (written by other tools). Their network is recognised from the tensor names and
//! shapes ([`crate::detect`](fn@crate::detect)); a file holding only a backbone gets the default head, freshly
//! initialised, and torchvision's classifier `fc.*` is left out. Their preprocessing is what such a
//! file records in swav-rs's metadata keys (a safetensors file may), else the defaults (ImageNet's
//! normalisation for 3-channel models), reported as defaults ([`crate::Source::Default`]).
//! [`ModelFile::origin`] says what was read.
//!
//! A file is hostile until checked: its configuration is validated and the size of the network it
//! describes is compared with the values the file actually holds before anything is allocated for
//! it, and every tensor must be finite.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::checkpoint::{load_model_state, model_state, LoadOptions, NamedTensors, Value};
use crate::config::ModelConfig;
use crate::detect::detect;
use crate::preprocessing::{Overrides, Preprocessing};
use crate::torch::{is_torch_file, read_torch_file, Container, TorchFormat};
use crate::{ModelError, Result, SwavModel};

/// Metadata key of the format tag.
pub const META_FORMAT: &str = "format";
/// Metadata key of the model configuration (JSON).
pub const META_CONFIG: &str = "model_config";
/// Metadata key of the architecture name (`resnet50`, ...), for tools that do not parse the config.
pub const META_ARCH: &str = "arch";
/// Metadata key of the channel means (JSON array).
pub const META_MEAN: &str = "mean";
/// Metadata key of the channel standard deviations (JSON array).
pub const META_STD: &str = "std";
/// Metadata key of the input image side (integer).
pub const META_INPUT_SIZE: &str = "input_size";
/// Metadata key that marks a projection head and prototypes that were never trained (value
/// [`HEAD_FRESH`]): the file was made from a backbone alone, so only its features are meaningful.
pub const META_HEAD: &str = "head";
/// The value of [`META_HEAD`] for a freshly initialised head.
pub const HEAD_FRESH: &str = "fresh";
/// Metadata key naming the file a model was imported from, with where its state dict was in it.
pub const META_IMPORTED_FROM: &str = "imported_from";
/// Metadata key of the training epoch the weights come from.
pub const META_EPOCH: &str = "epoch";
/// The format tag of a swav-rs model file.
pub const FORMAT: &str = "swav-rs";

/// A network with its preprocessing and the file's other metadata.
pub struct ModelFile {
    /// The network, in evaluation-ready state (running statistics loaded).
    pub model: SwavModel,
    /// The preprocessing it expects.
    pub preprocessing: Preprocessing,
    /// Every metadata entry of a safetensors file (including the ones above); empty for a PyTorch
    /// file, whose scalars are in [`Origin::entries`].
    pub metadata: BTreeMap<String, String>,
    /// What kind of file it was and what came from it.
    pub origin: Origin,
}

/// The kinds of file [`ModelFile::read`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A swav-rs model file: safetensors with the configuration in its metadata.
    SwavRs,
    /// A safetensors state dict without swav-rs's configuration; the network was detected.
    Safetensors,
    /// A PyTorch checkpoint; the network was detected.
    Torch(TorchFormat),
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::SwavRs => "swav-rs model file",
            FileKind::Safetensors => "safetensors state dict",
            FileKind::Torch(TorchFormat::Zip) => "PyTorch checkpoint (zip format)",
            FileKind::Torch(TorchFormat::Legacy) => "PyTorch checkpoint (legacy format)",
        })
    }
}

/// Where a [`ModelFile`]'s network came from, so that callers can say what they loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// The kind of file.
    pub kind: FileKind,
    /// Whether the projection head and prototypes come from the file. `false` for a backbone-only
    /// file (a torchvision ResNet, or a model file marked [`HEAD_FRESH`]): they are a fresh
    /// initialisation then, and only the backbone's features mean anything.
    pub head: bool,
    /// Tensors of the file left out because they are not part of a SwAV network (torchvision's
    /// classifier `fc.weight`, `fc.bias`).
    pub ignored: Vec<String>,
    /// PyTorch files: where the state dict was in the file.
    pub container: Option<Container>,
    /// PyTorch files: the scalars around the state dict (`epoch`, `arch`, ...).
    pub entries: BTreeMap<String, String>,
}

impl ModelFile {
    /// Reads a model file with the preprocessing it records (defaults for what it does not).
    /// Accepts swav-rs model files, PyTorch checkpoints and safetensors state dicts (see the module
    /// docs).
    pub fn read(path: &Path) -> Result<ModelFile> {
        Self::read_with(path, &Overrides::default())
    }

    /// Reads a model file; `overrides` replace the recorded preprocessing values.
    pub fn read_with(path: &Path, overrides: &Overrides) -> Result<ModelFile> {
        if path.is_dir() {
            return Err(ModelError::Format {
                path: path.display().to_string(),
                detail: "this is a directory: pass a model file, e.g. <run-dir>/checkpoints/step-NNNNNNNN.safetensors"
                    .into(),
            });
        }
        if starts_like_torch(path)? {
            let file = read_torch_file(path)?;
            let origin = Origin {
                kind: FileKind::Torch(file.format),
                head: true,
                ignored: Vec::new(),
                container: Some(file.container),
                entries: file.entries,
            };
            // A pickle's scalars are not swav-rs metadata: the preprocessing is the defaults.
            return read_detected(path, file.state, BTreeMap::new(), origin, overrides);
        }
        let state = NamedTensors::read(path)?;
        if !state.metadata.contains_key(META_CONFIG) {
            let origin = Origin {
                kind: FileKind::Safetensors,
                head: true,
                ignored: Vec::new(),
                container: None,
                entries: BTreeMap::new(),
            };
            let metadata = state.metadata.clone();
            return read_detected(path, state, metadata, origin, overrides);
        }
        let config = config_of(path, &state)?;
        check_state(path, &config, &state, META_CONFIG)?;
        let mut model = SwavModel::new(config, 0)?;
        load_model_state(&mut model, &state, "", LoadOptions::default())?;
        let preprocessing = Preprocessing::resolve(&model.config, &state.metadata, overrides)?;
        let origin = Origin {
            kind: FileKind::SwavRs,
            head: state.metadata.get(META_HEAD).is_none_or(|v| v != HEAD_FRESH),
            ignored: Vec::new(),
            container: None,
            entries: BTreeMap::new(),
        };
        Ok(ModelFile { model, preprocessing, metadata: state.metadata, origin })
    }

    /// Writes `model` with `preprocessing` and the `extra` metadata entries, atomically.
    pub fn write(
        model: &mut SwavModel,
        preprocessing: &Preprocessing,
        extra: &BTreeMap<String, String>,
        path: &Path,
    ) -> Result<()> {
        let mut state = model_state(model);
        state.metadata = extra.clone();
        state.metadata.extend(preprocessing.to_metadata());
        state.metadata.insert(META_FORMAT.into(), FORMAT.into());
        state.metadata.insert(META_ARCH.into(), model.config.arch.name().into());
        let config = serde_json::to_string(&model.config).map_err(|e| ModelError::Config(e.to_string()))?;
        state.metadata.insert(META_CONFIG.into(), config);
        state.write(path)
    }
}

/// Whether the file at `path` is a PyTorch file, from its first bytes.
fn starts_like_torch(path: &Path) -> Result<bool> {
    let io = |source| ModelError::Io { path: path.display().to_string(), source };
    let mut prefix = Vec::with_capacity(16);
    std::fs::File::open(path).map_err(io)?.take(16).read_to_end(&mut prefix).map_err(io)?;
    Ok(is_torch_file(&prefix))
}

/// A state dict without swav-rs's configuration: its network is detected, `fc.*` is left out, a
/// backbone-only file gets the default head, and the preprocessing comes from `metadata` (what the
/// file records in swav-rs's keys) or the defaults.
fn read_detected(
    path: &Path,
    mut state: NamedTensors,
    metadata: BTreeMap<String, String>,
    mut origin: Origin,
    overrides: &Overrides,
) -> Result<ModelFile> {
    // The trainer's optimizer state (`step-N.train.safetensors`) is safetensors without a config too.
    let training_state = |k: &String| k.starts_with("momentum.") || k.starts_with("queue.");
    if !state.tensors.is_empty() && state.tensors.keys().all(training_state) {
        return Err(ModelError::Format {
            path: path.display().to_string(),
            detail: "this is a training-state file (momentum buffers and queue): pass the model file beside it, step-NNNNNNNN.safetensors".into(),
        });
    }
    let detection = detect(&state, None).map_err(|e| match e {
        ModelError::Unrecognised { detail, .. } => {
            ModelError::Unrecognised { path: path.display().to_string(), detail }
        }
        other => other,
    })?;
    for name in &detection.ignored {
        state.tensors.remove(name);
    }
    check_state(path, &detection.config, &state, "the tensor shapes")?;
    let mut model = SwavModel::new(detection.config.clone(), 0)?;
    let opts = LoadOptions { allow_missing: !detection.head, allow_unexpected: false };
    let report = load_model_state(&mut model, &state, "", opts)?;
    let backbone_missing: Vec<&String> = report.missing.iter().filter(|n| is_backbone_name(n)).collect();
    if !backbone_missing.is_empty() {
        return Err(ModelError::Mismatch(format!(
            "{} backbone tensors missing from {}: {}",
            backbone_missing.len(),
            path.display(),
            backbone_missing.iter().take(8).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let preprocessing = Preprocessing::resolve(&model.config, &metadata, overrides)?;
    origin.head = detection.head;
    origin.ignored = detection.ignored;
    Ok(ModelFile { model, preprocessing, metadata, origin })
}

/// Whether a tensor name belongs to the backbone (`conv1`, `bn1`, `layer1` .. `layer4`), as opposed
/// to the projection head and the prototypes.
pub fn is_backbone_name(name: &str) -> bool {
    let name = name.strip_prefix("module.").unwrap_or(name);
    name.starts_with("conv1.") || name.starts_with("bn1.") || name.starts_with("layer")
}

/// The configuration stored in a model file's metadata, validated.
pub fn config_of(path: &Path, state: &NamedTensors) -> Result<ModelConfig> {
    let raw = state.metadata.get(META_CONFIG).ok_or_else(|| ModelError::Format {
        path: path.display().to_string(),
        detail: format!("no `{META_CONFIG}` in the metadata: not a swav-rs model file"),
    })?;
    let config: ModelConfig = serde_json::from_str(raw).map_err(|e| ModelError::Format {
        path: path.display().to_string(),
        detail: format!("`{META_CONFIG}`: {e}"),
    })?;
    config.validate().map_err(|e| ModelError::Format {
        path: path.display().to_string(),
        detail: format!("`{META_CONFIG}`: {e}"),
    })?;
    Ok(config)
}

/// Refuses a file whose configuration (taken from `what`) describes a network much larger than the
/// values the file holds (before any allocation for it), and any non-finite value, naming the
/// tensor. The margin lets a file that merely lacks a few tensors through to the loader, which names
/// them, and covers the default head of a backbone-only file (at most about a fifth of its
/// backbone); what it can make us allocate stays bounded by the file's own size.
fn check_state(path: &Path, config: &ModelConfig, state: &NamedTensors, what: &str) -> Result<()> {
    let held: u128 = state.tensors.values().map(|v| v.shape().iter().map(|&d| d as u128).product::<u128>()).sum();
    let needed = config.state_values();
    if needed > 2 * held + (1 << 20) {
        let (what, why) = if what == META_CONFIG {
            (format!("`{META_CONFIG}` describes"), "the metadata does not match the tensors")
        } else {
            (format!("{what} describe"), "the tensors do not fit together")
        };
        return Err(ModelError::Format {
            path: path.display().to_string(),
            detail: format!("{what} a network of {needed} values but the file holds {held}: {why}"),
        });
    }
    for (name, value) in &state.tensors {
        if let Value::F32 { data, .. } = value {
            if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite { name: name.clone(), value: *bad });
            }
        }
    }
    Ok(())
}
