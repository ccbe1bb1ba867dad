//! Pretrained starts: weights from any model file ([`ModelFile::read`]: swav-rs model files, PyTorch
//! checkpoints, foreign safetensors) loaded into a network that was built for training, so that a
//! run can start from the official SwAV weights or a torchvision ResNet instead of from scratch.
//!
//! - [`InitScope::Whole`]: every tensor (backbone, projection head, prototypes, running statistics)
//!   comes from the file; the two networks must be the same one ([`ModelConfig::canonical`]), and the
//!   file's head must have been trained (not a backbone-only file's fresh head).
//! - [`InitScope::Backbone`]: only `conv1`, `bn1` and `layer*` (weights and running statistics) come
//!   from the file; the projection head and prototypes keep the model's fresh initialisation, so the
//!   head may differ from the file's (another `feat_dim`, other prototype counts). The backbones must
//!   be the same.
//!
//! Mismatches are refused before anything is changed, with both configurations named; the loader
//! then names any tensor that does not fit. [`InitReport`] says what was loaded and what was kept.

use std::collections::BTreeSet;
use std::path::Path;

use crate::checkpoint::{load_model_state, model_state, LoadOptions, NamedTensors};
use crate::config::ModelConfig;
use crate::file::{is_backbone_name, ModelFile, Origin};
use crate::param::Visit;
use crate::{ModelError, Result, SwavModel};

/// Which tensors a pretrained start takes from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitScope {
    /// Backbone, head and prototypes.
    Whole,
    /// `conv1`, `bn1` and `layer*` only; the head and prototypes stay as initialised.
    Backbone,
}

/// What [`init_from_file`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct InitReport {
    /// The scope that was asked for.
    pub scope: InitScope,
    /// Names of the model's tensors (parameters, running statistics, batch counters) that now hold
    /// the file's values, sorted.
    pub loaded: Vec<String>,
    /// Names of the model's tensors left at their initial values (the head and prototypes with
    /// [`InitScope::Backbone`]), sorted.
    pub kept: Vec<String>,
    /// The network the file holds.
    pub source_config: ModelConfig,
    /// What kind of file it was and what came from it.
    pub origin: Origin,
}

/// Loads the weights of the model file at `path` into `model` (see the module docs).
pub fn init_from_file(model: &mut SwavModel, path: &Path, scope: InitScope) -> Result<InitReport> {
    let mut file = ModelFile::read(path)?;
    let shown = path.display().to_string();
    init_from(model, &mut file, scope, &shown)
}

/// Loads the weights of an already read model file into `model`; `name` names the file in errors.
pub fn init_from(model: &mut SwavModel, file: &mut ModelFile, scope: InitScope, name: &str) -> Result<InitReport> {
    let (want, have) = (model.config.canonical(), file.model.config.canonical());
    match scope {
        InitScope::Whole => {
            if !file.origin.head {
                return Err(ModelError::Mismatch(format!(
                    "{name} holds no trained projection head or prototypes (a backbone-only {}): start from its backbone only",
                    file.origin.kind
                )));
            }
            if want != have {
                return Err(ModelError::Mismatch(format!(
                    "{name} holds {} but the model is {}: start from its backbone only, or build the model with the file's configuration",
                    describe(&have),
                    describe(&want)
                )));
            }
        }
        InitScope::Backbone => {
            let backbone = |c: &ModelConfig| (c.arch, c.width, c.small_stem, c.in_channels);
            if backbone(&want) != backbone(&have) {
                return Err(ModelError::Mismatch(format!(
                    "{name} holds a {} backbone but the model's is {}",
                    describe_backbone(&have),
                    describe_backbone(&want)
                )));
            }
        }
    }
    let mut state = model_state(&mut file.model);
    if scope == InitScope::Backbone {
        state.tensors.retain(|k, _| is_backbone_name(k));
    }
    let opts = LoadOptions { allow_missing: scope == InitScope::Backbone, allow_unexpected: false };
    load_model_state(model, &state, "", opts)?;
    let (loaded, kept) = split_names(model, &state);
    Ok(InitReport { scope, loaded, kept, source_config: file.model.config.clone(), origin: file.origin.clone() })
}

/// The model's names that `state` provided, and the others.
fn split_names(model: &mut SwavModel, state: &NamedTensors) -> (Vec<String>, Vec<String>) {
    let provided: BTreeSet<&String> = state.tensors.keys().collect();
    let mut all = BTreeSet::new();
    model.visit("", &mut |name, _| {
        all.insert(name.to_string());
    });
    let (loaded, kept): (Vec<String>, Vec<String>) = all.into_iter().partition(|n| provided.contains(n));
    (loaded, kept)
}

fn describe_backbone(c: &ModelConfig) -> String {
    format!(
        "{} (width {}, {} stem, {} input channels)",
        c.arch.name(),
        c.width(),
        if c.small_stem { "small" } else { "standard" },
        c.in_channels
    )
}

fn describe(c: &ModelConfig) -> String {
    format!(
        "a {} with head hidden_mlp {} (BN {}), feat_dim {}, prototypes {:?}",
        describe_backbone(c),
        c.hidden_mlp,
        c.head_bn,
        c.feat_dim,
        c.prototypes
    )
}
