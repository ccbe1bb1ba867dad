//! Data-parallel training: what the ranks share, check and exchange around [`crate::step::swav_step`].
//!
//! The algorithm is the official one (`main_swav.py` under `torch.distributed`):
//! - each rank loads its own share of every epoch (the loader's `rank`/`world_size`), batch
//!   `train.batch_size` per rank;
//! - Sinkhorn's sums are all-reduced ([`CollectiveReducer`]), so `B` is the global batch; the queue is
//!   per rank, `queue_length / world_size` rows each;
//! - gradients are averaged over ranks in buckets, each bucket all-reduced on a communication thread
//!   as soon as the backward has made its gradients final ([`GradientAverager`], DDP's reducer), so
//!   that communication overlaps the rest of the backward (gradients in device memory go to NCCL
//!   in one call after the backward when the collective reduces device memory); batch-norm buffers
//!   are broadcast from rank 0 before each forward (DDP's `broadcast_buffers`), unless the batch norms
//!   are synchronised (`model.sync_bn`), whose statistics are the group's;
//! - rank 0 writes checkpoints and metrics; every rank resumes from the same checkpoint.
//!
//! Random streams: the loader's augmentations depend on (seed, epoch, image) and the epoch's order on
//! (seed, epoch), so they do not depend on the rank or the world size; the model's initialisation
//! depends on the seed and is broadcast from rank 0 anyway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use swav_model::param::{Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::collective::{all_reduce_mean, broadcast_tensors, BucketedMean};
use swav_tensor::{Collective, Tensor};

use crate::TrainError;

/// A collective error as a training error.
pub fn err(e: swav_tensor::CollectiveError) -> TrainError {
    TrainError::Distributed(e.to_string())
}

/// Sinkhorn's reducer over the run's collective.
#[derive(Clone, Copy)]
pub struct CollectiveReducer<'a>(pub &'a dyn Collective);

impl swav_sinkhorn::Reducer for CollectiveReducer<'_> {
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), swav_sinkhorn::SinkhornError> {
        self.0.all_reduce_sum(values).map_err(|e| swav_sinkhorn::SinkhornError::Reduce(e.to_string()))
    }
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), swav_sinkhorn::SinkhornError> {
        self.0.all_reduce_max(values).map_err(|e| swav_sinkhorn::SinkhornError::Reduce(e.to_string()))
    }
}

/// Stops the run unless every rank has the same `fingerprint` (the hash of the resolved configuration
/// and of the dataset's manifest): ranks that train different things must not average gradients.
pub fn check_same_setup(world: &dyn Collective, fingerprint: &[u8; 32]) -> Result<(), TrainError> {
    let n = world.world_size();
    if n == 1 {
        return Ok(());
    }
    // Rank 0's bytes to everyone, then one flag per rank: every rank learns which ones differ.
    let mut theirs: Vec<f32> = fingerprint.iter().map(|&b| b as f32).collect();
    world.broadcast(&mut theirs, 0).map_err(err)?;
    let mut differs = vec![0.0f32; n];
    differs[world.rank()] = if theirs.iter().zip(fingerprint).any(|(&a, &b)| a != b as f32) { 1.0 } else { 0.0 };
    world.all_reduce_sum(&mut differs).map_err(err)?;
    let bad: Vec<String> = (0..n).filter(|&r| differs[r] != 0.0).map(|r| r.to_string()).collect();
    if !bad.is_empty() {
        return Err(TrainError::Config(format!(
            "rank(s) {} have another configuration or dataset than rank 0 (the hash of the resolved config.toml and \
             of the dataset manifest differ): every rank must be given the same config, overrides and --data",
            bad.join(", ")
        )));
    }
    Ok(())
}

/// The fingerprint [`check_same_setup`] compares: the resolved configuration and the manifest's bytes.
pub fn fingerprint(config_toml: &str, manifest: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((config_toml.len() as u64).to_le_bytes());
    h.update(config_toml.as_bytes());
    h.update(manifest);
    h.finalize().into()
}

/// The group each batch norm synchronises over, when `model.sync_bn` is set and there are several ranks.
pub fn sync_bn_group(
    world: &Arc<dyn Collective>,
    sync_bn: bool,
    group_size: usize,
) -> Result<Option<Arc<dyn Collective>>, TrainError> {
    let n = world.world_size();
    if !sync_bn || n == 1 {
        return Ok(None);
    }
    match group_size {
        0 => Ok(Some(world.clone())),
        g if g == n => Ok(Some(world.clone())),
        g => Ok(Some(world.subgroup(g).map_err(|e| TrainError::Config(format!("model.sync_bn_group = {g}: {e}")))?)),
    }
}

/// Replaces every parameter gradient by its mean over the ranks (bucketed all-reduce), after the
/// backward: the plain form of [`GradientAverager`], for callers that run their own backward.
pub fn average_gradients(model: &mut SwavModel, world: &dyn Collective) -> Result<(), TrainError> {
    if world.world_size() == 1 {
        return Ok(());
    }
    let mut grads = Vec::new();
    model.visit("", &mut |_, slot| {
        if let Slot::Param(p) = slot {
            let device = p.grad.device();
            grads.push(std::mem::replace(&mut p.grad, Tensor::zeros(&[0], device)));
        }
    });
    all_reduce_mean(&mut grads.iter_mut().collect::<Vec<_>>(), world)?;
    let mut grads = grads.into_iter();
    model.visit("", &mut |_, slot| {
        if let Slot::Param(p) = slot {
            p.grad = grads.next().expect("one gradient per parameter");
        }
    });
    Ok(())
}

/// Averages the gradients over the ranks while the backward runs: the `ready` callback of
/// [`SwavModel::backward_with`] pushes each finished part's gradients into [`BucketedMean`]'s buckets,
/// whose all-reduce starts on a communication thread as each one fills; [`GradientAverager::finish`]
/// waits for the last ones and writes the means back.
pub struct GradientAverager {
    collective: Arc<dyn Collective>,
    mean: BucketedMean,
    /// Parameter names and sizes in push order, this step.
    pushed: Vec<(String, usize)>,
    /// The first error of a push (the callback cannot return it).
    error: Option<swav_tensor::CollectiveError>,
}

impl std::fmt::Debug for GradientAverager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradientAverager {{ {:?} }}", self.mean)
    }
}

impl GradientAverager {
    /// Starts the communication thread on a duplicate of `collective` (every rank calls this at the
    /// same point); buckets of at least `bucket_bytes`.
    pub fn new(collective: &Arc<dyn Collective>, bucket_bytes: usize) -> Result<GradientAverager, TrainError> {
        Ok(GradientAverager {
            collective: collective.clone(),
            mean: BucketedMean::new(collective.as_ref(), bucket_bytes).map_err(err)?,
            pushed: Vec::new(),
            error: None,
        })
    }

    /// Whether this averager works over `collective`.
    pub fn serves(&self, collective: &Arc<dyn Collective>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.collective), Arc::as_ptr(collective))
    }

    /// The `ready` callback: pushes the parameter gradients of `part` (named from `prefix`).
    pub fn ready(&mut self, prefix: &str, part: &mut dyn Visit) {
        part.visit(prefix, &mut |name, slot| {
            if let Slot::Param(p) = slot {
                self.push(name, &p.grad);
            }
        });
    }

    /// Whether the gradients are reduced where they are, after the backward (NCCL on device memory)
    /// instead of bucket by bucket through the host while it runs.
    fn in_device_memory(&self, grad: &Tensor) -> bool {
        grad.device().is_cuda() && self.collective.reduces_device_memory()
    }

    fn push(&mut self, name: &str, grad: &Tensor) {
        if self.error.is_some() || self.in_device_memory(grad) {
            return;
        }
        self.pushed.push((name.to_string(), grad.len()));
        let result =
            if grad.device().is_cuda() { self.mean.push(&grad.to_vec()) } else { self.mean.push(grad.as_slice()) };
        if let Err(e) = result {
            self.error = Some(e);
        }
    }

    /// Pushes the gradients the backward did not hand over (none, for the models of this crate),
    /// waits for every bucket and replaces each gradient by its mean over the ranks. Returns how many
    /// buckets were started before the backward ended.
    pub fn finish(&mut self, model: &mut SwavModel) -> Result<usize, TrainError> {
        let mut on_device = false;
        model.visit("", &mut |_, slot| {
            if let Slot::Param(p) = slot {
                on_device |= self.in_device_memory(&p.grad);
            }
        });
        if on_device {
            self.pushed.clear();
            average_gradients(model, self.collective.as_ref())?;
            return Ok(0);
        }
        let handed: std::collections::HashSet<String> = self.pushed.iter().map(|(n, _)| n.clone()).collect();
        model.visit("", &mut |name, slot| {
            if let Slot::Param(p) = slot {
                if !handed.contains(name) {
                    self.push(name, &p.grad);
                }
            }
        });
        if let Some(e) = self.error.take() {
            return Err(err(e));
        }
        let (means, early) = self.mean.finish().map_err(err)?;
        let mut at = std::collections::HashMap::with_capacity(self.pushed.len());
        let mut offset = 0;
        for (name, len) in self.pushed.drain(..) {
            at.insert(name, (offset, len));
            offset += len;
        }
        let mut result = Ok(());
        model.visit("", &mut |name, slot| {
            if let (Slot::Param(p), Some(&(offset, len))) = (slot, at.get(name)) {
                let values = &means[offset..offset + len];
                if p.grad.device().is_cuda() {
                    match Tensor::from_slice(p.grad.shape(), values).and_then(|t| t.to_device(p.grad.device())) {
                        Ok(t) => p.grad = t,
                        Err(e) => result = Err(TrainError::from(e)),
                    }
                } else {
                    p.grad.as_mut_slice().copy_from_slice(values);
                }
            }
        });
        result.map(|()| early)
    }
}

/// Gives every rank rank 0's parameters and buffers (at the start, and before each forward for the
/// batch-norm buffers when they are not synchronised, as DDP's `broadcast_buffers`).
pub fn broadcast_from_rank0(model: &mut SwavModel, world: &dyn Collective, params: bool) -> Result<(), TrainError> {
    if world.world_size() == 1 {
        return Ok(());
    }
    let mut taken = Vec::new();
    model.visit("", &mut |_, slot| match slot {
        Slot::Param(p) if params => {
            let device = p.value.device();
            taken.push(std::mem::replace(&mut p.value, Tensor::zeros(&[0], device)))
        }
        Slot::Buffer(b) => {
            let device = b.device();
            taken.push(std::mem::replace(b, Tensor::zeros(&[0], device)))
        }
        _ => {}
    });
    let result = broadcast_tensors(&mut taken.iter_mut().collect::<Vec<_>>(), 0, world);
    let mut taken = taken.into_iter();
    model.visit("", &mut |_, slot| match slot {
        Slot::Param(p) if params => p.value = taken.next().expect("taken"),
        Slot::Buffer(b) => *b = taken.next().expect("taken"),
        _ => {}
    });
    Ok(result?)
}

/// Each rank's progress, one small file per rank in `<run>/ranks/`, so that a rank that times out
/// waiting for the others can say which ones fell behind (and since when).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    dir: PathBuf,
    rank: usize,
    world: usize,
}

impl Heartbeat {
    /// The heartbeat of `rank` of `world` in `run_dir` (writes nothing on one process).
    pub fn new(run_dir: &Path, rank: usize, world: usize) -> Result<Heartbeat, TrainError> {
        let dir = run_dir.join("ranks");
        if world > 1 {
            std::fs::create_dir_all(&dir)
                .map_err(|source| TrainError::Io { path: dir.display().to_string(), source })?;
        }
        Ok(Heartbeat { dir, rank, world })
    }

    /// Records that this rank is starting iteration `step`.
    pub fn beat(&self, step: usize) -> Result<(), TrainError> {
        if self.world == 1 {
            return Ok(());
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let text = format!("{step} {} {now}\n", std::process::id());
        swav_core::fs::atomic_write(&self.dir.join(format!("rank-{}", self.rank)), text.as_bytes())?;
        Ok(())
    }

    /// Which ranks are behind this one: their step, process id and seconds since their last beat.
    pub fn describe_others(&self) -> String {
        let mine = self.read(self.rank).map(|(s, _, _)| s);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut behind = Vec::new();
        for r in (0..self.world).filter(|&r| r != self.rank) {
            match self.read(r) {
                Some((step, pid, at)) if Some(step) != mine => behind.push(format!(
                    "rank {r} (pid {pid}) is at step {step}, last seen {} s ago",
                    now.saturating_sub(at)
                )),
                Some(_) => {}
                None => behind.push(format!("rank {r} never reported")),
            }
        }
        match (behind.is_empty(), mine) {
            (true, _) => "every rank reached this step: one of them stopped inside it".into(),
            (false, Some(step)) => format!("this rank is at step {step}; {}", behind.join("; ")),
            (false, None) => behind.join("; "),
        }
    }

    fn read(&self, rank: usize) -> Option<(usize, u64, u64)> {
        let text = std::fs::read_to_string(self.dir.join(format!("rank-{rank}"))).ok()?;
        let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
        Some((it.next()?? as usize, it.next()??, it.next()??))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use swav_tensor::collective::ThreadGroup;

    #[test]
    fn a_rank_with_another_setup_is_named() {
        let ranks = ThreadGroup::new(3, Duration::from_secs(20));
        let errs: Vec<Option<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let manifest: &[u8] = if r.rank() == 2 { b"other" } else { b"same" };
                        check_same_setup(r.as_ref(), &fingerprint("a = 1", manifest)).err().map(|e| e.to_string())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errs {
            let e = e.expect("every rank refuses");
            assert!(e.contains("rank(s) 2 have another"), "{e}");
        }
    }

    #[test]
    fn heartbeats_name_the_rank_behind() {
        let dir = tempfile::tempdir().unwrap();
        let a = Heartbeat::new(dir.path(), 0, 2).unwrap();
        let b = Heartbeat::new(dir.path(), 1, 2).unwrap();
        assert!(a.describe_others().contains("rank 1 never reported"));
        a.beat(7).unwrap();
        b.beat(5).unwrap();
        let d = a.describe_others();
        assert!(d.contains("this rank is at step 7") && d.contains("rank 1") && d.contains("step 5"), "{d}");
    }
}
