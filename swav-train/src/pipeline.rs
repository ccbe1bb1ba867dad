//! What `cargo xtask pipeline` needs besides the steps themselves (preprocess, train, evaluate,
//! export), so that the command stays a thin sequence of calls:
//!
//! - [`InputDigests`]: the identity of an input file or folder is a digest of its content (SHA-256),
//!   so `touch` changes nothing; digests are cached by (size, modification time) in the output folder,
//!   so unchanged inputs are not read again;
//! - [`Stamps`]: one file per finished step holding a key of everything its result depends on; a step
//!   whose stamp matches is skipped;
//! - [`holdout_split`]: the train / held-out ranges of an IDX file;
//! - [`claim_run_dir`]: the pipeline's training folder is marked as its own ([`RUN_MARKER`]); it only
//!   ever replaces a folder it created, says so, and refuses any other;
//! - [`materialize`]: writes data compiled into a binary (the default demo's images) to disk once, so
//!   the default pipeline works from an installed binary, not only inside the source tree.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swav_core::fs::{atomic_write, FsError};

use crate::TrainError;

/// The folder of stamps inside a pipeline's output folder.
pub const STAMPS_DIR: &str = "stamps";
/// The file that marks a run folder as created by the pipeline (it holds the run's key).
pub const RUN_MARKER: &str = ".swav-pipeline-run";
const DIGEST_CACHE: &str = "input-digests.json";

/// A stable key (hex SHA-256) of a list of strings; each part is length-prefixed, so no two lists
/// give the same bytes.
pub fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::File(FsError::new(path, e))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CachedDigest {
    len: u64,
    modified_ns: u128,
    sha256: String,
}

/// Content digests of input files, cached by size and modification time.
pub struct InputDigests {
    cache_path: PathBuf,
    cache: BTreeMap<PathBuf, CachedDigest>,
}

impl InputDigests {
    /// The cache of the pipeline output folder `out` (empty when absent or unreadable: it is only a cache).
    pub fn open(out: &Path) -> InputDigests {
        let cache_path = out.join(STAMPS_DIR).join(DIGEST_CACHE);
        let cache = std::fs::read(&cache_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        InputDigests { cache_path, cache }
    }

    /// The digest of a file's content, or of a folder's (every file below it, by relative name, in
    /// name order).
    pub fn digest(&mut self, path: &Path) -> Result<String, TrainError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.is_file() {
            return self.file_digest(path, &meta);
        }
        let mut files = Vec::new();
        list_files(path, path, &mut files)?;
        files.sort();
        let mut parts = vec![String::from("folder")];
        for rel in files {
            let full = path.join(&rel);
            let meta = std::fs::metadata(&full).map_err(io(&full))?;
            parts.push(rel.display().to_string());
            parts.push(self.file_digest(&full, &meta)?);
        }
        Ok(key(&parts.iter().map(String::as_str).collect::<Vec<_>>()))
    }

    fn file_digest(&mut self, path: &Path, meta: &std::fs::Metadata) -> Result<String, TrainError> {
        let modified_ns =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let abs = std::fs::canonicalize(path).map_err(io(path))?;
        if let Some(c) = self.cache.get(&abs) {
            if c.len == meta.len() && c.modified_ns == modified_ns {
                return Ok(c.sha256.clone());
            }
        }
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(path).map_err(io(path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io(path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sha256 = hex(&h.finalize());
        self.cache.insert(abs, CachedDigest { len: meta.len(), modified_ns, sha256: sha256.clone() });
        Ok(sha256)
    }

    /// Writes the cache back (atomically).
    pub fn save(&self) -> Result<(), TrainError> {
        if let Some(dir) = self.cache_path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        atomic_write(&self.cache_path, &serde_json::to_vec_pretty(&self.cache).expect("digests serialise"))?;
        Ok(())
    }
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), TrainError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            list_files(root, &path, out)?;
        } else if kind.is_file() {
            out.push(path.strip_prefix(root).expect("below the root").to_path_buf());
        }
    }
    Ok(())
}

/// The stamps of a pipeline output folder: `<out>/stamps/<step>.json` holding `{"step", "key"}`.
pub struct Stamps {
    dir: PathBuf,
}

impl Stamps {
    /// The stamps of the output folder `out`.
    pub fn new(out: &Path) -> Stamps {
        Stamps { dir: out.join(STAMPS_DIR) }
    }

    fn path(&self, step: &str) -> PathBuf {
        self.dir.join(format!("{step}.json"))
    }

    /// Whether `step` finished with this `key`.
    pub fn matches(&self, step: &str, key: &str) -> bool {
        std::fs::read(self.path(step))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["key"] == key)
    }

    /// Records that `step` finished with `key`.
    pub fn write(&self, step: &str, key: &str) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let body = serde_json::json!({ "step": step, "key": key });
        atomic_write(&self.path(step), body.to_string().as_bytes())?;
        Ok(())
    }

    /// Forgets the stamps of `steps` (they will run again).
    pub fn clear(&self, steps: &[&str]) -> Result<(), TrainError> {
        for step in steps {
            let path = self.path(step);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(())
    }
}

/// The image ranges to train on and to hold out when one IDX file provides both: the last `holdout`
/// images are held out.
pub fn holdout_split(images: &Path, holdout: usize) -> Result<(Range<usize>, Range<usize>), TrainError> {
    let n = swav_data::preprocess::idx_image_count(images)?;
    if holdout == 0 || holdout >= n {
        return Err(TrainError::Config(format!(
            "[data] holdout = {holdout} must be between 1 and {} for the {n} images of {} (or give [data] test)",
            n - 1,
            images.display()
        )));
    }
    Ok((0..n - holdout, n - holdout..n))
}

/// What [`claim_run_dir`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunDirClaim {
    /// A new (or empty) folder, now marked.
    Created,
    /// The pipeline's own run with this key: training resumes in it.
    Resumed,
    /// The pipeline's own run of another key (other data or configuration): it was removed and the
    /// folder created afresh.
    Replaced,
}

/// Makes `run_dir` the pipeline's run folder for `key`. A folder with the pipeline's marker and
/// another key (a run of other data or another configuration), or any of its own when `fresh` (a
/// forced retraining), is removed after `say` has told why; a non-empty folder without the marker is
/// someone else's and is refused, untouched.
pub fn claim_run_dir(run_dir: &Path, key: &str, fresh: bool, say: &dyn Fn(&str)) -> Result<RunDirClaim, TrainError> {
    let marker = run_dir.join(RUN_MARKER);
    let mut claim = RunDirClaim::Created;
    if run_dir.exists() {
        let empty = std::fs::read_dir(run_dir).map_err(io(run_dir))?.next().is_none();
        match std::fs::read_to_string(&marker) {
            Ok(k) if k.trim() == key && !fresh => return Ok(RunDirClaim::Resumed),
            Ok(k) => {
                let why = if k.trim() == key {
                    "training is forced to start again"
                } else {
                    "the pipeline trained it on other data or with another configuration"
                };
                say(&format!("removing {}: {why}", run_dir.display()));
                std::fs::remove_dir_all(run_dir).map_err(io(run_dir))?;
                claim = RunDirClaim::Replaced;
            }
            Err(_) if empty => {}
            Err(_) => {
                return Err(TrainError::Config(format!(
                    "{} exists and was not made by the pipeline (no {RUN_MARKER}): it is left alone; move it away or choose another output folder",
                    run_dir.display()
                )))
            }
        }
    }
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    atomic_write(&marker, key.as_bytes())?;
    Ok(claim)
}

/// Writes `files` (name, bytes) into `dir` unless a file of that name already holds exactly those
/// bytes; returns `dir`. Names must be plain file names.
pub fn materialize(dir: &Path, files: &[(&str, &[u8])]) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, bytes) in files {
        if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
            return Err(TrainError::Config(format!("embedded file name `{name}` is not a plain file name")));
        }
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|have| have == *bytes) {
            continue;
        }
        atomic_write(&path, bytes)?;
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_follow_content_not_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        let mut d = InputDigests::open(dir.path());
        let first = d.digest(&f).unwrap();
        // Same content, new modification time (what `touch` does): same digest, recomputed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(d.digest(&f).unwrap(), first);
        std::fs::write(&f, b"hellO").unwrap();
        assert_ne!(d.digest(&f).unwrap(), first);
        // Folders: by relative name and content.
        let sub = dir.path().join("imgs");
        std::fs::create_dir_all(sub.join("cats")).unwrap();
        std::fs::write(sub.join("cats/1.png"), b"x").unwrap();
        let a = d.digest(&sub).unwrap();
        std::fs::rename(sub.join("cats"), sub.join("dogs")).unwrap();
        assert_ne!(d.digest(&sub).unwrap(), a, "a renamed class changes the labels");
        d.save().unwrap();
        let mut again = InputDigests::open(dir.path());
        assert_eq!(again.digest(&f).unwrap(), d.digest(&f).unwrap());
    }

    #[test]
    fn stamps_match_only_their_key_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let s = Stamps::new(dir.path());
        assert!(!s.matches("train", "k1"));
        s.write("train", "k1").unwrap();
        assert!(s.matches("train", "k1") && !s.matches("train", "k2"));
        s.clear(&["train", "eval"]).unwrap();
        assert!(!s.matches("train", "k1"));
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
    }

    #[test]
    fn the_run_folder_is_claimed_resumed_replaced_only_when_ours_and_refused_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let said = std::cell::RefCell::new(Vec::new());
        let say = |s: &str| said.borrow_mut().push(s.to_string());
        assert_eq!(claim_run_dir(&run, "k1", false, &say).unwrap(), RunDirClaim::Created);
        std::fs::write(run.join("notes.txt"), "mine").unwrap();
        assert_eq!(claim_run_dir(&run, "k1", false, &say).unwrap(), RunDirClaim::Resumed);
        assert!(run.join("notes.txt").exists());
        assert_eq!(claim_run_dir(&run, "k2", false, &say).unwrap(), RunDirClaim::Replaced);
        assert!(!run.join("notes.txt").exists());
        assert!(said.borrow()[0].contains("removing"), "{:?}", said.borrow());
        std::fs::write(run.join("notes.txt"), "again").unwrap();
        assert_eq!(claim_run_dir(&run, "k2", true, &say).unwrap(), RunDirClaim::Replaced);
        assert!(!run.join("notes.txt").exists() && said.borrow()[1].contains("forced"));
        // Someone else's folder is refused and left as it is.
        let foreign = dir.path().join("theirs");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("step-1.safetensors"), "x").unwrap();
        let err = claim_run_dir(&foreign, "k1", true, &say).unwrap_err().to_string();
        assert!(err.contains("not made by the pipeline"), "{err}");
        assert!(foreign.join("step-1.safetensors").exists());
    }

    #[test]
    fn holdout_needs_a_valid_count_and_embedded_files_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let images = swav_data::synthetic::write_shapes_idx(dir.path(), 10, 8, 1).unwrap();
        assert_eq!(holdout_split(&images, 3).unwrap(), (0..7, 7..10));
        assert!(holdout_split(&images, 0).is_err() && holdout_split(&images, 10).is_err());
        let empty = dir.path().join("empty-images-idx3-ubyte");
        std::fs::write(&empty, [0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8]).unwrap();
        let err = holdout_split(&empty, 1).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let out = dir.path().join("input");
        materialize(&out, &[("a.gz", b"abc")]).unwrap();
        assert_eq!(std::fs::read(out.join("a.gz")).unwrap(), b"abc");
        assert!(materialize(&out, &[("../escape", b"x")]).is_err());
    }
}
