//! The preprocessing a model expects, one definition for every consumer (training writes it,
//! evaluation, embedding and export read it): pixels scaled to [0, 1], the image resized to
//! `input_size` (evaluation: shorter side to [`Preprocessing::eval_resize`], centre crop
//! `input_size`), then `(x - mean) / std` per channel.
//!
//! Each value comes from the first of: an override given by the caller, the model file's metadata
//! (`mean`, `std` as JSON arrays, `input_size` as an integer; see [`crate::file`] for the keys), or
//! the one set of defaults:
//! - mean / std: the official SwAV ImageNet statistics (swav-core's `imagenet`) for 3-channel models,
//!   0.5 / 0.5 per channel for any other channel count;
//! - input size: 224 with the standard stem, 32 with the small-image stem.
//!
//! A single mean or std value applies to every channel and is expanded to one value per channel.
//! Where each value came from is kept ([`Source`]), so a consumer can tell a recorded value from a
//! guess.

use std::collections::BTreeMap;
use std::fmt;

use swav_core::imagenet;

use crate::config::ModelConfig;
use crate::file::{META_INPUT_SIZE, META_MEAN, META_STD};
use crate::{ModelError, Result};

/// The largest input size accepted from a file or an override: beyond it a batch of images alone
/// would take gigabytes, and no ResNet recipe uses more.
pub const MAX_INPUT_SIZE: usize = 4096;

/// Images of at most this side are evaluated whole (resize = crop); larger ones follow the ImageNet
/// protocol (Resize 256, CenterCrop 224).
pub const SMALL_IMAGE: usize = 64;

/// Where a preprocessing value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Given by the caller (e.g. on the command line).
    Override,
    /// Read from the model file's metadata.
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

/// Values that replace the file's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// Channel means (one value, or one per channel).
    pub mean: Option<Vec<f32>>,
    /// Channel standard deviations (one value, or one per channel).
    pub std: Option<Vec<f32>>,
    /// Side of the square input images.
    pub input_size: Option<usize>,
}

/// The resolved preprocessing of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessing {
    /// One value per input channel.
    pub mean: Vec<f32>,
    /// One value per input channel, all positive.
    pub std: Vec<f32>,
    /// Side of the square images the model was trained / is evaluated on.
    pub input_size: usize,
    /// Where `mean` came from.
    pub mean_source: Source,
    /// Where `std` came from.
    pub std_source: Source,
    /// Where `input_size` came from.
    pub input_size_source: Source,
}

impl Preprocessing {
    /// Values recorded by their producer (a trainer, an importer): every source is `Checkpoint`.
    pub fn recorded(config: &ModelConfig, mean: Vec<f32>, std: Vec<f32>, input_size: usize) -> Result<Preprocessing> {
        let overrides = Overrides { mean: Some(mean), std: Some(std), input_size: Some(input_size) };
        let mut p = Self::resolve(config, &BTreeMap::new(), &overrides)?;
        (p.mean_source, p.std_source, p.input_size_source) =
            (Source::Checkpoint, Source::Checkpoint, Source::Checkpoint);
        Ok(p)
    }

    /// Resolves every value from the overrides, the metadata and the defaults, in that order, and
    /// checks them (finite, positive std, size in `1..=MAX_INPUT_SIZE`, one or `in_channels` values).
    pub fn resolve(
        config: &ModelConfig,
        metadata: &BTreeMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Preprocessing> {
        let c = config.in_channels;
        let (default_mean, default_std) =
            if c == 3 { (imagenet::MEAN.to_vec(), imagenet::STD.to_vec()) } else { (vec![0.5; c], vec![0.5; c]) };
        let (mean, mean_source) = pick(META_MEAN, overrides.mean.clone(), metadata, parse_floats, default_mean)?;
        let (std, std_source) = pick(META_STD, overrides.std.clone(), metadata, parse_floats, default_std)?;
        let default_size = if config.small_stem { 32 } else { 224 };
        let (input_size, input_size_source) =
            pick(META_INPUT_SIZE, overrides.input_size, metadata, parse_size, default_size)?;
        let mean = per_channel(META_MEAN, mean, mean_source, c)?;
        let std = per_channel(META_STD, std, std_source, c)?;
        if let Some(v) = std.iter().find(|v| **v <= 0.0) {
            return Err(ModelError::Preprocessing(format!("std ({std_source}) must be positive, got {v}")));
        }
        if input_size == 0 || input_size > MAX_INPUT_SIZE {
            return Err(ModelError::Preprocessing(format!(
                "input size ({input_size_source}) {input_size} must be between 1 and {MAX_INPUT_SIZE}"
            )));
        }
        Ok(Preprocessing { mean, std, input_size, mean_source, std_source, input_size_source })
    }

    /// The metadata entries that record this preprocessing in a model file.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (META_MEAN.to_string(), serde_json::to_string(&self.mean).expect("floats serialise")),
            (META_STD.to_string(), serde_json::to_string(&self.std).expect("floats serialise")),
            (META_INPUT_SIZE.to_string(), self.input_size.to_string()),
        ])
    }

    /// The shorter side images are resized to before the centre crop of `input_size` in evaluation:
    /// small images are used whole, larger ones as ImageNet's Resize 256 / CenterCrop 224.
    pub fn eval_resize(&self) -> usize {
        if self.input_size <= SMALL_IMAGE {
            self.input_size
        } else {
            (self.input_size as f64 * 256.0 / 224.0).round() as usize
        }
    }

    /// `preprocessing_source` as written to an ONNX model's metadata: `{"mean":"checkpoint",...}`.
    pub fn sources_json(&self) -> String {
        format!(
            "{{\"mean\":\"{}\",\"std\":\"{}\",\"input_size\":\"{}\"}}",
            self.mean_source, self.std_source, self.input_size_source
        )
    }

    /// Whether any value is a guess (a default).
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
        Some(raw) => parse(raw).map(|v| (v, Source::Checkpoint)).map_err(|detail| ModelError::Metadata {
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
    numbers.iter().map(|n| n.as_f64().map(|f| f as f32).ok_or_else(|| format!("`{n}` is not a number"))).collect()
}

fn parse_size(raw: &str) -> std::result::Result<usize, String> {
    raw.trim().parse::<usize>().map_err(|e| format!("expected a positive integer: {e}"))
}

fn per_channel(key: &str, values: Vec<f32>, source: Source, channels: usize) -> Result<Vec<f32>> {
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(ModelError::Preprocessing(format!("{key} ({source}) holds a non-finite value {v}")));
    }
    match values.len() {
        1 => Ok(vec![values[0]; channels]),
        n if n == channels => Ok(values),
        n => Err(ModelError::Preprocessing(format!(
            "{key} ({source}) has {n} values; the model takes {channels} channels (give 1 or {channels})"
        ))),
    }
}
