//! The CUDA side of the engine, as data: kernel sources (one `.cu` file beside each op's CPU code, in
//! `ops/`), their launch plans ([`plan`]), and the NVRTC compile check ([`nvrtc`]). The runtime that
//! allocates device memory and runs plans on a stream is separate; without a GPU, tests run the same
//! plans on the kernel emulator (module `emulate`, behind the `emulate` feature that the tests enable).
//!
//! Adding a kernel: write it in the op's `.cu` file (`extern "C"`, parameters of the types the emulator
//! knows), add its launch to the op's plan function in `<op>_cuda.rs`, and the existing tests pick it
//! up: the signature check fails until a plan launches it, the NVRTC check compiles it, and a parity
//! test against the CPU op belongs in `tests/cuda_kernels.rs`.
//!
//! Every kernel is `extern "C"`, with one variant per activation storage type (`_f32`, `_bf16`) where
//! activations are involved; arithmetic and accumulation are fp32, reductions deterministic (no float
//! atomics, fixed combination order), and launch shapes depend on the problem shape only, so results are
//! bit-identical run after run.

#![warn(missing_docs)]

pub mod calls;
#[cfg(feature = "cuda")]
pub mod doctor;
#[cfg(feature = "cuda")]
pub mod driver;
#[cfg(feature = "emulate")]
pub mod emulate;
#[cfg(feature = "emulate")]
pub mod emulated;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod pinned;
pub mod plan;
pub mod runtime;

use crate::ops::{batchnorm_cuda, elementwise_cuda, normalize_cuda, pool_cuda};

/// Helpers prepended to every kernel file (`common.cuh`).
pub const COMMON: &str = include_str!("common.cuh");

/// One kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// File name, for messages.
    pub name: &'static str,
    /// The file's text (without the common helpers).
    pub code: &'static str,
}

impl Source {
    /// The text to compile: the common helpers, then the file (with a `#line` so that messages point
    /// into the file).
    pub fn text(&self) -> String {
        format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.code)
    }
}

/// Every kernel file of swav-tensor.
pub fn sources() -> Vec<Source> {
    vec![batchnorm_cuda::SOURCE, pool_cuda::SOURCE, normalize_cuda::SOURCE, elementwise_cuda::SOURCE]
}
