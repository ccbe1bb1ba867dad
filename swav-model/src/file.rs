//! The model file: one safetensors file holding a whole SwAV network with torchvision / official
//! SwAV tensor names (see [`crate::checkpoint`]) and, in its string metadata, everything needed to
//! use it without anything else: the network's configuration and its preprocessing. [`ModelFile`]
//! is the only reader and writer of that format; training, evaluation, embedding and export all go
//! through it, so the same file gets the same preprocessing everywhere.
//!
//! Metadata keys: [`META_FORMAT`] (`swav-rs`), [`META_CONFIG`] (the [`ModelConfig`] as JSON),
//! [`META_ARCH`] (for other tools), [`META_MEAN`], [`META_STD`], [`META_INPUT_SIZE`]; a writer may
//! add its own keys (the trainer adds `step`, `epoch`, `train_data`).
//!
//! A file is hostile until checked: its configuration is validated and the size of the network it
//! describes is compared with the values the file actually holds before anything is allocated for
//! it, and every tensor must be finite.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::{load_model_state, model_state, LoadOptions, NamedTensors, Value};
use crate::config::ModelConfig;
use crate::preprocessing::{Overrides, Preprocessing};
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
/// The format tag of a swav-rs model file.
pub const FORMAT: &str = "swav-rs";

/// A network with its preprocessing and the file's other metadata.
pub struct ModelFile {
    /// The network, in evaluation-ready state (running statistics loaded).
    pub model: SwavModel,
    /// The preprocessing it expects.
    pub preprocessing: Preprocessing,
    /// Every metadata entry of the file (including the ones above).
    pub metadata: BTreeMap<String, String>,
}

impl ModelFile {
    /// Reads a model file with the preprocessing it records (defaults for what it does not).
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
        let state = NamedTensors::read(path)?;
        let config = config_of(path, &state)?;
        check_state(path, &config, &state)?;
        let mut model = SwavModel::new(config, 0)?;
        load_model_state(&mut model, &state, "", LoadOptions::default())?;
        let preprocessing = Preprocessing::resolve(&model.config, &state.metadata, overrides)?;
        Ok(ModelFile { model, preprocessing, metadata: state.metadata })
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

/// Refuses a file whose configuration describes a network much larger than the values the file holds
/// (before any allocation for it), and any non-finite value, naming the tensor. The margin lets a
/// file that merely lacks a few tensors through to the loader, which names them; what it can make us
/// allocate stays bounded by the file's own size.
fn check_state(path: &Path, config: &ModelConfig, state: &NamedTensors) -> Result<()> {
    let held: u128 = state.tensors.values().map(|v| v.shape().iter().map(|&d| d as u128).product::<u128>()).sum();
    let needed = config.state_values();
    if needed > 2 * held + (1 << 20) {
        return Err(ModelError::Format {
            path: path.display().to_string(),
            detail: format!(
                "`{META_CONFIG}` describes a network of {needed} values but the file holds {held}: the metadata does not match the tensors"
            ),
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
