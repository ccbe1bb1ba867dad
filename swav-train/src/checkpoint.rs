//! Training checkpoints in `<run-dir>/checkpoints/`. A checkpoint at step N is three files whose names
//! come from N alone (`step-NNNNNNNN`), never from what a file says:
//! - `step-N.safetensors`: the model file (swav-model's `ModelFile`: torchvision / official names,
//!   configuration and preprocessing in the metadata): loadable anywhere without the rest;
//! - `step-N.train.safetensors`: optimiser momentum (`momentum.<param>`) and queue (`queue.<j>`);
//! - `step-N.json`: the sidecar (step, epoch, position in the epoch, configuration and the SHA-256 of
//!   the two other files), written last.
//!
//! Every file is written atomically and the sidecar only after the two others, so a checkpoint whose
//! sidecar exists is complete: a crash at any moment leaves the previous checkpoints intact, and what
//! a crash leaves behind is removed by [`clean_incomplete`] at the next start. A checkpoint is hostile
//! until checked: resuming verifies both checksums, the sidecar's step against its name and the model
//! file's, and every momentum buffer and queue against the model and the configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swav_core::fs::{atomic_write, remove_stale_temporaries};
use swav_model::checkpoint::{NamedTensors, Value};
use swav_model::param::{Slot, Visit};
use swav_model::{ModelFile, Preprocessing};

use crate::config::Config;
use crate::lars::Lars;
use crate::queue::Queue;
use crate::step::SwavState;
use crate::TrainError;

/// The sidecar format written now.
pub const SIDECAR_FORMAT: &str = "swav-rs-checkpoint-2";
/// The earlier format (no checksums), still read.
const SIDECAR_FORMAT_1: &str = "swav-rs-checkpoint-1";

/// The JSON sidecar of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sidecar {
    /// [`SIDECAR_FORMAT`].
    pub format: String,
    /// Iterations completed.
    pub step: usize,
    /// The epoch to continue with, and the batches of it already done.
    pub epoch: usize,
    /// Batches of `epoch` already done.
    pub step_in_epoch: usize,
    /// Batches per epoch of the data the run was made with.
    pub steps_per_epoch: usize,
    /// Loss of the last step, when one ran.
    pub loss: Option<f64>,
    /// SHA-256 of the model file (absent in format 1).
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// SHA-256 of the optimiser-state file (absent in format 1).
    #[serde(default)]
    pub train_sha256: Option<String>,
    /// Ranks of the run that wrote it (its queue holds every rank's rows, rank by rank).
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// The resolved configuration of the run.
    pub config: Config,
}

fn one_rank() -> usize {
    1
}

/// What a checkpoint's model file records besides the network: the preprocessing of the training
/// data and free-form entries (e.g. where the data came from).
#[derive(Clone, Debug)]
pub struct ModelMeta {
    /// The normalisation and input size the network was trained with.
    pub preprocessing: Preprocessing,
    /// Other metadata entries.
    pub extra: BTreeMap<String, String>,
}

/// A complete checkpoint found in a run directory.
#[derive(Clone, Debug)]
pub struct Found {
    /// Its sidecar.
    pub sidecar: Sidecar,
    /// The checkpoints folder.
    pub dir: PathBuf,
}

/// `step-NNNNNNNN`: the stem of every file of the checkpoint at `step`.
pub fn stem(step: usize) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint file name (`step-N.json`, `step-N.safetensors`, `step-N.train.safetensors`),
/// for names of exactly that pattern.
fn step_of(name: &str, suffix: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?.strip_suffix(suffix)?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

impl Found {
    /// The model file.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", stem(self.sidecar.step)))
    }

    /// The optimiser-state file.
    pub fn train_path(&self) -> PathBuf {
        self.dir.join(format!("{}.train.safetensors", stem(self.sidecar.step)))
    }

    fn sidecar_path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", stem(self.sidecar.step)))
    }
}

/// The checkpoints folder of a run.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// The SHA-256 of a file's bytes, as lowercase hex: what a sidecar records of the files it completes.
pub fn sha256_of(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Saves the state and removes the oldest checkpoints beyond `keep`. `model_meta` goes into the model
/// file's metadata. Returns the model file's path.
pub fn save(
    run_dir: &Path,
    state: &mut SwavState,
    sidecar: &Sidecar,
    model_meta: &ModelMeta,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let found = Found { sidecar: sidecar.clone(), dir: dir.clone() };
    let mut meta = model_meta.extra.clone();
    meta.insert("step".into(), sidecar.step.to_string());
    meta.insert("epoch".into(), sidecar.epoch.to_string());
    let model_path = found.model_path();
    ModelFile::write(&mut state.model, &model_meta.preprocessing, &meta, &model_path)?;

    let mut train = NamedTensors::default();
    for (name, buf) in &state.optimizer.buffers {
        train.tensors.insert(format!("momentum.{name}"), Value::from_tensor(buf));
    }
    if let Some(q) = &state.queue {
        for (j, rows) in q.rows.iter().enumerate() {
            train.tensors.insert(format!("queue.{j}"), Value::from_tensor(rows));
        }
    }
    let train_path = found.train_path();
    train.write(&train_path)?;

    let side = Sidecar {
        format: SIDECAR_FORMAT.into(),
        model_sha256: Some(sha256_of(&model_path)?),
        train_sha256: Some(sha256_of(&train_path)?),
        ..sidecar.clone()
    };
    let json = serde_json::to_vec_pretty(&side).expect("sidecar serialises");
    atomic_write(&found.sidecar_path(), &json)?;
    prune_steps(run_dir, keep)?;
    Ok(model_path)
}

/// The folder of archived model files (`ckp-E.safetensors`), which pruning never touches.
pub fn archive_dir(run_dir: &Path) -> PathBuf {
    checkpoint_dir(run_dir).join("archive")
}

/// Archives the model file at `model_path` as `archive/ckp-{epoch_index}.safetensors` and returns its
/// path. A hard link where the file system allows (checkpoint files are replaced, never modified in
/// place, so the link keeps the bytes it was made with), else a copy; either is made under a temporary
/// name and renamed, so an archive is complete or absent.
pub fn archive(run_dir: &Path, model_path: &Path, epoch_index: usize) -> Result<PathBuf, TrainError> {
    let dir = archive_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(format!("ckp-{epoch_index}.safetensors"));
    let tmp = swav_core::fs::temporary_path(&path);
    remove_if_present(&tmp)?;
    if std::fs::hard_link(model_path, &tmp).is_err() {
        std::fs::copy(model_path, &tmp).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// The step and path of every sidecar (`step-N.json`) in the checkpoints folder, oldest first: the
/// complete checkpoints of any run that follows these file conventions (pretraining here, the
/// evaluation runs of swav-eval), whatever its sidecar holds.
pub fn sidecar_steps(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let dir = checkpoint_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        if let Some(step) = path.file_name().and_then(|n| step_of(&n.to_string_lossy(), ".json")) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Every complete checkpoint, oldest first. Unreadable or inconsistent sidecars are reported, not
/// skipped silently.
pub fn list(run_dir: &Path) -> Result<Vec<Found>, TrainError> {
    let dir = checkpoint_dir(run_dir);
    let mut found = Vec::new();
    for (step, path) in sidecar_steps(run_dir)? {
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let bad = |why: String| {
            TrainError::Checkpoint(format!(
                "{}: {why}; move it away to resume from an older checkpoint",
                path.display()
            ))
        };
        let sidecar: Sidecar =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable checkpoint sidecar ({e})")))?;
        if sidecar.format != SIDECAR_FORMAT && sidecar.format != SIDECAR_FORMAT_1 {
            return Err(bad(format!("unknown checkpoint format `{}`", sidecar.format)));
        }
        if sidecar.step != step {
            return Err(bad(format!("the sidecar says step {} but is the file of step {step}", sidecar.step)));
        }
        found.push(Found { sidecar, dir: dir.clone() });
    }
    Ok(found)
}

/// The newest complete checkpoint.
pub fn latest(run_dir: &Path) -> Result<Option<Found>, TrainError> {
    Ok(list(run_dir)?.pop())
}

fn remove_if_present(path: &Path) -> Result<(), TrainError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Removes the oldest checkpoints beyond the newest `keep` (the three files of each, sidecar first: a
/// half-removed checkpoint is then never mistaken for a complete one).
pub fn prune_steps(run_dir: &Path, keep: usize) -> Result<(), TrainError> {
    let all = sidecar_steps(run_dir)?;
    let dir = checkpoint_dir(run_dir);
    for (step, sidecar) in all.iter().take(all.len().saturating_sub(keep)) {
        let s = stem(*step);
        for path in [sidecar.clone(), dir.join(format!("{s}.safetensors")), dir.join(format!("{s}.train.safetensors"))]
        {
            remove_if_present(&path)?;
        }
    }
    Ok(())
}

/// Removes what an interrupted save left: temporary files of processes that no longer run, and
/// checkpoint files without a sidecar (written before a crash that came before the sidecar). Returns
/// the removed paths. Call it with the run folder locked.
pub fn clean_incomplete(run_dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let dir = checkpoint_dir(run_dir);
    let mut removed = remove_stale_temporaries(run_dir)?;
    removed.extend(remove_stale_temporaries(&dir)?);
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let step = step_of(&name, ".train.safetensors").or_else(|| step_of(&name, ".safetensors"));
        if let Some(step) = step {
            if !dir.join(format!("{}.json", stem(step))).exists() {
                remove_if_present(&path)?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}

/// Restores model, optimiser state and queue from a checkpoint of the run configured by `config`,
/// checking everything it reads (see the module docs).
pub fn restore(found: &Found, config: &Config, optimizer: Lars) -> Result<SwavState, TrainError> {
    let bad = |path: &Path, why: String| TrainError::Checkpoint(format!("{}: {why}", path.display()));
    for (path, want) in
        [(found.model_path(), &found.sidecar.model_sha256), (found.train_path(), &found.sidecar.train_sha256)]
    {
        if let Some(want) = want {
            let got = sha256_of(&path)?;
            if &got != want {
                return Err(bad(
                    &path,
                    format!("its SHA-256 is {got}, the sidecar recorded {want}: the file is damaged"),
                ));
            }
        }
    }
    let file = ModelFile::read(&found.model_path())?;
    let mut model = file.model;
    if model.config != found.sidecar.config.model {
        return Err(bad(&found.model_path(), "its model configuration differs from the sidecar's".into()));
    }
    if file.metadata.get("step").is_some_and(|s| s != &found.sidecar.step.to_string()) {
        return Err(bad(
            &found.model_path(),
            format!("it is the model of step {}, not {}", file.metadata["step"], found.sidecar.step),
        ));
    }
    // Every buffer must belong to a parameter of this model, with its shape.
    let mut shapes = BTreeMap::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            shapes.insert(name.to_string(), p.value.shape().to_vec());
        }
    });
    let train_path = found.train_path();
    let train = NamedTensors::read(&train_path)?;
    let mut optimizer = optimizer;
    optimizer.buffers.clear();
    let mut queue_rows = BTreeMap::new();
    let t = &config.train;
    for (name, value) in &train.tensors {
        if let Some(param) = name.strip_prefix("momentum.") {
            match shapes.get(param) {
                Some(shape) if shape.as_slice() == value.shape() => {}
                Some(shape) => {
                    return Err(bad(
                        &train_path,
                        format!("`{name}` has shape {:?}, the parameter {shape:?}", value.shape()),
                    ))
                }
                None => {
                    return Err(bad(&train_path, format!("`{name}` is the momentum of no parameter of this model")))
                }
            }
            optimizer.buffers.insert(param.to_string(), train.tensor(name)?);
        } else if let Some(j) = name.strip_prefix("queue.") {
            let j: usize = j.parse().map_err(|_| bad(&train_path, format!("bad tensor name `{name}`")))?;
            let want = [t.queue_length, config.model.feat_dim];
            if j >= t.crops_for_assign.len() || value.shape() != want {
                return Err(bad(
                    &train_path,
                    format!(
                        "`{name}` of shape {:?} is not a queue of this run ({} of {want:?})",
                        value.shape(),
                        t.crops_for_assign.len()
                    ),
                ));
            }
            queue_rows.insert(j, train.tensor(name)?);
        } else {
            return Err(bad(&train_path, format!("unexpected tensor `{name}`")));
        }
    }
    if !queue_rows.is_empty() && queue_rows.len() != t.crops_for_assign.len() {
        return Err(bad(
            &train_path,
            format!("{} queues for {} assigned crops", queue_rows.len(), t.crops_for_assign.len()),
        ));
    }
    let queue = (!queue_rows.is_empty()).then(|| Queue::from_rows(queue_rows.into_values().collect()));
    Ok(SwavState { queue, ..SwavState::new(model, optimizer) })
}
