//! The queue of past embeddings (official `queue`, shape `[crops_for_assign, length, feat_dim]`).
//!
//! Each step pushes the batch's embeddings of every assigned crop at the front (the oldest rows fall
//! off the end). It starts as zeros and is used only once full, i.e. once its last row is non-zero;
//! its scores are recomputed with the current prototypes at every step.

use swav_tensor::{Device, Tensor};

use crate::TrainError;

/// The queue: one `[length, dim]` tensor per assigned crop, newest rows first.
#[derive(Clone, Debug)]
pub struct Queue {
    /// One `[length, dim]` tensor per assigned crop, newest rows first.
    pub rows: Vec<Tensor>,
    /// Per assigned crop: seen full. A full queue stays full (the rows pushed are L2-normalised
    /// embeddings, never all zero), so once seen it is not read again: on a CUDA device that read
    /// would make every step wait for the host.
    seen_full: Vec<std::cell::Cell<bool>>,
}

impl PartialEq for Queue {
    fn eq(&self, other: &Queue) -> bool {
        self.rows == other.rows
    }
}

impl Queue {
    /// An empty (all-zero) queue of `length` rows of `dim` per assigned crop, on `device`.
    pub fn new(assigned_crops: usize, length: usize, dim: usize, device: Device) -> Queue {
        Queue::from_rows((0..assigned_crops).map(|_| Tensor::zeros(&[length, dim], device)).collect())
    }

    /// A queue holding `rows` (one `[length, dim]` tensor per assigned crop, newest rows first).
    pub fn from_rows(rows: Vec<Tensor>) -> Queue {
        let seen_full = rows.iter().map(|_| std::cell::Cell::new(false)).collect();
        Queue { rows, seen_full }
    }

    /// Rows per assigned crop.
    pub fn length(&self) -> usize {
        self.rows.first().map_or(0, |t| t.dim(0))
    }

    /// Full: the oldest row of the queue of assigned crop `j` has been written.
    pub fn is_full(&self, j: usize) -> Result<bool, TrainError> {
        if self.seen_full[j].get() {
            return Ok(true);
        }
        let t = &self.rows[j];
        let last = t.narrow(t.dim(0) - 1, 1)?;
        let full = last.to_vec().iter().any(|&v| v != 0.0);
        self.seen_full[j].set(full);
        Ok(full)
    }

    /// Shifts the queue of crop `j` by the batch and writes `embeddings` (`[batch, dim]`, same device)
    /// at the front.
    pub fn push(&mut self, j: usize, embeddings: &Tensor) -> Result<(), TrainError> {
        let t = &mut self.rows[j];
        let n = embeddings.dim(0).min(t.dim(0));
        if t.device() == Device::Cpu {
            let (len, dim) = (t.len(), t.dim(1));
            let t = t.as_mut_slice();
            t.copy_within(0..len - n * dim, n * dim);
            t[..n * dim].copy_from_slice(&embeddings.as_slice()[..n * dim]);
        } else {
            let kept = t.narrow(0, t.dim(0) - n)?;
            *t = Tensor::cat(&[&embeddings.narrow(0, n)?, &kept])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_front_first_and_reports_full_when_the_last_row_is_written() {
        let rows = |v: &[f32]| Tensor::from_slice(&[2, 2], v).unwrap();
        let mut q = Queue::new(1, 6, 2, Device::Cpu);
        assert!(!q.is_full(0).unwrap());
        q.push(0, &rows(&[1.0, 1.0, 2.0, 2.0])).unwrap();
        assert_eq!(&q.rows[0].as_slice()[..4], &[1.0, 1.0, 2.0, 2.0]);
        q.push(0, &rows(&[3.0, 3.0, 4.0, 4.0])).unwrap();
        assert!(!q.is_full(0).unwrap());
        q.push(0, &rows(&[5.0, 5.0, 6.0, 6.0])).unwrap();
        assert!(q.is_full(0).unwrap());
        assert_eq!(q.rows[0].as_slice(), &[5.0, 5.0, 6.0, 6.0, 3.0, 3.0, 4.0, 4.0, 1.0, 1.0, 2.0, 2.0]);
        q.push(0, &rows(&[7.0, 7.0, 8.0, 8.0])).unwrap();
        assert_eq!(&q.rows[0].as_slice()[..4], &[7.0, 7.0, 8.0, 8.0]);
        assert_eq!(&q.rows[0].as_slice()[8..], &[3.0, 3.0, 4.0, 4.0]);
    }
}
