//! `cargo xtask embed`: pooled backbone features of every image of a dataset as a NumPy .npy file
//! (float32 `[n, F]`), optionally the labels too (int64 `[n]`).

use std::path::PathBuf;

use anyhow::Context;
use swav_data::Dataset;
use swav_eval::embed::embed;
use swav_eval::features::ExtractOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by training (`<run-dir>/checkpoints/step-N.safetensors`), an imported one,
    /// or directly a PyTorch checkpoint / safetensors state dict (network detected from its shapes).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset directory written by `cargo xtask preprocess`.
    #[arg(long)]
    data: PathBuf,
    /// The features file to write (.npy, float32, shape [images, feature_dim], row i = image i).
    #[arg(long)]
    output: PathBuf,
    /// Also write the labels (.npy, int64, shape [images]); the dataset must be labelled.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Evaluation crop size (default: the checkpoint's `input_size`; see the swav-train eval docs).
    #[arg(long)]
    input_size: Option<usize>,
    /// Loader threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Where the network runs: cpu, or cuda[:N] (float32).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut outputs = vec![(args.output.as_path(), "features file (--output)")];
    outputs.extend(args.labels.as_deref().map(|l| (l, "labels file (--labels)")));
    swav_core::fs::check_outputs(&[(&args.checkpoint, "model file"), (&args.data, "dataset")], &outputs)?;
    let data = Dataset::open(&args.data).context("opening the data")?;
    let opts = ExtractOptions {
        batch_size: args.batch,
        workers: args.workers.unwrap_or(ExtractOptions::default().workers),
        device: crate::open_device(&args.device)?.0,
    };
    let bar = crate::eval::progress_bar();
    bar.set_message("features");
    let summary =
        embed(&args.checkpoint, &data, &args.output, args.labels.as_deref(), args.input_size, &opts, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
    bar.finish_and_clear();
    let summary =
        summary.with_context(|| format!("embedding {} with {}", args.data.display(), args.checkpoint.display()))?;
    println!(
        "wrote {} ({} x {} float32, input {}x{} resize {}){}",
        args.output.display(),
        summary.images,
        summary.feature_dim,
        summary.crop,
        summary.crop,
        summary.resize,
        args.labels.as_ref().map_or(String::new(), |p| format!(
            " and {} ({} int64 labels)",
            p.display(),
            summary.images
        ))
    );
    Ok(())
}
