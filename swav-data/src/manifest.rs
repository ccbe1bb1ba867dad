//! `manifest.json`: what a dataset contains and how it was made. Written last by `preprocess`, so a
//! directory with a manifest is complete; serialised deterministically (no timestamps, no worker count).

use serde::{Deserialize, Serialize};

use crate::codec::Codec;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub num_images: usize,
    /// 3 if any image is RGB, 1 if all are grayscale. Each record keeps its own channel count
    /// (grayscale inputs are stored with 1 channel); readers expand or convert on request.
    pub channels: u8,
    /// Class names, sorted; label `i` is `classes[i]`. Empty for unlabelled datasets.
    pub classes: Vec<String>,
    /// Whether images carry labels (the labels themselves are in the shard indexes).
    pub labelled: bool,
    /// Images per class (same order as `classes`).
    pub class_counts: Vec<usize>,
    /// Per-channel mean and standard deviation of all pixels, in [0, 1] (grayscale images count as
    /// R = G = B in a 3-channel dataset): the dataset's own normalisation constants.
    pub pixel_mean: Vec<f64>,
    pub pixel_std: Vec<f64>,
    pub shards: Vec<ShardEntry>,
    /// Inputs that were not imported, with the reason, sorted by path (relative to the input).
    pub skipped: Vec<Skipped>,
    pub parameters: Parameters,
    /// The file that names the source of every image (absent in datasets written before it existed):
    /// what lets a list of file names, such as the official 1% / 10% ImageNet subsets, select images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<NamesEntry>,
}

/// `names.json`: a JSON array of strings, entry `i` naming the source of image `i`: its path relative
/// to the input folder (`/`-separated, e.g. `n01440764/n01440764_10026.JPEG`), or `#k` for record `k`
/// of an IDX file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamesEntry {
    /// File name inside the dataset directory.
    pub file: String,
    /// Number of names (the number of images).
    pub count: usize,
    /// `crc32:` and the 8 hex digits of the CRC-32 (IEEE) of the file.
    pub checksum: String,
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the dataset directory (`shard-00000.bin`, ...).
    pub file: String,
    pub records: usize,
    pub bytes: u64,
    /// `crc32:` followed by the 8 hex digits of the CRC-32 (IEEE) of the whole file.
    pub checksum: String,
}

/// An input that was not imported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The preprocessing parameters (everything that affects the bytes written).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// `folder` or `idx`.
    pub input_kind: String,
    /// Short side the images were reduced to (never enlarged), if any.
    pub resize: Option<u32>,
    pub codec: Codec,
    pub zstd_level: i32,
    pub jpeg_quality: u8,
    pub shard_size_mib: u64,
    pub max_pixels: u64,
    /// The input positions imported (`[start, end)`), when only a part was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<[usize; 2]>,
    /// How grayscale inputs are stored.
    pub grayscale: String,
    /// The writer: `swav-data <version>`.
    pub created_by: String,
}
