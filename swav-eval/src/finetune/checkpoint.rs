//! Fine-tuning checkpoints, with the file conventions of pretraining (`swav_train::checkpoint`): a
//! checkpoint at step N is three files in `<run-dir>/checkpoints/`, named from N alone:
//! - `step-N.safetensors`: the network ([`Classifier`]) as a torchvision state dict (`conv1.weight`
//!   in OIHW, ..., `fc.weight`, `fc.bias`) with the preprocessing in swav-rs's metadata keys (`mean`,
//!   `std`, `input_size`): `eval`, `embed` and `export` read its backbone, PyTorch loads all of it;
//! - `step-N.train.safetensors`: the SGD momentum of every parameter (`momentum.<name>`);
//! - `step-N.json`: the [`Sidecar`] (position, partial-epoch scores, the epochs' validation results, the
//!   run's description and the SHA-256 of the two other files), written last.
//!
//! Every file is written atomically and the sidecar after the others, so a checkpoint with a sidecar
//! is complete; swav-train's `clean_incomplete` removes what an interrupted save leaves. Restoring
//! checks both checksums, the step the model file records, and every tensor's name and shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swav_model::checkpoint::{load_model_state, model_state, LoadOptions, NamedTensors, Value};
use swav_model::init::InitRng;
use swav_model::param::{Slot, Visit};
use swav_model::resnet::ResNet;
use swav_model::Preprocessing;
use swav_train::checkpoint::{checkpoint_dir, prune_steps, sha256_of, sidecar_steps, stem};
use swav_train::lars::Lars;

use super::net::Classifier;
use super::{FinetuneEpoch, RunSpec};
use crate::classifier::Tally;
use crate::EvalError;

/// The sidecar format written and read.
pub const SIDECAR_FORMAT: &str = "swav-rs-finetune-checkpoint-1";

/// The JSON sidecar of a fine-tuning checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// [`SIDECAR_FORMAT`].
    pub format: String,
    /// Steps done.
    pub step: usize,
    /// The epoch to continue with.
    pub epoch: usize,
    /// Batches of `epoch` already done.
    pub step_in_epoch: usize,
    /// Batches per epoch of the subset the run was made with.
    pub steps_per_epoch: usize,
    /// Training loss and scores of the batches of `epoch` already done.
    pub tally: Tally,
    /// Every completed epoch.
    pub history: Vec<FinetuneEpoch>,
    /// SHA-256 of the model file.
    pub model_sha256: String,
    /// SHA-256 of the momentum file.
    pub train_sha256: String,
    /// The run.
    pub run: RunSpec,
}

/// The model file of the checkpoint at `step`.
pub fn model_path(run_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run_dir).join(format!("{}.safetensors", stem(step)))
}

fn train_path(run_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run_dir).join(format!("{}.train.safetensors", stem(step)))
}

fn sidecar_path(run_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run_dir).join(format!("{}.json", stem(step)))
}

fn checkpoint_error(path: &Path, why: String) -> EvalError {
    EvalError::Invalid(format!("checkpoint {}: {why}", path.display()))
}

/// Saves the state at the position `sidecar` gives (its checksums are filled in here) and removes
/// the checkpoints beyond the newest `keep`. Returns the model file's path.
pub fn save(
    run_dir: &Path,
    net: &mut Classifier,
    opt: &Lars,
    sidecar: &Sidecar,
    keep: usize,
) -> Result<PathBuf, EvalError> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| swav_core::fs::FsError::new(&dir, e))?;
    let run = &sidecar.run;
    let pre = Preprocessing::recorded(&run.model, run.mean.clone(), run.std.clone(), run.input_size)?;
    let mut state = model_state(net);
    state.metadata = pre.to_metadata();
    state.metadata.insert("step".into(), sidecar.step.to_string());
    state.metadata.insert("epoch".into(), sidecar.epoch.to_string());
    state.metadata.insert("fine_tuned_from".into(), run.pretrained.clone());
    state.metadata.insert("classes".into(), serde_json::to_string(&run.classes).expect("strings serialise"));
    let model = model_path(run_dir, sidecar.step);
    state.write(&model)?;

    let mut train = NamedTensors::default();
    for (name, buf) in &opt.buffers {
        train.tensors.insert(format!("momentum.{name}"), Value::from_tensor(buf));
    }
    let train_file = train_path(run_dir, sidecar.step);
    train.write(&train_file)?;

    let side = Sidecar {
        format: SIDECAR_FORMAT.into(),
        model_sha256: sha256_of(&model)?,
        train_sha256: sha256_of(&train_file)?,
        ..sidecar.clone()
    };
    crate::json::write(&sidecar_path(run_dir, sidecar.step), &side)?;
    prune_steps(run_dir, keep)?;
    Ok(model)
}

/// The newest complete checkpoint's sidecar, checked against its file name.
pub fn latest(run_dir: &Path) -> Result<Option<Sidecar>, EvalError> {
    let Some((step, path)) = sidecar_steps(run_dir)?.pop() else { return Ok(None) };
    let sidecar: Sidecar = crate::json::read(&path, "a fine-tuning checkpoint sidecar")?;
    if sidecar.format != SIDECAR_FORMAT {
        return Err(checkpoint_error(&path, format!("unknown sidecar format `{}`", sidecar.format)));
    }
    if sidecar.step != step {
        return Err(checkpoint_error(&path, format!("it says step {} but is the file of step {step}", sidecar.step)));
    }
    Ok(Some(sidecar))
}

/// The network and optimiser state of the checkpoint `sidecar` describes, every file checked.
pub fn restore(
    run_dir: &Path,
    sidecar: &Sidecar,
    momentum: f64,
    weight_decay: f64,
) -> Result<(Classifier, Lars), EvalError> {
    let (model, train) = (model_path(run_dir, sidecar.step), train_path(run_dir, sidecar.step));
    for (path, want) in [(&model, &sidecar.model_sha256), (&train, &sidecar.train_sha256)] {
        let got = sha256_of(path)?;
        if &got != want {
            return Err(checkpoint_error(
                path,
                format!("its SHA-256 is {got}, the sidecar recorded {want}: the file is damaged"),
            ));
        }
    }
    let state = NamedTensors::read(&model)?;
    if state.metadata.get("step") != Some(&sidecar.step.to_string()) {
        return Err(checkpoint_error(&model, format!("it is not the model of step {}", sidecar.step)));
    }
    let backbone = ResNet::new(&sidecar.run.model, &mut InitRng::new(0))?;
    let mut net = Classifier::new(backbone, sidecar.run.classes.len(), 0);
    load_model_state(&mut net, &state, "", LoadOptions::default())
        .map_err(|e| checkpoint_error(&model, e.to_string()))?;

    let mut shapes = BTreeMap::new();
    net.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            shapes.insert(name.to_string(), p.value.shape().to_vec());
        }
    });
    let buffers = NamedTensors::read(&train)?;
    let mut opt = Lars::new(momentum, weight_decay, 0.0, false);
    for (name, value) in &buffers.tensors {
        let param = name.strip_prefix("momentum.").filter(|p| shapes.get(*p).map(Vec::as_slice) == Some(value.shape()));
        let Some(param) = param else {
            return Err(checkpoint_error(
                &train,
                format!("`{name}` {:?} is not the momentum of a parameter of this network", value.shape()),
            ));
        };
        opt.buffers.insert(param.to_string(), buffers.tensor(name)?);
    }
    Ok((net, opt))
}
