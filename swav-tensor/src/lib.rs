//! swav-tensor: the compute engine of swav-rs.
//!
//! A [`Device`], a [`Tensor`] (shape + storage) and explicit ops, each with a forward and a backward
//! function in its own module (`ops/conv.rs`, `ops/batchnorm.rs`, ...), in the style of llm.c: there is
//! no tape; the caller keeps what a backward needs and calls it in reverse order.
//!
//! Conventions that hold for every op:
//! - 4-D activations are NHWC (`[batch, height, width, channels]`), the layout tensor cores want;
//!   2-D activations are `[rows, features]`. Convolution weights are OHWI (`[out, kh, kw, in]`);
//!   checkpoints keep torchvision's OIHW and convert at load/save (see `swav-model`).
//! - Activation gradients are returned as new tensors; parameter gradients are ACCUMULATED (`+=`) into
//!   the gradient tensors the caller passes, so a parameter used twice (one backbone run per crop
//!   resolution) sums its gradients naturally.
//! - Reductions are computed in fixed-size chunks combined in a fixed order, so results do not depend
//!   on thread scheduling: the same inputs give bit-identical outputs run after run.
//!
//! ```
//! use swav_tensor::ops::linear::linear_forward;
//! use swav_tensor::Tensor;
//!
//! let x = Tensor::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?; // [rows, features]
//! let w = Tensor::from_vec(&[1, 3], vec![1.0, 0.0, -1.0])?; // [out, in], as torch.nn.Linear
//! let y = linear_forward(&x, &w, None)?;
//! assert_eq!(y.to_vec(), vec![-2.0, -2.0]);
//! # Ok::<(), swav_tensor::TensorError>(())
//! ```

#![warn(missing_docs)]

pub mod alloc;
pub mod collective;
pub mod cuda;
pub mod device;
pub mod error;
pub mod matmul;
pub mod ops;
pub mod parallel;
pub mod profile;
pub mod tensor;

pub use collective::{Collective, CollectiveError};
pub use device::Device;
pub use error::TensorError;
pub use tensor::{DType, PendingValues, Tensor};

/// Result with [`TensorError`].
pub type Result<T, E = TensorError> = std::result::Result<T, E>;

/// Runs `f` with every CPU kernel capped at instruction set `isa` (on this thread and on the compute
/// threads of a pool of `threads` made for the call): to test or measure a lower level on one machine.
/// The `gemm` crate chooses its own level and is not capped.
pub fn with_isa<R: Send>(isa: swav_core::isa::Isa, threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(move |_| swav_core::isa::set_thread_ceiling(isa))
        .build()
        .map_err(|e| TensorError::Device(format!("cannot start {threads} compute threads: {e}")))?;
    Ok(pool.install(|| swav_core::isa::with_ceiling(isa, f)))
}

/// Runs `f` on one of the CPU compute threads (at once if this is one). Ops started on a compute thread
/// fork from inside the pool: that thread works on its share and only the others are woken. Started
/// from any other thread, every op wakes all the compute threads and puts the caller to sleep until the
/// op ends; on a virtual machine, a core left idle that way takes tens to hundreds of microseconds to
/// wake, at each of the thousands of ops of a training step.
pub fn on_compute_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `scope` runs its body on a thread of the pool.
    rayon::scope(|_| f())
}

/// Sets the number of CPU compute threads (once, before the first op runs).
pub fn set_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| TensorError::Device(format!("cannot set {n} compute threads: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_compute_thread_moves_work_onto_the_pool_once() {
        assert_eq!(rayon::current_thread_index(), None, "the test harness's thread is not a compute thread");
        let (outer, inner) = super::on_compute_thread(|| {
            (rayon::current_thread_index(), super::on_compute_thread(rayon::current_thread_index))
        });
        assert!(outer.is_some(), "the work ran on a compute thread");
        assert_eq!(outer, inner, "from a compute thread it runs in place");
    }
}
