//! The machine's fp32 FMA rate, measured: every core runs independent vector FMAs for a moment, at the
//! vector width the GEMMs use. A virtual machine's `/proc/cpuinfo` gives the nominal clock, but the
//! cores boost above it, so shares of that nominal peak can exceed 100%; shares of the measured rate
//! cannot, bar a change of clock between the two.

use std::time::Instant;

use swav_core::isa::Isa;

/// Independent accumulators per core: more than FMA latency x FMA units (4 x 2 on current x86 cores),
/// so the loop is bound by throughput, not latency.
const CHAINS: usize = 12;

/// Loop iterations per core: about 10 ms at a few GHz.
const ITERS: usize = 2_000_000;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats, what one unaligned 256-bit store writes.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c)))
}

/// FLOPs of one core's loop at `isa` and the loop itself, if this CPU has a vector FMA at that level.
fn fma_loop(isa: Isa) -> Option<(f64, fn() -> f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        let flops = |lanes: usize| (ITERS * CHAINS * lanes * 2) as f64;
        match isa {
            // SAFETY (both arms): the level comes from `gemm_isa`, which checked the CPU's features.
            Isa::Avx512 => return Some((flops(16), || unsafe { fma_avx512(std::hint::black_box(ITERS)) })),
            Isa::Avx2 => return Some((flops(8), || unsafe { fma_avx2(std::hint::black_box(ITERS)) })),
            Isa::Baseline => {}
        }
    }
    let _ = isa;
    None
}

/// GFLOP/s of all cores running the FMA loop at once (the best of three tries), or `None` without a
/// vector FMA.
pub fn measured_gflops() -> Option<f64> {
    let (flops, run) = fma_loop(swav_tensor::matmul::gemm_isa())?;
    let cores = swav_core::sys::cores();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..cores {
                s.spawn(move || std::hint::black_box(run()));
            }
        });
        best = best.max(flops * cores as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    Some(best)
}
