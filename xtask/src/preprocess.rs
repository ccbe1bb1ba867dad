//! `cargo xtask preprocess`: image folder or IDX files -> sharded dataset (swav-data).

use std::path::PathBuf;

use anyhow::Context;
use swav_data::{Codec, PreprocessOptions};

#[derive(clap::Args)]
pub struct Args {
    /// An image folder (one sub-folder per class = labelled; images directly inside = unlabelled),
    /// an IDX images file (*-images-idx3-ubyte[.gz], labels file next to it), or a folder holding one.
    #[arg(long)]
    input: PathBuf,
    /// The dataset directory to create (manifest.json + shard-NNNNN.bin).
    #[arg(long)]
    output: PathBuf,
    /// Reduce the shorter side of larger images to this many pixels (smaller images are kept as they are).
    #[arg(long, value_name = "SHORT_SIDE")]
    resize: Option<u32>,
    /// raw-zstd (lossless, fastest to load) or jpeg (smaller; JPEG inputs kept byte for byte unless resized).
    #[arg(long, default_value = "raw-zstd")]
    codec: Codec,
    /// Target size of one shard file, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    shard_size: u64,
    /// Decoding threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    workers: Option<usize>,
    /// Replace an existing dataset at --output (only once the new one is complete).
    #[arg(long)]
    overwrite: bool,
    /// Skip images with more pixels than this (guards against decompression bombs).
    #[arg(long, default_value_t = 100_000_000)]
    max_pixels: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let defaults = PreprocessOptions::default();
    let opts = PreprocessOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        resize: args.resize,
        codec: args.codec,
        shard_size_mib: args.shard_size,
        workers: args.workers.unwrap_or(defaults.workers),
        overwrite: args.overwrite,
        max_pixels: args.max_pixels,
        ..defaults
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg} ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let report = swav_data::preprocess(&opts, &|p| {
        if bar.length() != Some(p.total as u64) {
            bar.set_length(p.total as u64);
        }
        bar.set_position(p.done as u64);
        if p.done % 64 == 0 || p.done == p.total {
            bar.set_message(format!("{} written, {} skipped", p.written, p.skipped));
        }
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("preprocessing {} failed", args.input.display()))?;
    for s in report.skipped.iter().take(20) {
        println!("skipped {}: {}", s.path, s.reason);
    }
    if report.skipped.len() > 20 {
        println!(
            "... and {} more (all listed in {}/manifest.json)",
            report.skipped.len() - 20,
            report.output.display()
        );
    }
    println!(
        "wrote {} images ({} classes), skipped {}, {} shard(s), {:.1} MiB, {:.0} images/s -> {}",
        report.written,
        report.classes,
        report.skipped.len(),
        report.shards,
        report.bytes as f64 / (1 << 20) as f64,
        report.images_per_second(),
        report.output.display()
    );
    Ok(())
}
