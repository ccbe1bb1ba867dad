//! The preprocessing a deployed model expects, recorded in the ONNX metadata: pixels scaled to [0, 1],
//! resized to `input_size`, then `(x - mean) / std` per channel, in NCHW order.
//!
//! Each value comes from the first of: a command-line override, the checkpoint's metadata (the trainer
//! writes `mean`, `std` as JSON arrays and `input_size` as an integer), or a default:
//! - mean / std: the official SwAV ImageNet statistics (mean 0.485, 0.456, 0.406; std 0.228, 0.224,
//!   0.225) for 3-channel models, 0.5 / 0.5 per channel for any other channel count;
//! - input size: 224 with the standard stem, 32 with the small-image stem.
//!
//! A single mean or std value applies to every channel (as in the training configuration) and is
//! expanded to one value per channel. Where each value came from is recorded too
//! (`preprocessing_source`), so a consumer can tell a recorded value from a guess.

use std::collections::BTreeMap;
use std::fmt;

use swav_model::ModelConfig;

use crate::{ExportError, Result};

/// ImageNet channel means of the official SwAV code.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations of the official SwAV code (0.228, not torchvision's 0.229).
pub const IMAGENET_STD: [f32; 3] = [0.228, 0.224, 0.225];

/// Metadata keys read from the checkpoint and written to the ONNX model.
pub const META_MEAN: &str = "mean";
pub const META_STD: &str = "std";
pub const META_INPUT_SIZE: &str = "input_size";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Given on the command line (or by the caller).
    Override,
    /// Read from the checkpoint's metadata.
    Checkpoint,
    /// Neither: the documented default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Override => "override",
            Source::Checkpoint => "checkpoint",
            Source::Default => "default",
        })
    }
}

/// Values that replace the checkpoint's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub input_size: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessing {
    /// One value per input channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Side of the square images the model was trained / evaluated on.
    pub input_size: usize,
    pub mean_source: Source,
    pub std_source: Source,
    pub input_size_source: Source,
}

impl Preprocessing {
    /// Resolves every value from the overrides, the checkpoint's metadata and the defaults, in that
    /// order, and checks them (finite, positive std and size, one or `in_channels` values).
    pub fn resolve(
        config: &ModelConfig,
        metadata: &BTreeMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Preprocessing> {
        let c = config.in_channels;
        let (default_mean, default_std) = if c == 3 {
            (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec())
        } else {
            (vec![0.5; c], vec![0.5; c])
        };
        let (mean, mean_source) = pick(
            META_MEAN,
            overrides.mean.clone(),
            metadata,
            parse_floats,
            default_mean,
        )?;
        let (std, std_source) = pick(
            META_STD,
            overrides.std.clone(),
            metadata,
            parse_floats,
            default_std,
        )?;
        let default_size = if config.small_stem { 32 } else { 224 };
        let (input_size, input_size_source) = pick(
            META_INPUT_SIZE,
            overrides.input_size,
            metadata,
            parse_size,
            default_size,
        )?;
        let mean = per_channel(META_MEAN, mean, mean_source, c)?;
        let std = per_channel(META_STD, std, std_source, c)?;
        if let Some(v) = std.iter().find(|v| **v <= 0.0) {
            return Err(ExportError::Preprocessing(format!(
                "std ({std_source}) must be positive, got {v}"
            )));
        }
        if input_size == 0 {
            return Err(ExportError::Preprocessing(format!(
                "input size ({input_size_source}) must be positive"
            )));
        }
        Ok(Preprocessing {
            mean,
            std,
            input_size,
            mean_source,
            std_source,
            input_size_source,
        })
    }

    /// `preprocessing_source` as written to the metadata: `{"mean":"checkpoint",...}`.
    pub fn sources_json(&self) -> String {
        format!(
            "{{\"mean\":\"{}\",\"std\":\"{}\",\"input_size\":\"{}\"}}",
            self.mean_source, self.std_source, self.input_size_source
        )
    }

    pub fn is_default(&self) -> bool {
        [self.mean_source, self.std_source, self.input_size_source].contains(&Source::Default)
    }
}

fn pick<T>(
    key: &str,
    over: Option<T>,
    metadata: &BTreeMap<String, String>,
    parse: fn(&str) -> std::result::Result<T, String>,
    default: T,
) -> Result<(T, Source)> {
    if let Some(v) = over {
        return Ok((v, Source::Override));
    }
    match metadata.get(key) {
        Some(raw) => parse(raw)
            .map(|v| (v, Source::Checkpoint))
            .map_err(|detail| ExportError::Metadata {
                key: key.into(),
                value: raw.clone(),
                detail,
            }),
        None => Ok((default, Source::Default)),
    }
}

fn parse_floats(raw: &str) -> std::result::Result<Vec<f32>, String> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))?;
    let numbers = match v {
        serde_json::Value::Array(items) => items,
        n @ serde_json::Value::Number(_) => vec![n],
        _ => return Err("expected a JSON array of numbers".into()),
    };
    numbers
        .iter()
        .map(|n| {
            n.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| format!("`{n}` is not a number"))
        })
        .collect()
}

fn parse_size(raw: &str) -> std::result::Result<usize, String> {
    raw.trim()
        .parse::<usize>()
        .map_err(|e| format!("expected a positive integer: {e}"))
}

fn per_channel(key: &str, values: Vec<f32>, source: Source, channels: usize) -> Result<Vec<f32>> {
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(ExportError::Preprocessing(format!(
            "{key} ({source}) holds a non-finite value {v}"
        )));
    }
    match values.len() {
        1 => Ok(vec![values[0]; channels]),
        n if n == channels => Ok(values),
        n => Err(ExportError::Preprocessing(format!("{key} ({source}) has {n} values; the model takes {channels} channels (give 1 or {channels})"))),
    }
}
