//! `preprocess`: an image folder or IDX files -> a dataset directory (`manifest.json` + shards).
//!
//! Inputs are decoded (and optionally shrunk) in parallel by a pool of worker threads; one writer puts
//! the results in input order into shards, so the output is byte-identical whatever the number of
//! workers. A bounded window of jobs keeps memory flat however slow one image is. Everything is written
//! into a hidden temporary directory next to the output (`.NAME.tmp-PID`), synced, and renamed into place
//! at the end: an interrupted run never leaves an output that looks complete. Input files are only read.
//! `--overwrite` replaces only an existing dataset (a directory holding nothing but `manifest.json` and
//! shard files) or an empty directory, and only after the new one is complete; see the `output` submodule
//! for what the command owns, its lock, and how the leftovers of killed runs are cleaned up.

mod decode;
mod idx;
mod output;

pub use idx::idx_image_count;
mod scan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::augment::resample::Resampler;
use crate::codec::{self, Codec, MAX_PIXELS, MAX_SIDE};
use crate::error::{DataError, Result};
use crate::image::Image;
use crate::manifest::{Manifest, NamesEntry, Parameters, ShardEntry, Skipped, FORMAT_VERSION};
use crate::shard::{ShardWriter, RECORD_HEADER_LEN};

/// Settings of a preprocessing run.
#[derive(Clone, Debug)]
pub struct PreprocessOptions {
    /// An image folder, an IDX images file, or a folder holding one IDX images file.
    pub input: PathBuf,
    /// The dataset directory to create.
    pub output: PathBuf,
    /// Reduce the shorter side to this many pixels (never enlarges).
    pub resize: Option<u32>,
    /// How the records' pixels are stored: `RawZstd` (lossless, the default) or `Jpeg` (original JPEGs
    /// kept as they are when not resized, everything else re-encoded at `jpeg_quality`).
    pub codec: Codec,
    /// Target shard size in MiB (a shard holds at least one record).
    pub shard_size_mib: u64,
    /// Decoding threads (1 to [`MAX_WORKERS`]).
    pub workers: usize,
    /// Replace an existing dataset at `output` (a folder holding only a dataset's files, or empty).
    pub overwrite: bool,
    /// Images with more pixels than this are skipped.
    pub max_pixels: u64,
    /// zstd level of the raw-zstd codec.
    pub zstd_level: i32,
    /// Quality of re-encoded JPEGs.
    pub jpeg_quality: u8,
    /// Import only the inputs at these positions of the input order (sorted file paths, or the
    /// records of an IDX file), e.g. `0..8000` and `8000..10000` to split one source in two.
    pub select: Option<std::ops::Range<usize>>,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        PreprocessOptions {
            input: PathBuf::new(),
            output: PathBuf::new(),
            resize: None,
            codec: Codec::RawZstd,
            shard_size_mib: 256,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(MAX_WORKERS),
            overwrite: false,
            max_pixels: 100_000_000,
            zstd_level: 3,
            jpeg_quality: 95,
            select: None,
        }
    }
}

/// Progress of a run, reported after each input.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Selected inputs handled so far (written or skipped), in input order.
    pub done: usize,
    /// Selected inputs in all: the candidate files found (or IDX records), within `select` if given.
    pub total: usize,
    /// Images written to shards so far.
    pub written: usize,
    /// Inputs skipped so far, including the entries the folder scan set aside before decoding (hidden
    /// files, symlink loops...), which `done` and `total` do not count.
    pub skipped: usize,
}

/// What a finished run did.
#[derive(Clone, Debug)]
pub struct PreprocessReport {
    /// The dataset directory written (the `output` of the options).
    pub output: PathBuf,
    /// Images in the dataset.
    pub written: usize,
    /// Inputs skipped, with reasons (also in the manifest).
    pub skipped: Vec<Skipped>,
    /// Shard files written.
    pub shards: usize,
    /// Total size of the shards in bytes.
    pub bytes: u64,
    /// Wall-clock duration of the run, scanning and syncing included.
    pub seconds: f64,
    /// Classes found (0 for an unlabelled folder; for IDX input, the largest label + 1).
    pub classes: usize,
}

impl PreprocessReport {
    /// Inputs handled (written and skipped) per second of `seconds`.
    pub fn images_per_second(&self) -> f64 {
        (self.written + self.skipped.len()) as f64 / self.seconds.max(1e-9)
    }
}

/// Where the images come from.
enum Source {
    Files(Vec<scan::FileEntry>),
    Idx(idx::IdxData),
}

/// The result of one input.
enum Outcome {
    Record {
        rel: String,
        label: Option<u32>,
        image_shape: (u32, u32, u8),
        payload: Vec<u8>,
        codec: Codec,
        sums: [u64; 6],
    },
    Skip {
        rel: String,
        reason: String,
    },
}

/// Runs a preprocessing job; `progress` is called from the writer thread after each input.
pub fn preprocess(opts: &PreprocessOptions, progress: &(dyn Fn(Progress) + Sync)) -> Result<PreprocessReport> {
    let start = Instant::now();
    validate(opts)?;
    let input = &opts.input;
    if !input.exists() {
        return Err(DataError::Input { path: input.clone(), problem: "does not exist".into() });
    }
    check_paths(opts)?;
    // Refuse what can be refused before creating anything (the lock folder included), then check again
    // under the lock, after the leftovers of killed runs were dealt with.
    output::check_output(&opts.output, opts.overwrite)?;
    let parent = output::parent_of(&opts.output);
    std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let _lock = output::lock(&opts.output)?;
    output::clean_leftovers(&opts.output)?;
    output::check_output(&opts.output, opts.overwrite)?;

    // 1. What to import.
    let (source, classes, labelled, mut skipped, kind) = if input.is_file() {
        if !idx::is_idx_images(input) {
            return Err(DataError::Input {
                path: input.clone(),
                problem: "is a file: give an image folder or an IDX images file (*-images-idx3-ubyte[.gz])".into(),
            });
        }
        idx_source(input, opts.max_pixels)?
    } else if let Some(file) = single_idx_in(input)? {
        idx_source(&file, opts.max_pixels)?
    } else {
        let s = scan::scan_folder(input)?;
        (Source::Files(s.entries), s.classes, s.labelled, s.skipped, "folder")
    };
    let available = match &source {
        Source::Files(f) => f.len(),
        Source::Idx(d) => d.count,
    };
    let selected = match &opts.select {
        Some(r) if r.start >= r.end || r.end > available => {
            return Err(DataError::Config(format!(
                "selection {}..{} is not within the {available} inputs",
                r.start, r.end
            )))
        }
        Some(r) => r.clone(),
        None => 0..available,
    };
    let first = selected.start;
    let total = selected.len();

    // 2. Temporary output directory (removed on failure).
    let tmp = output::TempDir::create(&opts.output)?;

    // 3. Decode in parallel, write in order.
    let mut writer = Writer::new(tmp.path.clone(), opts.shard_size_mib << 20, classes.len());
    let mut names: Vec<String> = Vec::new();
    let workers = opts.workers.max(1);
    let window = workers * 4;
    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<usize>(window);
        let (out_tx, out_rx) = crossbeam_channel::unbounded::<(usize, Outcome)>();
        let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(window);
        for _ in 0..window {
            token_tx.send(()).expect("the channel has room");
        }
        // Dispatcher: at most `window` inputs in flight beyond the next one to write.
        scope.spawn(move || {
            for i in 0..total {
                if token_rx.recv().is_err() || job_tx.send(i).is_err() {
                    break;
                }
            }
        });
        for _ in 0..workers {
            let (rx, tx, source) = (job_rx.clone(), out_tx.clone(), &source);
            scope.spawn(move || {
                let mut resampler = Resampler::default();
                let mut bytes = Vec::new();
                while let Ok(i) = rx.recv() {
                    let outcome = process_one(source, first + i, opts, &mut resampler, &mut bytes);
                    if bytes.capacity() > 64 << 20 {
                        bytes = Vec::new(); // do not keep a huge file's buffer for the rest of the run
                    }
                    if tx.send((i, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((job_rx, out_tx));
        let mut pending = BTreeMap::new();
        let mut next = 0;
        let mut result = Ok(());
        while next < total {
            let Ok((i, outcome)) = out_rx.recv() else {
                break;
            };
            pending.insert(i, outcome);
            while let Some(outcome) = pending.remove(&next) {
                match outcome {
                    Outcome::Record { rel, label, image_shape, payload, codec, sums } => {
                        if result.is_ok() {
                            result = writer.add(label, image_shape, codec, &payload, &sums);
                            names.push(rel);
                        }
                    }
                    Outcome::Skip { rel, reason } => skipped.push(Skipped { path: rel, reason }),
                }
                next += 1;
                let _ = token_tx.send(());
                progress(Progress { done: next, total, written: writer.written, skipped: skipped.len() });
            }
            if result.is_err() {
                break;
            }
        }
        // Stop the dispatcher and workers if we leave early.
        drop(token_tx);
        drop(out_rx);
        result
    })?;

    if writer.written == 0 {
        let mut problem = format!("no image could be imported ({} input(s) skipped)", skipped.len());
        for s in skipped.iter().take(5) {
            problem.push_str(&format!("\n  {}: {}", s.path, s.reason));
        }
        if total == 0 {
            problem = "no image found in the input folder".into();
        }
        return Err(DataError::Input { path: input.clone(), problem });
    }
    skipped.sort();
    let shards = writer.finish()?;
    let names = write_names(&tmp.path, &names)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        num_images: writer.written,
        channels: writer.channels,
        classes: classes.clone(),
        labelled,
        class_counts: writer.class_counts.clone(),
        pixel_mean: writer.mean(),
        pixel_std: writer.std(),
        shards: shards.clone(),
        skipped: skipped.clone(),
        parameters: Parameters {
            input_kind: kind.into(),
            resize: opts.resize,
            codec: opts.codec,
            zstd_level: opts.zstd_level,
            jpeg_quality: opts.jpeg_quality,
            shard_size_mib: opts.shard_size_mib,
            max_pixels: opts.max_pixels,
            select: opts.select.as_ref().map(|r| [r.start, r.end]),
            grayscale: "stored with 1 channel".into(),
            created_by: format!("swav-data {}", env!("CARGO_PKG_VERSION")),
        },
        names: Some(names),
    };
    let mut text = serde_json::to_vec_pretty(&manifest).expect("the manifest serialises");
    text.push(b'\n');
    write_synced(&tmp.path.join("manifest.json"), &text)?;
    tmp.commit(&opts.output, opts.overwrite)?;
    Ok(PreprocessReport {
        output: opts.output.clone(),
        written: manifest.num_images,
        skipped,
        shards: shards.len(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        seconds: start.elapsed().as_secs_f64(),
        classes: classes.len(),
    })
}

type Sourced = (Source, Vec<String>, bool, Vec<Skipped>, &'static str);

fn idx_source(file: &Path, max_pixels: u64) -> Result<Sourced> {
    let data = idx::read_idx(file, max_pixels)?;
    let max = data.labels.iter().copied().max().unwrap_or(0) as usize;
    let classes = (0..=max).map(|c| c.to_string()).collect();
    Ok((Source::Idx(data), classes, true, Vec::new(), "idx"))
}

/// The IDX images file of a folder that holds one and no sub-folder; an error if it holds several.
fn single_idx_in(dir: &Path) -> Result<Option<PathBuf>> {
    let list = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut found = Vec::new();
    for entry in list {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path.is_dir() {
            return Ok(None);
        }
        if idx::is_idx_images(&path) {
            found.push(path);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(DataError::Input {
            path: dir.to_owned(),
            problem: format!(
                "holds several IDX image files ({}): pass one of them with --input",
                found
                    .iter()
                    .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn process_one(
    source: &Source,
    i: usize,
    opts: &PreprocessOptions,
    resampler: &mut Resampler,
    bytes: &mut Vec<u8>,
) -> Outcome {
    let (label, rel, decoded) = match source {
        Source::Files(files) => {
            let f = &files[i];
            (f.label, f.rel.clone(), decode::decode_file(&f.path, opts.max_pixels, bytes))
        }
        Source::Idx(d) => {
            let n = d.rows * d.cols;
            let image = Image {
                height: d.rows as u32,
                width: d.cols as u32,
                channels: 1,
                pixels: d.pixels[i * n..(i + 1) * n].to_vec(),
            };
            bytes.clear();
            (Some(d.labels[i] as u32), format!("#{i}"), Ok(decode::Decoded { image, is_jpeg: false }))
        }
    };
    let decoded = match decoded {
        Ok(d) => d,
        Err(reason) => return Outcome::Skip { rel, reason },
    };
    let (image, resized) = match opts.resize.and_then(|s| decode::shrink(&decoded.image, s, resampler)) {
        Some(small) => (small, true),
        None => (decoded.image, false),
    };
    if image.height > MAX_SIDE || image.width > MAX_SIDE {
        return Outcome::Skip {
            rel,
            reason: format!(
                "a {}x{} image: no side may exceed {MAX_SIDE} pixels in a dataset (--resize can shrink it)",
                image.width, image.height
            ),
        };
    }
    let keep_original = opts.codec == Codec::Jpeg
        && decoded.is_jpeg
        && !resized
        && codec::jpeg_size_is_plausible(bytes.len(), image.height, image.width);
    let payload = if keep_original {
        // The original JPEG, unchanged (its decoded pixels were checked above).
        Ok(bytes.clone())
    } else {
        codec::encode(opts.codec, &image, opts.zstd_level, opts.jpeg_quality)
    };
    match payload {
        Ok(payload) => Outcome::Record {
            rel,
            label,
            image_shape: (image.height, image.width, image.channels),
            payload,
            codec: opts.codec,
            sums: pixel_sums(&image),
        },
        Err(e) => Outcome::Skip { rel, reason: format!("cannot encode: {e}") },
    }
}

/// Per-channel sums and sums of squares of the pixel values (grayscale counts for all three channels).
fn pixel_sums(img: &Image) -> [u64; 6] {
    let mut s = [0u64; 6];
    if img.channels == 1 {
        let (a, b) = img.pixels.iter().fold((0u64, 0u64), |(a, b), &v| (a + v as u64, b + (v as u64) * (v as u64)));
        s = [a, a, a, b, b, b];
    } else {
        for p in img.pixels.chunks_exact(3) {
            for c in 0..3 {
                s[c] += p[c] as u64;
                s[3 + c] += (p[c] as u64) * (p[c] as u64);
            }
        }
    }
    s
}

/// Puts records into shards in order and gathers the statistics.
struct Writer {
    dir: PathBuf,
    limit: u64,
    current: Option<ShardWriter>,
    shards: Vec<ShardEntry>,
    written: usize,
    channels: u8,
    class_counts: Vec<usize>,
    sums: [u128; 6],
    pixels: u128,
}

impl Writer {
    fn new(dir: PathBuf, limit: u64, classes: usize) -> Writer {
        Writer {
            dir,
            limit,
            current: None,
            shards: Vec::new(),
            written: 0,
            channels: 1,
            class_counts: vec![0; classes],
            sums: [0; 6],
            pixels: 0,
        }
    }

    fn add(
        &mut self,
        label: Option<u32>,
        (h, w, c): (u32, u32, u8),
        codec: Codec,
        payload: &[u8],
        sums: &[u64; 6],
    ) -> Result<()> {
        let len = (RECORD_HEADER_LEN + payload.len()) as u64;
        if let Some(cur) = &self.current {
            if cur.records() > 0 && cur.bytes() + len > self.limit {
                self.close_current()?;
            }
        }
        if self.current.is_none() {
            let name = format!("shard-{:05}.bin", self.shards.len());
            self.current = Some(ShardWriter::create(&self.dir.join(name))?);
        }
        self.current.as_mut().expect("opened above").append(label, h, w, c, codec, payload)?;
        self.written += 1;
        self.channels = self.channels.max(c);
        if let Some(l) = label {
            if let Some(n) = self.class_counts.get_mut(l as usize) {
                *n += 1;
            }
        }
        for (a, &b) in self.sums.iter_mut().zip(sums) {
            *a += b as u128;
        }
        self.pixels += h as u128 * w as u128;
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(cur) = self.current.take() {
            let f = cur.finish()?;
            self.shards.push(ShardEntry {
                file: format!("shard-{:05}.bin", self.shards.len()),
                records: f.records,
                bytes: f.bytes,
                checksum: format!("crc32:{:08x}", f.crc32),
            });
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<ShardEntry>> {
        self.close_current()?;
        Ok(self.shards.clone())
    }

    fn channel_count(&self) -> usize {
        self.channels as usize
    }

    fn mean(&self) -> Vec<f64> {
        let n = self.pixels.max(1) as f64 * 255.0;
        (0..self.channel_count()).map(|c| self.sums[c] as f64 / n).collect()
    }

    fn std(&self) -> Vec<f64> {
        let n = self.pixels.max(1) as f64;
        (0..self.channel_count())
            .map(|c| {
                let m = self.sums[c] as f64 / n;
                ((self.sums[3 + c] as f64 / n - m * m).max(0.0)).sqrt() / 255.0
            })
            .collect()
    }
}

/// The file name of the source names (see [`NamesEntry`]).
pub const NAMES_FILE: &str = "names.json";

/// Writes the source name of every image, in index order, and describes the file for the manifest.
fn write_names(dir: &Path, names: &[String]) -> Result<NamesEntry> {
    let mut text = serde_json::to_vec(names).expect("strings serialise");
    text.push(b'\n');
    write_synced(&dir.join(NAMES_FILE), &text)?;
    Ok(NamesEntry {
        file: NAMES_FILE.into(),
        count: names.len(),
        checksum: format!("crc32:{:08x}", crc32fast::hash(&text)),
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    f.write_all(bytes).map_err(|e| DataError::io(path, e))?;
    f.sync_all().map_err(|e| DataError::io(path, e))
}

fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    // Not existing yet: canonicalise the parent.
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => absolute(parent).join(name),
        (_, Some(name)) => std::env::current_dir().unwrap_or_default().join(name),
        _ => p.to_owned(),
    }
}

/// Refuses an output without a name, and an output and input inside each other.
fn check_paths(opts: &PreprocessOptions) -> Result<()> {
    let out = &opts.output;
    let bad = |problem: String| Err(DataError::Output { path: out.clone(), problem });
    if out.file_name().is_none() {
        return bad("give a directory name for the output".into());
    }
    let (ai, ao) = (absolute(&opts.input), absolute(out));
    if ao.starts_with(&ai) || ai.starts_with(&ao) {
        return bad(format!("the output and the input ({}) must not contain each other", opts.input.display()));
    }
    Ok(())
}

/// Largest `--shard-size` in MiB (1 TiB): the byte count stays far from overflowing.
pub const MAX_SHARD_SIZE_MIB: u64 = 1 << 20;

/// Most decoding threads (`--workers`): each holds a window of images in memory.
pub const MAX_WORKERS: usize = 1024;

/// Checks every option before anything is read or written; the message names the option.
fn validate(opts: &PreprocessOptions) -> Result<()> {
    let bad = |msg: String| Err(DataError::Config(msg));
    if opts.resize == Some(0) {
        return bad("--resize 0: the short side must be at least 1 pixel (leave --resize out to keep the sizes)".into());
    }
    if !(1..=MAX_SHARD_SIZE_MIB).contains(&opts.shard_size_mib) {
        return bad(format!(
            "--shard-size {}: the shard size is in MiB, from 1 to {MAX_SHARD_SIZE_MIB}",
            opts.shard_size_mib
        ));
    }
    if !(1..=MAX_WORKERS).contains(&opts.workers) {
        return bad(format!("--workers {}: give from 1 to {MAX_WORKERS} decoding threads", opts.workers));
    }
    if !(1..=MAX_PIXELS).contains(&opts.max_pixels) {
        return bad(format!(
            "--max-pixels {}: give from 1 to {MAX_PIXELS} (65535 x 65535, the largest image a record holds)",
            opts.max_pixels
        ));
    }
    let levels = zstd::compression_level_range();
    if !levels.contains(&opts.zstd_level) {
        return bad(format!("zstd level {} is not in {}..={}", opts.zstd_level, levels.start(), levels.end()));
    }
    if !(1..=100).contains(&opts.jpeg_quality) {
        return bad(format!("JPEG quality {} is not in 1..=100", opts.jpeg_quality));
    }
    Ok(())
}
