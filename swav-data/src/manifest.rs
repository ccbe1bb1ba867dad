//! `manifest.json`: what a dataset contains and how it was made. Written last by `preprocess`, so a
//! directory with a manifest is complete; serialised deterministically (no timestamps, no worker count).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec::{Codec, MAX_PIXELS};
use crate::error::{DataError, Result};
use crate::shard::{FOOTER_LEN, HEADER_LEN, INDEX_ENTRY_LEN, RECORD_HEADER_LEN};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The dataset format version; only [`FORMAT_VERSION`] is read (another one is
    /// [`DataError::UnsupportedVersion`]).
    pub format_version: u32,
    /// Images in the dataset: the sum of the shards' record counts.
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
    /// Per-channel standard deviation of all pixels (population, not unbiased), in [0, 1]; see
    /// `pixel_mean`.
    pub pixel_std: Vec<f64>,
    /// The shard files in dataset order: shard `s` holds the images after those of shards `0..s`.
    pub shards: Vec<ShardEntry>,
    /// Inputs that were not imported, with the reason, sorted by path (relative to the input).
    pub skipped: Vec<Skipped>,
    /// How the dataset was made.
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
    /// Records (images) in the shard, checked against its footer when it is opened.
    pub records: usize,
    /// Size of the file in bytes, checked against the file when it is opened.
    pub bytes: u64,
    /// `crc32:` followed by the 8 hex digits of the CRC-32 (IEEE) of the whole file.
    pub checksum: String,
}

/// An input that was not imported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Skipped {
    /// The input's path relative to the input folder (`/`-separated), or `#k` for record `k` of an
    /// IDX file.
    pub path: String,
    /// Why it was skipped (not decodable, too many pixels, hidden, symlink loop...).
    pub reason: String,
}

/// The preprocessing parameters (everything that affects the bytes written).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// `folder` or `idx`.
    pub input_kind: String,
    /// Short side the images were reduced to (never enlarged), if any.
    pub resize: Option<u32>,
    /// How the records' pixels are stored.
    pub codec: Codec,
    /// zstd compression level of the `raw-zstd` codec.
    pub zstd_level: i32,
    /// Quality (1 to 100) of the JPEGs the `jpeg` codec re-encodes (original JPEGs kept at their size
    /// are stored unchanged).
    pub jpeg_quality: u8,
    /// Target shard size in MiB: a shard is closed before the record that would take it past this
    /// (it holds at least one record).
    pub shard_size_mib: u64,
    /// Most pixels (height x width) of an image: larger inputs were skipped, and a record claiming more
    /// is refused as damaged when read.
    pub max_pixels: u64,
    /// The input positions imported (`[start, end)`), when only a part was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<[usize; 2]>,
    /// How grayscale inputs are stored.
    pub grayscale: String,
    /// The writer: `swav-data <version>`.
    pub created_by: String,
}

/// Largest `manifest.json` read: a bigger one is refused instead of being read into memory. A manifest
/// grows with the shards, classes and skipped inputs it lists (about 100 bytes each): a gigabyte is far
/// beyond any real dataset.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Just the version of a manifest, read before the rest so that another format gets its own message.
#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    format_version: Option<serde_json::Value>,
}

impl Manifest {
    /// Reads `dir/manifest.json` and checks everything that does not need the shard files: that it is
    /// JSON, its version, its fields, and that its counts are consistent with each other and possible
    /// for the shard sizes it states. Nothing is allocated from a count it holds.
    pub(crate) fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let not_a_dataset = |reason: String| DataError::NotADataset { path: dir.to_owned(), reason };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_a_dataset("manifest.json is missing".into()))
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        // Look before opening: opening a FIFO would wait for a writer forever.
        if !meta.is_file() {
            return Err(not_a_dataset("manifest.json is not a regular file".into()));
        }
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(not_a_dataset(format!(
                "manifest.json has {} bytes, more than any dataset needs ({MAX_MANIFEST_BYTES})",
                meta.len()
            )));
        }
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut text))
            .map_err(|e| DataError::io(&path, e))?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(not_a_dataset("manifest.json grew past its size limit while it was read".into()));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            return Err(not_a_dataset("manifest.json is empty".into()));
        }
        // Syntax first (without building anything), so that a file that is not JSON says so.
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&text) {
            return Err(not_a_dataset(format!("manifest.json is not valid JSON ({e})")));
        }
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(not_a_dataset("manifest.json is not a JSON object".into()));
        }
        let probe: VersionProbe =
            serde_json::from_slice(&text).map_err(|e| not_a_dataset(format!("manifest.json cannot be read ({e})")))?;
        match probe.format_version {
            None => return Err(not_a_dataset("manifest.json has no format_version".into())),
            Some(v) => match v.as_u64().map(u32::try_from) {
                Some(Ok(FORMAT_VERSION)) => {}
                Some(Ok(found)) => {
                    return Err(DataError::UnsupportedVersion { path, found, supported: FORMAT_VERSION });
                }
                _ => return Err(not_a_dataset(format!("manifest.json: format_version {v} is not a version number"))),
            },
        }
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| not_a_dataset(format!("manifest.json does not describe a dataset ({e})")))?;
        m.check().map_err(|problem| not_a_dataset(format!("manifest.json: {problem}")))?;
        Ok(m)
    }

    /// The consistency checks of [`Manifest::read`] (an error says what is wrong).
    fn check(&self) -> std::result::Result<(), String> {
        let c = self.channels;
        if !(c == 1 || c == 3) {
            return Err(format!("channels {c} is impossible: a dataset has 1 or 3 channels"));
        }
        for (name, v) in [("pixel_mean", &self.pixel_mean), ("pixel_std", &self.pixel_std)] {
            if v.len() != c as usize {
                return Err(format!("{name} has {} values for {c} channel(s)", v.len()));
            }
        }
        if self.class_counts.len() != self.classes.len() {
            return Err(format!(
                "class_counts has {} entries for {} classes",
                self.class_counts.len(),
                self.classes.len()
            ));
        }
        let max_pixels = self.parameters.max_pixels;
        if !(1..=MAX_PIXELS).contains(&max_pixels) {
            return Err(format!("max_pixels {max_pixels} is not in 1..={MAX_PIXELS}"));
        }
        let mut names = BTreeSet::new();
        let mut total: u64 = 0;
        for e in &self.shards {
            if e.file.is_empty() || e.file.contains(['/', '\\']) || e.file.starts_with('.') {
                return Err(format!("bad shard file name `{}`", e.file));
            }
            if !names.insert(e.file.as_str()) {
                return Err(format!("lists the shard {} twice", e.file));
            }
            // Every record costs at least its header and its index entry.
            let room =
                e.bytes.saturating_sub((HEADER_LEN + FOOTER_LEN) as u64) / (RECORD_HEADER_LEN + INDEX_ENTRY_LEN) as u64;
            if e.records as u64 > room {
                return Err(format!(
                    "{}: claims {} records in {} bytes (at most {room} fit)",
                    e.file, e.records, e.bytes
                ));
            }
            total = total.saturating_add(e.records as u64);
        }
        if total != self.num_images as u64 {
            return Err(format!("the shards hold {total} images but num_images is {}", self.num_images));
        }
        Ok(())
    }
}
