//! The queue of past embeddings (official `queue`, shape `[crops_for_assign, length, feat_dim]`).
//!
//! Each step pushes the batch's embeddings of every assigned crop at the front (the oldest rows fall
//! off the end). It starts as zeros and is used only once full, i.e. once its last row is non-zero;
//! its scores are recomputed with the current prototypes at every step.

use swav_tensor::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub struct Queue {
    /// One `[length, dim]` tensor per assigned crop, newest rows first.
    pub rows: Vec<Tensor>,
}

impl Queue {
    pub fn new(assigned_crops: usize, length: usize, dim: usize) -> Queue {
        Queue { rows: (0..assigned_crops).map(|_| Tensor::zeros(&[length, dim], Default::default())).collect() }
    }

    pub fn length(&self) -> usize {
        self.rows.first().map_or(0, |t| t.dim(0))
    }

    /// Full: the oldest row of the queue of assigned crop `j` has been written.
    pub fn is_full(&self, j: usize) -> bool {
        let t = &self.rows[j];
        let d = t.dim(1);
        t.as_slice()[(t.dim(0) - 1) * d..].iter().any(|&v| v != 0.0)
    }

    /// Shifts the queue of crop `j` by the batch and writes `embeddings` (`[batch, dim]`) at the front.
    pub fn push(&mut self, j: usize, embeddings: &[f32]) {
        let t = self.rows[j].as_mut_slice();
        let n = embeddings.len().min(t.len());
        t.copy_within(0..t.len() - n, n);
        t[..n].copy_from_slice(&embeddings[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_front_first_and_reports_full_when_the_last_row_is_written() {
        let mut q = Queue::new(1, 6, 2);
        assert!(!q.is_full(0));
        q.push(0, &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&q.rows[0].as_slice()[..4], &[1.0, 1.0, 2.0, 2.0]);
        q.push(0, &[3.0, 3.0, 4.0, 4.0]);
        assert!(!q.is_full(0));
        q.push(0, &[5.0, 5.0, 6.0, 6.0]);
        assert!(q.is_full(0));
        assert_eq!(q.rows[0].as_slice(), &[5.0, 5.0, 6.0, 6.0, 3.0, 3.0, 4.0, 4.0, 1.0, 1.0, 2.0, 2.0]);
        q.push(0, &[7.0, 7.0, 8.0, 8.0]);
        assert_eq!(&q.rows[0].as_slice()[..4], &[7.0, 7.0, 8.0, 8.0]);
        assert_eq!(&q.rows[0].as_slice()[8..], &[3.0, 3.0, 4.0, 4.0]);
    }
}
