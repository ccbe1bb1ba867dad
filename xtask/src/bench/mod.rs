//! `cargo xtask bench <what>`: benchmarks that print ratios against a baseline run beside them.

use clap::Subcommand;

mod data;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Multi-crop loader throughput (images/s), optionally beside the Python/torchvision baseline.
    Data(data::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Data(a) => data::run(a),
    }
}
