//! Training checkpoints in `<run-dir>/checkpoints/`. A checkpoint at step N is three files:
//! - `step-N.safetensors`: the model alone (torchvision / official names, config in the metadata, plus
//!   `mean`, `std`, `input_size` for evaluation and export): loadable anywhere without the rest;
//! - `step-N.train.safetensors`: optimiser momentum (`momentum.<param>`) and queue (`queue.<j>`);
//! - `step-N.json`: the sidecar (step, epoch, position in the epoch, configuration), written last.
//! Every file is written atomically and the sidecar only after the two others, so a checkpoint whose
//! sidecar exists is complete: a crash at any moment leaves the previous checkpoints intact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swav_core::fs::atomic_write;
use swav_model::checkpoint::{NamedTensors, Value};
use swav_model::{ModelFile, Preprocessing};

use crate::config::Config;
use crate::lars::Lars;
use crate::queue::Queue;
use crate::step::SwavState;
use crate::TrainError;

pub const SIDECAR_FORMAT: &str = "swav-rs-checkpoint-1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sidecar {
    pub format: String,
    /// Iterations completed.
    pub step: usize,
    /// The epoch to continue with, and the batches of it already done.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub steps_per_epoch: usize,
    /// Loss of the last step, when one ran.
    pub loss: Option<f64>,
    pub model_file: String,
    pub train_file: String,
    pub config: Config,
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

/// A checkpoint found in a run directory.
#[derive(Clone, Debug)]
pub struct Found {
    pub sidecar: Sidecar,
    pub dir: PathBuf,
}

impl Found {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.sidecar.model_file)
    }

    pub fn train_path(&self) -> PathBuf {
        self.dir.join(&self.sidecar.train_file)
    }
}

pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
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
    let stem = format!("step-{:08}", sidecar.step);
    let mut meta = model_meta.extra.clone();
    meta.insert("step".into(), sidecar.step.to_string());
    meta.insert("epoch".into(), sidecar.epoch.to_string());
    let model_path = dir.join(format!("{stem}.safetensors"));
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
    let train_path = dir.join(format!("{stem}.train.safetensors"));
    train.write(&train_path)?;

    let side = Sidecar {
        model_file: format!("{stem}.safetensors"),
        train_file: format!("{stem}.train.safetensors"),
        ..sidecar.clone()
    };
    let json = serde_json::to_vec_pretty(&side).expect("sidecar serialises");
    let side_path = dir.join(format!("{stem}.json"));
    atomic_write(&side_path, &json)?;
    prune(&dir, keep)?;
    Ok(model_path)
}

/// Every complete checkpoint, oldest first. Unreadable sidecars are reported, not skipped silently.
pub fn list(run_dir: &Path) -> Result<Vec<Found>, TrainError> {
    let dir = checkpoint_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        let is_sidecar = path.extension().is_some_and(|e| e == "json")
            && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-"));
        if !is_sidecar {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let sidecar: Sidecar = serde_json::from_slice(&bytes).map_err(|e| {
            TrainError::Checkpoint(format!(
                "{}: unreadable checkpoint sidecar ({e}); move it away to resume from an older one",
                path.display()
            ))
        })?;
        if sidecar.format != SIDECAR_FORMAT {
            return Err(TrainError::Checkpoint(format!(
                "{}: unknown checkpoint format `{}`",
                path.display(),
                sidecar.format
            )));
        }
        found.push(Found { sidecar, dir: dir.clone() });
    }
    found.sort_by_key(|f| f.sidecar.step);
    Ok(found)
}

pub fn latest(run_dir: &Path) -> Result<Option<Found>, TrainError> {
    Ok(list(run_dir)?.pop())
}

fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
    let run_dir = dir.parent().unwrap_or(dir);
    let all = list(run_dir)?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        // Sidecar first: a half-pruned checkpoint is then never mistaken for a complete one.
        let side = old.dir.join(format!("step-{:08}.json", old.sidecar.step));
        for path in [side, old.model_path(), old.train_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }
    Ok(())
}

/// Restores model, optimiser state and queue from a checkpoint.
pub fn restore(found: &Found, optimizer: Lars) -> Result<SwavState, TrainError> {
    let model = ModelFile::read(&found.model_path())?.model;
    if model.config != found.sidecar.config.model {
        return Err(TrainError::Checkpoint(format!(
            "{}: its model configuration differs from the sidecar's",
            found.model_path().display()
        )));
    }
    let train = NamedTensors::read(&found.train_path())?;
    let mut optimizer = optimizer;
    optimizer.buffers.clear();
    let mut queue_rows = BTreeMap::new();
    for name in train.tensors.keys() {
        if let Some(param) = name.strip_prefix("momentum.") {
            optimizer.buffers.insert(param.to_string(), train.tensor(name)?);
        } else if let Some(j) = name.strip_prefix("queue.") {
            let j: usize = j.parse().map_err(|_| {
                TrainError::Checkpoint(format!("{}: bad tensor name `{name}`", found.train_path().display()))
            })?;
            queue_rows.insert(j, train.tensor(name)?);
        }
    }
    let queue = (!queue_rows.is_empty()).then(|| Queue { rows: queue_rows.into_values().collect() });
    Ok(SwavState { model, optimizer, queue })
}
