//! Collectives across the ranks of a data-parallel run: all-reduce, broadcast, barrier, abort.
//!
//! Every rank calls the same operations in the same order with buffers of the same length; when a
//! call returns, every rank holds the result. Implementations:
//!
//! - [`SingleProcess`]: world size 1, every operation is an identity (the default of a training);
//! - [`ThreadGroup`]: ranks that are threads of one process, for tests and for checking the
//!   distributed algorithm without launching processes; a rank that does not arrive within the
//!   timeout is named in the error of the others;
//! - `MpiCollective` (cargo feature `mpi`): processes started by `mpirun` or `srun`, through Open MPI;
//! - `NcclCollective` (cargo feature `cuda`): another collective for the host buffers, NCCL for
//!   tensors in device memory (one GPU per rank).
//!
//! The buffers are host memory. Tensors on a CUDA device are staged through the host by
//! [`all_reduce_mean`], unless the collective reduces device memory itself
//! ([`Collective::reduces_device_memory`]).

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Tensor;

/// Why a collective failed. After any of these the ranks are out of step: the run must stop.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Some ranks did not join the operation in time (`missing` lists them when the transport knows).
    #[error("{op}: rank {rank} waited {waited_s:.0} s for {}", describe_missing(missing))]
    Timeout {
        /// The operation (`all_reduce`, `broadcast`, ...).
        op: &'static str,
        /// The rank that gave up waiting.
        rank: usize,
        /// Seconds it waited.
        waited_s: f64,
        /// The ranks that never arrived, when known.
        missing: Option<Vec<usize>>,
    },
    /// The ranks disagree on the operation (different lengths or roots): a bug or different configurations.
    #[error("{op}: ranks disagree: {detail}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// What differs, naming the ranks.
        detail: String,
    },
    /// Another rank gave up the run.
    #[error("rank {by} aborted the run: {reason}")]
    Aborted {
        /// The rank that aborted.
        by: usize,
        /// Its reason.
        reason: String,
    },
    /// The transport (MPI, NCCL) reported an error or is not available.
    #[error("{0}")]
    Transport(String),
}

fn describe_missing(missing: &Option<Vec<usize>>) -> String {
    match missing {
        Some(m) => {
            let names: Vec<String> = m.iter().map(|r| r.to_string()).collect();
            format!("rank(s) {} (dead or hung)", names.join(", "))
        }
        None => "the other ranks (one of them is dead or hung)".into(),
    }
}

/// The operations a data-parallel run needs from its transport.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError>;
    /// Element-wise sum over ranks of f64 values (batch-norm moments), in place.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CollectiveError>;
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank receives `root`'s values.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;
    /// Gives up the run on every rank: the others' pending and next operations fail (threads) or the
    /// whole job is terminated (MPI). Call it after an error that leaves this rank out of step.
    fn abort(&self, reason: &str);
    /// The group of `group_size` consecutive ranks this rank belongs to (apex's
    /// `syncbn_process_group_size`); every rank calls it with the same size, which divides the world.
    fn subgroup(&self, group_size: usize) -> Result<Arc<dyn Collective>, CollectiveError>;
    /// A second channel over the same ranks, whose operations are ordered independently of this one's,
    /// so that another thread can run collectives (gradient buckets while the backward goes on) while
    /// this thread runs its own (synchronised batch norm). Every rank calls it at the same point.
    fn duplicate(&self) -> Result<Arc<dyn Collective>, CollectiveError>;

    /// Whether [`Collective::all_reduce_sum_device`] works: the transport reduces tensors in device
    /// memory (NCCL). Otherwise device tensors go through host memory.
    fn reduces_device_memory(&self) -> bool {
        false
    }

    /// Whether this rank is the only one in its process. Ranks that are threads of one process share
    /// its compute pool, so a rank must not wait for the others from inside the pool (one rank's step
    /// could run on top of another's there and never return); the default assumes they may.
    fn alone_in_process(&self) -> bool {
        self.world_size() == 1
    }

    /// Element-wise sum over ranks of f32 CUDA tensors, in place in device memory, queued on their
    /// device's stream. Every rank passes tensors of the same sizes in the same order.
    fn all_reduce_sum_device(&self, tensors: &mut [&mut Tensor]) -> Result<(), CollectiveError> {
        let _ = tensors;
        Err(CollectiveError::Transport("this collective reduces host memory only".into()))
    }

    /// Element-wise sum over ranks of bf16 values (their bits), summed in f32 and rounded back to
    /// nearest even: MPI has no bf16 type, and the sum of a few ranks loses nothing more in f32.
    fn all_reduce_sum_bf16(&self, values: &mut [u16]) -> Result<(), CollectiveError> {
        let mut wide: Vec<f32> = values.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        self.all_reduce_sum(&mut wide)?;
        for (b, v) in values.iter_mut().zip(wide) {
            *b = bf16_bits(v);
        }
        Ok(())
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as bits; every NaN the canonical one.
fn bf16_bits(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    crate::matmul::bf16_bits(v)
}

/// Checks that `group_size` is a valid subgroup size of `world` ranks.
pub fn check_group_size(group_size: usize, world: usize) -> Result<(), CollectiveError> {
    if group_size == 0 || !world.is_multiple_of(group_size) {
        return Err(CollectiveError::Mismatch {
            op: "subgroup",
            detail: format!("a group of {group_size} ranks does not divide the {world} ranks of the run"),
        });
    }
    Ok(())
}

/// One process, one rank: every operation is an identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_max(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        match root {
            0 => Ok(()),
            _ => Err(CollectiveError::Mismatch { op: "broadcast", detail: format!("root {root} in a world of 1") }),
        }
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn abort(&self, _: &str) {}
    fn subgroup(&self, group_size: usize) -> Result<Arc<dyn Collective>, CollectiveError> {
        check_group_size(group_size, 1)?;
        Ok(Arc::new(SingleProcess))
    }
    fn duplicate(&self) -> Result<Arc<dyn Collective>, CollectiveError> {
        Ok(Arc::new(SingleProcess))
    }
}

/// Ranks that are threads of one process. [`ThreadGroup::new`] returns the rank handles; give one to
/// each thread. Results are combined in rank order (in f64), so they do not depend on which thread
/// arrives first.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// Creates `world_size` connected ranks; an operation waits at most `timeout` for the others.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize, timeout: Duration) -> Vec<Arc<ThreadRank>> {
        let shared = Arc::new(Shared::new(world_size, timeout));
        (0..world_size)
            .map(|rank| Arc::new(ThreadRank { rank, shared: shared.clone(), duplicates: 0.into() }))
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
    /// Subgroups by (group size, group index), made by the first rank that asks.
    subgroups: Mutex<std::collections::BTreeMap<(usize, usize), Arc<Shared>>>,
    /// Duplicates in the order the ranks asked for them (each rank's k-th call gets the k-th).
    duplicates: Mutex<Vec<Arc<Shared>>>,
}

#[derive(Debug)]
struct State {
    /// Each rank's contribution to the operation in progress (None: not arrived).
    slots: Vec<Option<Contribution>>,
    /// The result of the last completed operation and the ranks that still have to read it.
    result: Result<Vec<f64>, String>,
    readers_left: usize,
    /// Completed operations (a rank waits for this to change).
    generation: u64,
    aborted: Option<(usize, String)>,
}

#[derive(Debug, Clone)]
struct Contribution {
    op: &'static str,
    root: usize,
    values: Vec<f64>,
}

impl Shared {
    fn new(world: usize, timeout: Duration) -> Shared {
        Shared {
            world,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; world],
                result: Ok(Vec::new()),
                readers_left: 0,
                generation: 0,
                aborted: None,
            }),
            changed: Condvar::new(),
            subgroups: Mutex::new(Default::default()),
            duplicates: Mutex::new(Vec::new()),
        }
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    /// How many duplicates this rank has made.
    duplicates: std::sync::atomic::AtomicUsize,
}

impl ThreadRank {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition variable until `done` holds, the run is aborted, or the timeout passes.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        op: &'static str,
        start: Instant,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        loop {
            if let Some((by, reason)) = &state.aborted {
                return Err(CollectiveError::Aborted { by: *by, reason: reason.clone() });
            }
            if done(&state) {
                return Ok(state);
            }
            let left = self.shared.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let missing = (0..self.shared.world).filter(|&r| state.slots[r].is_none()).collect();
                return Err(CollectiveError::Timeout {
                    op,
                    rank: self.rank,
                    waited_s: start.elapsed().as_secs_f64(),
                    missing: Some(missing),
                });
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Contributes `values`; returns the combination of every rank's contribution.
    fn exchange(
        &self,
        op: &'static str,
        root: usize,
        values: Vec<f64>,
        combine: fn(&[&Contribution]) -> Result<Vec<f64>, String>,
    ) -> Result<Vec<f64>, CollectiveError> {
        let start = Instant::now();
        // The previous result must be read by every rank before the slots are reused.
        let state = self.wait_until(self.lock(), op, start, |s| s.readers_left == 0)?;
        let mut state = state;
        state.slots[self.rank] = Some(Contribution { op, root, values });
        let generation = state.generation;
        if state.slots.iter().all(Option::is_some) {
            let all: Vec<Contribution> = state.slots.iter_mut().map(|s| s.take().expect("arrived")).collect();
            let refs: Vec<&Contribution> = all.iter().collect();
            state.result = agree(&refs).and_then(|()| combine(&refs));
            state.readers_left = self.shared.world;
            state.generation += 1;
            self.shared.changed.notify_all();
        }
        let mut state = self.wait_until(state, op, start, |s| s.generation != generation)?;
        let result = state.result.clone();
        state.readers_left -= 1;
        if state.readers_left == 0 {
            self.shared.changed.notify_all();
        }
        result.map_err(|detail| CollectiveError::Mismatch { op, detail })
    }
}

/// Every rank must run the same operation on the same number of values with the same root.
fn agree(all: &[&Contribution]) -> Result<(), String> {
    let first = all[0];
    for (r, c) in all.iter().enumerate().skip(1) {
        if c.op != first.op || c.values.len() != first.values.len() || c.root != first.root {
            return Err(format!(
                "rank 0 runs {} on {} values (root {}), rank {r} runs {} on {} values (root {})",
                first.op,
                first.values.len(),
                first.root,
                c.op,
                c.values.len(),
                c.root
            ));
        }
    }
    Ok(())
}

fn combine_sum(all: &[&Contribution]) -> Result<Vec<f64>, String> {
    let mut out = all[0].values.clone();
    for c in &all[1..] {
        out.iter_mut().zip(&c.values).for_each(|(o, v)| *o += v);
    }
    Ok(out)
}

fn combine_max(all: &[&Contribution]) -> Result<Vec<f64>, String> {
    let mut out = all[0].values.clone();
    for c in &all[1..] {
        out.iter_mut().zip(&c.values).for_each(|(o, v)| *o = o.max(*v));
    }
    Ok(out)
}

fn combine_root(all: &[&Contribution]) -> Result<Vec<f64>, String> {
    let root = all[0].root;
    all.get(root).map(|c| c.values.clone()).ok_or_else(|| format!("root {root} in a world of {}", all.len()))
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let out = self.exchange("all_reduce_sum", 0, values.iter().map(|&v| v as f64).collect(), combine_sum)?;
        values.iter_mut().zip(out).for_each(|(v, o)| *v = o as f32);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CollectiveError> {
        let out = self.exchange("all_reduce_sum_f64", 0, values.to_vec(), combine_sum)?;
        values.copy_from_slice(&out);
        Ok(())
    }
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let out = self.exchange("all_reduce_max", 0, values.iter().map(|&v| v as f64).collect(), combine_max)?;
        values.iter_mut().zip(out).for_each(|(v, o)| *v = o as f32);
        Ok(())
    }
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let out = self.exchange("broadcast", root, values.iter().map(|&v| v as f64).collect(), combine_root)?;
        values.iter_mut().zip(out).for_each(|(v, o)| *v = o as f32);
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.exchange("barrier", 0, Vec::new(), combine_sum).map(drop)
    }
    fn abort(&self, reason: &str) {
        let mut state = self.lock();
        state.aborted.get_or_insert((self.rank, reason.to_string()));
        self.shared.changed.notify_all();
    }
    fn subgroup(&self, group_size: usize) -> Result<Arc<dyn Collective>, CollectiveError> {
        check_group_size(group_size, self.shared.world)?;
        let key = (group_size, self.rank / group_size);
        let shared = {
            let mut groups = self.shared.subgroups.lock().unwrap_or_else(|p| p.into_inner());
            groups.entry(key).or_insert_with(|| Arc::new(Shared::new(group_size, self.shared.timeout))).clone()
        };
        Ok(Arc::new(ThreadRank { rank: self.rank % group_size, shared, duplicates: 0.into() }))
    }
    fn duplicate(&self) -> Result<Arc<dyn Collective>, CollectiveError> {
        let k = self.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = {
            let mut dups = self.shared.duplicates.lock().unwrap_or_else(|p| p.into_inner());
            while dups.len() <= k {
                dups.push(Arc::new(Shared::new(self.shared.world, self.shared.timeout)));
            }
            dups[k].clone()
        };
        Ok(Arc::new(ThreadRank { rank: self.rank, shared, duplicates: 0.into() }))
    }
}

fn thread_gone() -> CollectiveError {
    CollectiveError::Transport("the all-reduce thread has stopped".into())
}

/// Gradient averaging that overlaps the backward pass (DDP's reducer): the caller pushes gradients
/// as they become final; whenever [`BUCKET_BYTES`] (or the size given) have gathered, the bucket is
/// sent to a communication thread that all-reduces it on a [duplicate](Collective::duplicate) of the
/// collective while the caller goes on computing. [`BucketedMean::finish`] sends the last bucket and
/// returns every pushed value averaged over the ranks, in push order. The buckets are cut at the same
/// places on every rank because every rank pushes the same sizes in the same order.
pub struct BucketedMean {
    world: usize,
    cap: usize,
    filling: Vec<f32>,
    to_thread: Option<std::sync::mpsc::Sender<Vec<f32>>>,
    from_thread: std::sync::mpsc::Receiver<Result<Vec<f32>, CollectiveError>>,
    in_flight: usize,
    started_early: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BucketedMean {
    /// Stops the thread and waits for it, so that its channel is released before the caller goes on
    /// (an MPI communicator must be freed before MPI is finalised, and not beside another MPI call).
    fn drop(&mut self) {
        self.to_thread = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for BucketedMean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BucketedMean {{ world: {}, bucket values: {} }}", self.world, self.cap)
    }
}

impl BucketedMean {
    /// Duplicates `collective` (a collective call: every rank makes it at the same point) and starts
    /// the communication thread. Buckets hold at least `bucket_bytes` of f32 values.
    pub fn new(collective: &dyn Collective, bucket_bytes: usize) -> Result<BucketedMean, CollectiveError> {
        let channel = collective.duplicate()?;
        let (to_thread, jobs) = std::sync::mpsc::channel::<Vec<f32>>();
        let (results, from_thread) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("all-reduce rank {}", collective.rank()))
            .spawn(move || {
                for mut bucket in jobs {
                    let result = channel.all_reduce_sum(&mut bucket).map(|()| bucket);
                    let failed = result.is_err();
                    if results.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| CollectiveError::Transport(format!("cannot start the all-reduce thread: {e}")))?;
        Ok(BucketedMean {
            world: collective.world_size(),
            cap: (bucket_bytes / 4).max(1),
            filling: Vec::new(),
            to_thread: Some(to_thread),
            from_thread,
            in_flight: 0,
            started_early: 0,
            thread: Some(thread),
        })
    }

    /// Adds final gradient values; sends the bucket when it is full.
    pub fn push(&mut self, values: &[f32]) -> Result<(), CollectiveError> {
        self.filling.extend_from_slice(values);
        if self.filling.len() >= self.cap {
            self.send()?;
            self.started_early += 1;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), CollectiveError> {
        let bucket = std::mem::take(&mut self.filling);
        self.to_thread.as_ref().ok_or_else(thread_gone)?.send(bucket).map_err(|_| thread_gone())?;
        self.in_flight += 1;
        Ok(())
    }

    /// Sends what is left, waits for every bucket and returns the means, in push order. Returns also
    /// how many buckets were sent before this call (started while the caller was still computing).
    pub fn finish(&mut self) -> Result<(Vec<f32>, usize), CollectiveError> {
        if !self.filling.is_empty() {
            self.send()?;
        }
        let mut out = Vec::new();
        let scale = 1.0 / self.world as f32;
        while self.in_flight > 0 {
            self.in_flight -= 1;
            let bucket = self.from_thread.recv().unwrap_or_else(|_| Err(thread_gone())).inspect_err(|_| {
                // Out of step with the other ranks: nothing more may be sent.
                self.to_thread = None;
            })?;
            out.extend(bucket.into_iter().map(|v| v * scale));
        }
        Ok((out, std::mem::take(&mut self.started_early)))
    }
}

/// Bytes of gradients all-reduced in one call (PyTorch DDP's default bucket is 25 MiB): large enough
/// that each call's latency is amortised, small enough to bound the staging memory.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Replaces every tensor by its mean over ranks, in buckets of at most [`BUCKET_BYTES`] (tensors are
/// packed in the order given, which must be the same on every rank). Tensors on a CUDA device are
/// staged through host memory. Returns the number of all-reduce calls made.
pub fn all_reduce_mean(tensors: &mut [&mut Tensor], collective: &dyn Collective) -> crate::Result<usize> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(0);
    }
    let scale = 1.0 / world as f32;
    if collective.reduces_device_memory() && tensors.iter().all(|t| t.device().is_cuda()) {
        collective.all_reduce_sum_device(tensors).map_err(|e| crate::TensorError::Collective(e.to_string()))?;
        tensors.iter_mut().for_each(|t| t.scale(scale));
        return Ok(1);
    }
    let cap = BUCKET_BYTES / 4;
    let mut calls = 0;
    let mut start = 0;
    while start < tensors.len() {
        // One bucket: consecutive tensors up to the cap (a larger tensor goes alone).
        let mut end = start;
        let mut len = 0;
        while end < tensors.len() && (end == start || len + tensors[end].len() <= cap) {
            len += tensors[end].len();
            end += 1;
        }
        let mut flat = Vec::with_capacity(len);
        for t in &tensors[start..end] {
            if t.device().is_cuda() {
                flat.extend_from_slice(&t.to_vec());
            } else {
                flat.extend_from_slice(t.as_slice());
            }
        }
        collective.all_reduce_sum(&mut flat).map_err(|e| crate::TensorError::Collective(e.to_string()))?;
        calls += 1;
        let mut at = 0;
        for t in tensors[start..end].iter_mut() {
            let n = t.len();
            let part = &mut flat[at..at + n];
            part.iter_mut().for_each(|v| *v *= scale);
            if t.device().is_cuda() {
                **t = Tensor::from_slice(t.shape(), part)?.to_device(t.device())?;
            } else {
                t.as_mut_slice().copy_from_slice(part);
            }
            at += n;
        }
        start = end;
    }
    Ok(calls)
}

/// Replaces every tensor by `root`'s values (host-staged on a CUDA device).
pub fn broadcast_tensors(tensors: &mut [&mut Tensor], root: usize, collective: &dyn Collective) -> crate::Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    for t in tensors.iter_mut() {
        let mut values = t.to_vec();
        collective.broadcast(&mut values, root).map_err(|e| crate::TensorError::Collective(e.to_string()))?;
        if t.device().is_cuda() {
            **t = Tensor::from_slice(t.shape(), &values)?.to_device(t.device())?;
        } else {
            t.as_mut_slice().copy_from_slice(&values);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<R: Send>(world: usize, f: impl Fn(Arc<ThreadRank>) -> R + Sync) -> Vec<R> {
        let ranks = ThreadGroup::new(world, Duration::from_secs(20));
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.into_iter().map(|r| s.spawn(|| f(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn thread_group_reduces_in_rank_order_and_broadcasts() {
        let out = run(3, |r| {
            let x = r.rank() as f32;
            let mut sum = vec![x, 1.0, -x];
            let mut max = vec![x, -x, 7.0];
            let mut b = vec![x + 10.0; 2];
            let mut d = vec![0.1f64 * x as f64];
            r.all_reduce_sum(&mut sum).unwrap();
            r.all_reduce_max(&mut max).unwrap();
            r.broadcast(&mut b, 2).unwrap();
            r.all_reduce_sum_f64(&mut d).unwrap();
            r.barrier().unwrap();
            (sum, max, b, d)
        });
        for (sum, max, b, d) in out {
            assert_eq!(sum, vec![3.0, 3.0, -3.0]);
            assert_eq!(max, vec![2.0, 0.0, 7.0]);
            assert_eq!(b, vec![12.0, 12.0]);
            assert!((d[0] - 0.3).abs() < 1e-15);
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_by_the_others() {
        let ranks = ThreadGroup::new(3, Duration::from_millis(300));
        let errs: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks[..2]
                .iter()
                .map(|r| s.spawn(move || r.all_reduce_sum(&mut [1.0]).unwrap_err().to_string()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errs {
            assert!(e.contains("rank(s) 2"), "{e}");
        }
    }

    #[test]
    fn disagreeing_lengths_fail_on_every_rank_and_abort_reaches_the_others() {
        let out = run(2, |r| {
            let mut v = vec![0.0; 2 + r.rank()];
            let mismatch = r.all_reduce_sum(&mut v).is_err();
            if r.rank() == 1 {
                r.abort("test");
                return (mismatch, true);
            }
            let aborted = matches!(r.barrier(), Err(CollectiveError::Aborted { by: 1, .. }));
            (mismatch, aborted)
        });
        assert_eq!(out, vec![(true, true), (true, true)]);
    }

    #[test]
    fn subgroups_reduce_within_their_ranks() {
        let out = run(4, |r| {
            let g = r.subgroup(2).unwrap();
            let mut v = vec![r.rank() as f32];
            g.all_reduce_sum(&mut v).unwrap();
            (g.rank(), v[0])
        });
        assert_eq!(out, vec![(0, 1.0), (1, 1.0), (0, 5.0), (1, 5.0)]);
    }

    #[test]
    fn bucketed_mean_matches_the_plain_mean() {
        let out = run(2, |r| {
            let x = r.rank() as f32 + 1.0;
            let mut a = Tensor::from_vec(&[3], vec![x, 2.0 * x, -x]).unwrap();
            let mut b = Tensor::from_vec(&[1], vec![x * x]).unwrap();
            all_reduce_mean(&mut [&mut a, &mut b], r.as_ref()).unwrap();
            (a.to_vec(), b.to_vec())
        });
        for (a, b) in out {
            assert_eq!(a, vec![1.5, 3.0, -1.5]);
            assert_eq!(b, vec![2.5]);
        }
    }

    #[test]
    fn overlapped_buckets_give_the_plain_mean_while_the_channel_is_in_use() {
        let out = run(2, |r| {
            let x = r.rank() as f32 + 1.0;
            let mut sync = BucketedMean::new(r.as_ref(), 8).unwrap();
            let parts: Vec<Vec<f32>> = (0..5).map(|i| (0..3 + i).map(|j| x * (i * 10 + j) as f32).collect()).collect();
            for (i, p) in parts.iter().enumerate() {
                sync.push(p).unwrap();
                // The original channel stays usable beside the buckets in flight.
                let mut v = [x * i as f32];
                r.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v[0], 3.0 * i as f32);
            }
            let (mean, early) = sync.finish().unwrap();
            let mut plain: Vec<Tensor> =
                parts.iter().map(|p| Tensor::from_vec(&[p.len()], p.clone()).unwrap()).collect();
            all_reduce_mean(&mut plain.iter_mut().collect::<Vec<_>>(), r.as_ref()).unwrap();
            let plain: Vec<f32> = plain.iter().flat_map(|t| t.to_vec()).collect();
            // A second step reuses the thread.
            sync.push(&[x]).unwrap();
            let (second, _) = sync.finish().unwrap();
            (mean, plain, early, second)
        });
        for (mean, plain, early, second) in out {
            assert_eq!(mean, plain);
            assert_eq!(early, 5, "every part filled a 2-value bucket and was sent at once");
            assert_eq!(second, vec![1.5]);
        }
    }

    #[test]
    fn duplicates_are_independent_channels() {
        let out = run(2, |r| {
            let d = r.duplicate().unwrap();
            let mut a = [r.rank() as f32];
            let mut b = [10.0 * r.rank() as f32];
            // One collective on each channel at the same time, from two threads of each rank.
            std::thread::scope(|s| {
                s.spawn(|| d.all_reduce_sum(&mut b).unwrap());
                r.all_reduce_sum(&mut a).unwrap();
            });
            (a[0], b[0])
        });
        assert_eq!(out, vec![(1.0, 10.0), (1.0, 10.0)]);
    }

    #[test]
    fn bf16_sums_round_to_nearest() {
        let out = run(2, |r| {
            let mut v = vec![bf16_bits(1.0), bf16_bits(if r.rank() == 0 { 2.0 } else { -0.5 })];
            r.all_reduce_sum_bf16(&mut v).unwrap();
            v
        });
        assert_eq!(out[0], vec![bf16_bits(2.0), bf16_bits(1.5)]);
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), bf16_bits(1.0), "ties go to even");
    }
}
