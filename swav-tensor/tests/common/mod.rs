//! Helpers of the kernel tests: the emulator (built once per test binary), plans run under both
//! schedules with a bit-for-bit comparison, random inputs and error measures.
#![allow(dead_code)]

use std::sync::OnceLock;

use swav_tensor::cuda::emulate::{self, Buffer, Emulator, Memory};
use swav_tensor::cuda::plan::{BufId, Plan};
use swav_tensor::cuda::Source;

/// The emulation of `sources`, or None (the test prints SKIPPED and passes) without a C++ compiler.
pub fn emulator(cache: &'static OnceLock<Option<Emulator>>, sources: fn() -> Vec<Source>) -> Option<&'static Emulator> {
    cache.get_or_init(|| emulate::emulator(&sources())).as_ref()
}

/// Runs `plan` under both schedules and checks that they agree bit for bit (see
/// `emulate::run_both_schedules`); returns the first run's memory.
pub fn run(emu: &Emulator, plan: &Plan, inputs: &[(BufId, Buffer)]) -> Memory {
    emulate::run_both_schedules(emu, plan, inputs).unwrap_or_else(|e| panic!("{e}"))
}

/// SplitMix64: deterministic inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// `n` values `offset + scale * U[-1, 1)`.
    pub fn vec(&mut self, n: usize, offset: f32, scale: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

/// `||got - want|| / ||want||` (in f64; 0 when both are zero).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Asserts `rel_err(got, want) < tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.3e} >= {tol:.0e}");
}

/// Asserts `||got - want|| / max(||want||, ||scale||) < tol`: for results that cancel, measured against
/// the size of the terms that cancel.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f32], scale: &[f32], tol: f64) {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = got.iter().zip(want).map(|(&g, &w)| g - w).collect();
    let e = norm(&diff) / norm(want).max(norm(scale));
    assert!(e < tol, "{what}: relative error {e:.3e} >= {tol:.0e}");
}

/// Values rounded to bf16 (what a bf16 buffer holds).
pub fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| emulate::round_bf16(x)).collect()
}

/// The ordinal the emulated device is registered under in tests (far from real devices' ordinals).
pub const EMULATED: usize = 99;

/// The emulated CUDA device registered as `cuda:99` of this test process (once), or None without a C++
/// compiler (the test prints SKIPPED and passes; `SWAV_REQUIRE_EMULATOR=1` makes that a failure).
pub fn emulated_device() -> Option<swav_tensor::Device> {
    static DEVICE: OnceLock<Option<swav_tensor::Device>> = OnceLock::new();
    *DEVICE.get_or_init(|| {
        // The compiler check: a trivial emulator build.
        let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
        swav_cuda_emu::Emulator::new_or_skip(&[probe])?;
        let backend = swav_tensor::cuda::emulated::EmulatedBackend::new();
        swav_tensor::cuda::runtime::register(EMULATED, Box::new(backend)).expect("registered once");
        Some(swav_tensor::Device::Cuda(EMULATED))
    })
}

/// The real CUDA device 0 when this machine has one (and the libraries load), else None after printing
/// why; with `SWAV_REQUIRE_CUDA=1` (the GPU check script) its absence is a failure.
pub fn real_device() -> Option<swav_tensor::Device> {
    match swav_tensor::cuda::runtime::runtime(0) {
        Ok(_) => Some(swav_tensor::Device::Cuda(0)),
        Err(e) => {
            if std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SWAV_REQUIRE_CUDA=1 but there is no usable CUDA device: {e}");
            }
            eprintln!("SKIPPED on a GPU: {e}");
            None
        }
    }
}
