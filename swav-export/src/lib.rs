//! swav-export: ONNX export of SwAV backbones, optionally with the projection head and prototypes.
//!
//! The exported model has one input `images` (float32 NCHW, normalised as in training) and the outputs
//! `features` (pooled backbone features) and, with the head, `embedding` (L2-normalised) and `scores`
//! (`scores_1`, ... for further prototype heads). It uses only standard ONNX operators, has a symbolic
//! batch dimension unless asked otherwise, and records the preprocessing (mean, std, input size) in
//! its metadata (swav-model's `Preprocessing`: the model file's own values, else its defaults). See
//! [`export`] for the graph.
//!
//! - [`proto`]: the few ONNX protobuf messages, encoded by hand from the specification's field numbers.
//! - [`export`]: the walk from [`SwavModel`](swav_model::SwavModel) to an ONNX graph (batch norms folded by default).
//! - [`check`]: random inputs and swav-model's reference outputs as `.npy`, to check any runtime.
//!
//! A model whose tensors would make the protobuf exceed 2 GiB (ResNet-50w5 with its head) is written
//! with ONNX external data: `model.onnx` plus `model.onnx.data` beside it, every tensor of at least
//! 1 KiB stored there at a 4096-aligned offset (`data_location = EXTERNAL`, `location`, `offset`,
//! `length`). [`ExportOptions::external_data`] forces it for any model.
//!
//! ```no_run
//! use swav_export::{export_checkpoint, ExportOptions};
//! use swav_model::Overrides;
//! let opts = ExportOptions { with_head: true, ..ExportOptions::default() };
//! let (exported, _preprocessing) = export_checkpoint("step-1000.safetensors".as_ref(), "model.onnx".as_ref(), &Overrides::default(), &opts)?;
//! println!("{} nodes, outputs {:?}", exported.nodes, exported.outputs);
//! # Ok::<(), swav_export::ExportError>(())
//! ```

#![warn(missing_docs)]

pub mod check;
pub mod error;
pub mod export;
mod graph;
pub mod proto;

use std::path::Path;

use swav_model::{ModelFile, Overrides, Preprocessing};

pub use error::{ExportError, Result};
pub use export::{
    data_file_name, output_names, to_onnx, to_onnx_with_location, BatchDim, ExportOptions, Exported, ExternalData,
    ValueInfo, DEFAULT_OPSET, OPSETS,
};
pub use graph::Dim;

/// Writes `bytes` atomically: a crash never leaves a partial file under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    swav_core::fs::atomic_write(path, bytes)
        .map_err(|e| ExportError::Write { path: e.path.display().to_string(), source: e.source })
}

/// Writes an exported model to `output`: its external data file first (beside `output`, under the
/// name its tensors refer to), then the `.onnx` file, each atomically. A crash between the two leaves
/// the new data file beside the previous `.onnx` file; exporting again repairs it.
pub fn write_exported(output: &Path, exported: &Exported) -> Result<()> {
    if let Some(data) = &exported.external {
        let path = output.with_file_name(&data.location);
        if path == output {
            return Err(ExportError::Options(format!(
                "the external data file and the model would both be {}",
                output.display()
            )));
        }
        write_atomic(&path, &data.bytes)?;
    }
    write_atomic(output, &exported.bytes)
}

/// Exports `model` to `output` (see [`write_exported`]); external data, when used, goes to
/// [`data_file_name`]`(output)` beside it (`model.onnx` -> `model.onnx.data`).
pub fn export_to_file(
    model: &swav_model::SwavModel,
    pre: &Preprocessing,
    opts: &ExportOptions,
    output: &Path,
) -> Result<Exported> {
    let exported = to_onnx_with_location(model, pre, opts, &data_file_name(output))?;
    write_exported(output, &exported)?;
    Ok(exported)
}

/// Reads the model file `checkpoint` (with `overrides` of its preprocessing), exports it and writes
/// `output` (and its data file, with external data) atomically.
pub fn export_checkpoint(
    checkpoint: &Path,
    output: &Path,
    overrides: &Overrides,
    opts: &ExportOptions,
) -> Result<(Exported, Preprocessing)> {
    let file = ModelFile::read_with(checkpoint, overrides)?;
    let exported = export_to_file(&file.model, &file.preprocessing, opts, output)?;
    Ok((exported, file.preprocessing))
}

/// The README's example, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
