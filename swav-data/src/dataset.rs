//! A preprocessed dataset opened for random access: the manifest, and every shard memory-mapped.
//! Cheap to clone and to share between threads (an `Arc` inside).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codec::RecordDecoder;
use crate::error::{DataError, Result};
use crate::image::Image;
use crate::manifest::Manifest;
use crate::shard::ShardReader;

/// A dataset written by `preprocess`: `len()` images, optional labels, random access by index.
#[derive(Clone)]
pub struct Dataset {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<ShardReader>,
    /// `starts[s]` is the index of the first image of shard `s`; one extra entry holds the total.
    starts: Vec<usize>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.inner.dir)
            .field("len", &self.len())
            .field("classes", &self.inner.manifest.classes.len())
            .finish()
    }
}

/// What [`Dataset::verify`] checked (everything it reports passed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Shard files whose whole-file CRC-32 matched the manifest.
    pub shards: usize,
    /// Records read, checksummed and decoded (every image of the dataset).
    pub images: usize,
    /// Total size of the shard files in bytes (as listed in the manifest).
    pub bytes: u64,
}

impl Dataset {
    /// Opens the dataset in `dir`: reads and checks `manifest.json`, maps every shard and checks each
    /// shard's size, footer, index checksum and labels (records are checked each time they are read).
    /// Counts in the manifest are checked against each other and against the files' real sizes before
    /// anything is allocated from them.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(DataError::NotADataset { path: dir, reason: "no such directory".into() });
        }
        let manifest = Manifest::read(&dir)?;
        let mut shards = Vec::new();
        shards.try_reserve_exact(manifest.shards.len()).map_err(|_| DataError::NotADataset {
            path: dir.clone(),
            reason: format!("cannot allocate room for {} shards", manifest.shards.len()),
        })?;
        let mut starts = vec![0usize];
        for entry in &manifest.shards {
            let reader = ShardReader::open(&dir.join(&entry.file), entry.bytes, entry.records)?;
            let first = starts.last().copied().unwrap_or(0);
            reader.check_labels(first, manifest.labelled, manifest.classes.len())?;
            starts.push(first + reader.records());
            shards.push(reader);
        }
        Ok(Dataset { inner: Arc::new(Inner { dir, manifest, shards, starts }) })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.inner.manifest.num_images
    }

    /// Whether the dataset holds no image (the loaders refuse such a dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names (empty for an unlabelled dataset); label `i` is `classes()[i]`.
    pub fn classes(&self) -> &[String] {
        &self.inner.manifest.classes
    }

    /// 3 if any image is RGB, 1 if all are grayscale.
    pub fn channels(&self) -> u8 {
        self.inner.manifest.channels
    }

    /// The manifest (parameters, statistics, skipped inputs).
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn locate(&self, index: usize) -> Result<(usize, usize)> {
        if index >= self.len() {
            return Err(DataError::IndexOutOfRange { index, len: self.len() });
        }
        // The last start <= index.
        let s = self.inner.starts.partition_point(|&start| start <= index) - 1;
        Ok((s, index - self.inner.starts[s]))
    }

    /// The label of image `index` (from the shard index, no record read); `None` for unlabelled images
    /// and for indices out of range.
    pub fn label(&self, index: usize) -> Option<u32> {
        let (s, r) = self.locate(index).ok()?;
        self.inner.shards[s].label(r)
    }

    /// Decodes image `index`, verifying its checksum.
    pub fn image(&self, index: usize) -> Result<Image> {
        let mut out = Image::default();
        self.read_into(index, &mut RecordDecoder::new(), &mut out)?;
        Ok(out)
    }

    /// Decodes image `index` into `out`, reusing its pixel buffer and the decoder's state (the loader's
    /// allocation-free path).
    pub fn read_into(&self, index: usize, decoder: &mut RecordDecoder, out: &mut Image) -> Result<()> {
        let (s, r) = self.locate(index)?;
        let shard = &self.inner.shards[s];
        let rec = shard.record(r, index)?;
        decoder
            .decode(
                rec.codec,
                rec.payload,
                rec.height,
                rec.width,
                rec.channels,
                self.inner.manifest.parameters.max_pixels,
                out,
            )
            .map_err(|problem| DataError::CorruptRecord { shard: shard.path.clone(), record: r, index, problem })
    }

    /// The source name of every image, in index order (see [`crate::NamesEntry`]): what a list of file
    /// names selects images by. `None` for a dataset written before names were recorded (preprocess
    /// it again to have them). The file is checked against the manifest's count and checksum.
    pub fn names(&self) -> Result<Option<Vec<String>>> {
        let Some(entry) = &self.inner.manifest.names else { return Ok(None) };
        let dir = &self.inner.dir;
        let bad = |reason: String| DataError::NotADataset { path: dir.clone(), reason };
        if entry.file.contains('/') || entry.file.contains('\\') || entry.file.starts_with('.') {
            return Err(bad(format!("bad names file name `{}` in the manifest", entry.file)));
        }
        let path = dir.join(&entry.file);
        // A name is a relative path (at most 4096 bytes, each escaped to at most 6 in JSON) and the
        // file must fit in memory: a larger file is refused before it is read.
        let size = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?.len();
        let most = (self.len() as u64).saturating_mul(6 * 4096 + 3).saturating_add(64);
        let memory = swav_core::sys::available_memory().map_or(u64::MAX, |m| m / 2);
        if size > most.min(memory) {
            return Err(bad(format!(
                "{} is {} for {} images: larger than any names file preprocess writes, or than half the free memory",
                entry.file,
                swav_core::sys::human_bytes(size.into()),
                self.len()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let computed = format!("crc32:{:08x}", crc32fast::hash(&bytes));
        if computed != entry.checksum {
            return Err(bad(format!(
                "{} is damaged (checksum {computed}, the manifest says {})",
                entry.file, entry.checksum
            )));
        }
        let names: Vec<String> =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("{} is not a list of names: {e}", entry.file)))?;
        if names.len() != entry.count || names.len() != self.len() {
            return Err(bad(format!(
                "{} holds {} names for {} images (the manifest says {})",
                entry.file,
                names.len(),
                self.len(),
                entry.count
            )));
        }
        Ok(Some(names))
    }

    /// Checks everything: each shard file's checksum against the manifest and every record's checksum
    /// and payload. Reads the whole dataset.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut bytes = 0;
        for (entry, shard) in self.inner.manifest.shards.iter().zip(&self.inner.shards) {
            let computed = format!("crc32:{:08x}", shard.file_crc32());
            if computed != entry.checksum {
                return Err(DataError::CorruptShard {
                    shard: shard.path.clone(),
                    problem: format!("file checksum mismatch (manifest {}, computed {computed})", entry.checksum),
                });
            }
            bytes += entry.bytes;
        }
        self.names()?;
        let mut decoder = RecordDecoder::new();
        let mut img = Image::default();
        for i in 0..self.len() {
            self.read_into(i, &mut decoder, &mut img)?;
        }
        Ok(VerifyReport { shards: self.inner.shards.len(), images: self.len(), bytes })
    }
}
