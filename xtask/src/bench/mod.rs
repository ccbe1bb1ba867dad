//! `cargo xtask bench <what>`: benchmarks that print ratios against a baseline run beside them.

use clap::Subcommand;

mod conv;
mod data;
mod peak;
mod sinkhorn;
mod step;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Per-layer-shape convolution times of a training step, optionally beside PyTorch.
    Conv(conv::Args),
    /// Multi-crop loader throughput (images/s), optionally beside the Python/torchvision baseline.
    Data(data::Args),
    /// Sinkhorn-Knopp on CPU and CUDA against the official-order baseline and naive kernels.
    Sinkhorn(sinkhorn::Args),
    /// Milliseconds per SwAV training step, optionally beside PyTorch (same model, crops, batch, threads).
    Step(step::Args),
}

/// The machine a benchmark ran on: CPU model, the best instruction set of the kernels, and whether the
/// CPU has bf16 arithmetic (without it a bf16 CPU mode could only lose: every value would be converted).
fn print_cpu() {
    let bf16 = swav_core::isa::bf16_support();
    println!(
        "cpu: {}, {} logical cores; kernels up to {}, gemm crate {}; bf16 hardware: {bf16}{}",
        swav_core::sys::cpu_model(),
        swav_core::sys::cores(),
        swav_core::isa::available(),
        swav_tensor::matmul::gemm_isa(),
        if bf16.any() { "" } else { " (so fp32 only: no bf16 CPU mode)" }
    );
}

/// `len` values uniform in [-1, 1) from a xorshift generator advanced in `seed`: benchmark inputs that
/// cost nothing to make and are the same from run to run.
fn random_values(len: usize, seed: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The machine's peak fp32 rate in GFLOP/s and how it was found: measured by a vector FMA loop on every
/// core where the CPU has one (see `peak.rs`), else from the clock `/proc/cpuinfo` reports (the nominal
/// one in a virtual machine; turbo can exceed it) and two FMA units per core at the kernels' vector width.
fn peak_gflops() -> Option<(f64, &'static str)> {
    if let Some(measured) = peak::measured_gflops() {
        return Some((measured, "measured"));
    }
    nominal_peak_gflops().map(|p| (p, "nominal"))
}

fn nominal_peak_gflops() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    let lanes = match swav_tensor::matmul::gemm_isa() {
        swav_core::isa::Isa::Avx512 => 16.0,
        swav_core::isa::Isa::Avx2 => 8.0,
        swav_core::isa::Isa::Baseline => 4.0,
    };
    Some(swav_core::sys::cores() as f64 * mhz * 1e-3 * lanes * 2.0 * 2.0)
}

/// The machine's fp32 peak, both ways, for the header of a benchmark.
fn print_peak() {
    let show = |p: Option<f64>| p.map_or("?".to_string(), |p| format!("{p:.0} GFLOP/s"));
    println!(
        "fp32 peak: {} measured (FMA loop on every core), {} nominal (clock from /proc/cpuinfo)",
        show(peak::measured_gflops()),
        show(nominal_peak_gflops())
    );
}

/// The instruction set each kernel whose name starts with one of `crates` ran at in this process.
fn print_kernels(crates: &[&str], extra: &[String]) {
    let used = swav_core::isa::used();
    let mine: Vec<String> = extra
        .iter()
        .cloned()
        .chain(
            used.iter()
                .filter(|(name, _)| crates.iter().any(|c| name.starts_with(c)))
                .map(|(name, isa)| format!("{} {isa}", name.split_once("::").map_or(*name, |(_, rest)| rest))),
        )
        .collect();
    println!("kernels (instruction set used): {}", mine.join(", "));
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Conv(a) => conv::run(a),
        Bench::Data(a) => data::run(a),
        Bench::Sinkhorn(a) => sinkhorn::run(a),
        Bench::Step(a) => step::run(a),
    }
}
