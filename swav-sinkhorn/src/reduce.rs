//! Collectives for the distributed form: the two reductions that cross ranks go through [`Reducer`].
//!
//! The official code all-reduces two things: the total sum of `exp(scores / eps)` and, in every iteration,
//! the per-prototype sums. The total sum only scales the whole matrix, so it cancels exactly at the first
//! per-prototype normalisation and we skip it; in its place we all-reduce the per-prototype *maximum* of the
//! scores, which the max subtraction needs to be the same on every rank (see the crate documentation).
//! So a run makes `1 + iterations` collectives on `prototypes (+1)` floats, as many as the official code.
//!
//! Implementations: [`SingleProcess`] (world size 1, does nothing), [`LocalGroup`] (ranks are threads of
//! one process; for tests and for verifying distributed reference cases) and, on CUDA,
//! [`crate::cuda::NcclReducer`] (device buffers) and [`crate::cuda::HostStaged`] (any host reducer).

use crate::SinkhornError;
use std::sync::{Arc, Barrier, Mutex};

/// All-reduce over the ranks of a distributed run, on host memory.
///
/// Every rank calls the same methods in the same order with buffers of the same length; when a call
/// returns, every rank holds the element-wise result. Errors must be returned on every rank (or none),
/// otherwise the ranks that carry on will wait for the others forever.
pub trait Reducer {
    /// Number of ranks (1 for a single process).
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), SinkhornError>;
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), SinkhornError>;
}

/// One process, one rank: the reductions are identities.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Reducer for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<(), SinkhornError> {
        Ok(())
    }
    fn all_reduce_max(&self, _values: &mut [f32]) -> Result<(), SinkhornError> {
        Ok(())
    }
}

/// Ranks that are threads of one process. `LocalGroup::new(w)` returns the `w` rank handles; give one to
/// each thread. Results are combined in rank order, so they do not depend on which thread arrives first.
#[derive(Debug)]
pub struct LocalGroup;

impl LocalGroup {
    /// Creates `world_size` connected ranks (0, 1, ...). `world_size` 0 gives no ranks.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world_size]),
            barrier: Barrier::new(world_size.max(1)),
            world_size,
        });
        (0..world_size).map(|rank| LocalRank { rank, shared: shared.clone() }).collect()
    }
}

#[derive(Debug)]
struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
    world_size: usize,
}

/// One rank of a [`LocalGroup`].
#[derive(Debug)]
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalRank {
    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, values: &mut [f32], op: fn(f32, f32) -> f32) -> Result<(), SinkhornError> {
        let lock = || self.shared.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        {
            let mut slots = lock();
            slots[self.rank].clear();
            slots[self.rank].extend_from_slice(values);
        }
        self.shared.barrier.wait();
        let result = {
            let slots = lock();
            if let Some(other) = slots.iter().position(|s| s.len() != values.len()) {
                Err(SinkhornError::Reduce(format!(
                    "rank {} reduces {} values but rank {other} reduces {} (do the ranks agree on the number \
                     of prototypes?)",
                    self.rank,
                    values.len(),
                    slots[other].len()
                )))
            } else {
                for (i, v) in values.iter_mut().enumerate() {
                    let mut acc = slots[0][i];
                    for slot in &slots[1..] {
                        acc = op(acc, slot[i]);
                    }
                    *v = acc;
                }
                Ok(())
            }
        };
        // Nobody may overwrite its slot before every rank has read all of them.
        self.shared.barrier.wait();
        result
    }
}

impl Reducer for LocalRank {
    fn world_size(&self) -> usize {
        self.shared.world_size
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), SinkhornError> {
        self.all_reduce(values, |a, b| a + b)
    }
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), SinkhornError> {
        self.all_reduce(values, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_group_sums_and_maxes_in_rank_order() {
        let ranks = LocalGroup::new(3);
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let x = r.rank() as f32;
                        let mut sum = vec![x, 1.0, -x];
                        let mut max = vec![x, -x, 7.0];
                        r.all_reduce_sum(&mut sum).unwrap();
                        r.all_reduce_max(&mut max).unwrap();
                        (sum, max)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, max) in out {
            assert_eq!(sum, vec![3.0, 3.0, -3.0]);
            assert_eq!(max, vec![2.0, 0.0, 7.0]);
        }
    }

    #[test]
    fn local_group_reports_length_mismatch_on_every_rank() {
        let ranks = LocalGroup::new(2);
        let errs: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut v = vec![0.0; 2 + r.rank()];
                        r.all_reduce_sum(&mut v).is_err()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs, vec![true, true]);
    }
}
