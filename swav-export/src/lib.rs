//! swav-export: ONNX export of SwAV backbones, optionally with the projection head and prototypes.
//!
//! The exported model has one input `images` (float32 NCHW, normalised as in training) and the outputs
//! `features` (pooled backbone features) and, with the head, `embedding` (L2-normalised) and `scores`
//! (`scores_1`, ... for further prototype heads). It uses only standard ONNX operators, has a symbolic
//! batch dimension unless asked otherwise, and records the preprocessing (mean, std, input size) in
//! its metadata. See [`export`] for the graph and [`preprocess`] for where each value comes from.
//!
//! - [`proto`]: the few ONNX protobuf messages, encoded by hand from the specification's field numbers.
//! - [`export`]: the walk from [`SwavModel`] to an ONNX graph (batch norms folded by default).
//! - [`check`]: random inputs and swav-model's reference outputs as `.npy`, to check any runtime.
//!
//! ```no_run
//! use swav_export::{export_checkpoint, ExportOptions, Overrides};
//! let opts = ExportOptions { with_head: true, ..ExportOptions::default() };
//! let (exported, _preprocessing) = export_checkpoint("step-1000.safetensors".as_ref(), "model.onnx".as_ref(), &Overrides::default(), &opts)?;
//! println!("{} nodes, outputs {:?}", exported.nodes, exported.outputs);
//! # Ok::<(), swav_export::ExportError>(())
//! ```

pub mod check;
pub mod error;
pub mod export;
mod graph;
pub mod preprocess;
pub mod proto;

use std::collections::BTreeMap;
use std::path::Path;

use swav_model::checkpoint::{load_model_state, LoadOptions, NamedTensors};
use swav_model::{ModelError, SwavModel};

pub use error::{ExportError, Result};
pub use export::{
    output_names, to_onnx, BatchDim, ExportOptions, Exported, ValueInfo, DEFAULT_OPSET, OPSETS,
};
pub use graph::Dim;
pub use preprocess::{Overrides, Preprocessing, Source};

/// A model file and its metadata.
pub struct Checkpoint {
    pub model: SwavModel,
    pub metadata: BTreeMap<String, String>,
}

/// Reads a model file written by `SwavModel::save` (the trainer's `step-N.safetensors`): the
/// configuration from its metadata, then every tensor. Missing, unexpected and mis-shaped tensors are
/// errors that name the tensor.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let state = NamedTensors::read(path)?;
    let config = SwavModel::config_of(path, &state)?;
    let mut model = SwavModel::new(config, 0)?;
    load_model_state(&mut model, &state, "", LoadOptions::default())?;
    Ok(Checkpoint {
        model,
        metadata: state.metadata,
    })
}

/// Writes `bytes` atomically: a crash never leaves a partial file under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    swav_model::checkpoint::atomic_write(path, bytes).map_err(|e| match e {
        ModelError::Io { path, source } => ExportError::Write { path, source },
        other => ExportError::Model(other),
    })
}

/// Loads `checkpoint`, resolves the preprocessing, exports and writes `output` atomically.
pub fn export_checkpoint(
    checkpoint: &Path,
    output: &Path,
    overrides: &Overrides,
    opts: &ExportOptions,
) -> Result<(Exported, Preprocessing)> {
    let ckpt = load_checkpoint(checkpoint)?;
    let pre = Preprocessing::resolve(&ckpt.model.config, &ckpt.metadata, overrides)?;
    let exported = to_onnx(&ckpt.model, &pre, opts)?;
    write_atomic(output, &exported.bytes)?;
    Ok((exported, pre))
}

/// The README's example, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
