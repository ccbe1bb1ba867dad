//! `cargo xtask bench <what>`: benchmarks that print ratios against a baseline run beside them.

use clap::Subcommand;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(Subcommand)]
enum Bench {}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {}
}
