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

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Data(a) => data::run(a),
        Bench::Sinkhorn(a) => sinkhorn::run(a),
        Bench::Step(a) => step::run(a),
    }
}
