//! `cargo xtask bench <what>`: benchmarks that print ratios against a baseline run beside them.

use clap::Subcommand;

mod data;
mod sinkhorn;
mod step;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(Subcommand)]
enum Bench {
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

/// The instruction set each kernel whose name starts with one of `crates` ran at in this process.
fn print_kernels(crates: &[&str]) {
    let used = swav_core::isa::used();
    let mine: Vec<String> = used
        .iter()
        .filter(|(name, _)| crates.iter().any(|c| name.starts_with(c)))
        .map(|(name, isa)| format!("{} {isa}", name.split_once("::").map_or(*name, |(_, rest)| rest)))
        .collect();
    println!("kernels (instruction set used): {}", mine.join(", "));
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Data(a) => data::run(a),
        Bench::Sinkhorn(a) => sinkhorn::run(a),
        Bench::Step(a) => step::run(a),
    }
}
