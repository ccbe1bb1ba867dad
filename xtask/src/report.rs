//! `cargo xtask report`: plots and summarises a training run (`<run-dir>/report.png`, `report.txt`).

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// The run directory of `cargo xtask train` (holds metrics.jsonl, and eval.json if evaluated).
    #[arg(long)]
    run_dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let files = crate::run_report::write_report(&args.run_dir)
        .with_context(|| format!("reporting on {}", args.run_dir.display()))?;
    print!("{}", files.summary);
    println!("wrote {} and {}", files.png.display(), files.txt.display());
    Ok(())
}
