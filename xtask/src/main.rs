//! `cargo xtask`: the swav-rs command line. Each subcommand lives in its own module, parses its
//! arguments, calls the library crates and prints; no training or data logic lives here.

// The doc comments of the argument structs are clap's `--help` text, read in a terminal: `cuda[:N]`,
// `shape [images]` and `<run-dir>` are command-line notation there, not Markdown links or HTML tags.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use clap::{Parser, Subcommand};

mod bench;
mod distributed;
mod doctor;
mod embed;
mod eval;
mod eval_linear;
mod export;
mod finetune;
mod import;
mod pipeline;
mod preprocess;
mod report;
mod run_report;
mod train;
mod verify_reference;

#[derive(Parser)]
#[command(name = "cargo xtask", version, about = "SwAV self-supervised training, from image folders to ONNX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole job: preprocess -> train -> eval -> export (default: the embedded Fashion-MNIST demo).
    Pipeline(pipeline::Args),
    /// Turn an image folder or IDX files into a sharded, checksummed dataset.
    Preprocess(preprocess::Args),
    /// Pretrain with SwAV on a preprocessed dataset (resumes an existing run directory).
    Train(train::Args),
    /// Check the numerics against PyTorch reference cases (safetensors files).
    VerifyReference(verify_reference::Args),
    /// Benchmarks: data loading, training step, Sinkhorn.
    Bench(bench::Args),
    /// Export a model file to ONNX (backbone features, optionally head and prototype scores).
    Export(export::Args),
    /// Turn a PyTorch checkpoint (official SwAV, torchvision) or safetensors state dict into a model file.
    Import(import::Args),
    /// k-NN and linear-probe accuracy of a checkpoint's features (fast proxies; optionally beside a random network).
    Eval(eval::Args),
    /// The paper's linear evaluation (official eval_linear.py): a linear classifier on the frozen backbone.
    EvalLinear(eval_linear::Args),
    /// The paper's semi-supervised evaluation (official eval_semisup.py): fine-tune the whole network on labelled images.
    Finetune(finetune::Args),
    /// Write a dataset's pooled features (and labels) as NumPy .npy files.
    Embed(embed::Args),
    /// Plot and summarise a training run (report.png, report.txt).
    Report(report::Args),
    /// What this machine offers: CPU instruction set; CUDA driver, libraries (versions, files), devices.
    Doctor(doctor::Args),
}

fn main() -> std::process::ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pipeline(args) => pipeline::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Train(args) => train::run(args),
        Command::VerifyReference(args) => verify_reference::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Export(args) => export::run(args),
        Command::Import(args) => import::run(args),
        Command::Eval(args) => eval::run(args),
        Command::EvalLinear(args) => eval_linear::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Report(args) => report::run(args),
        Command::Doctor(args) => doctor::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The shells' convention for "stopped by a signal" (128 + SIGINT): scripts and schedulers
        // can tell an interrupted run from a finished one.
        Err(err) if err.is::<Interrupted>() => std::process::ExitCode::from(130),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A command stopped by Ctrl-C or SIGTERM after saving its state (exit status 130).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}

/// The device of a `--device` flag (`cpu`, `cuda`, `cuda:N`), opened: a missing GPU or library is
/// reported before any work starts. The CUDA runtime, when there is one.
pub fn open_device(
    spec: &str,
) -> anyhow::Result<(swav_tensor::Device, Option<std::sync::Arc<swav_tensor::cuda::runtime::DeviceRuntime>>)> {
    use anyhow::Context;
    let device = swav_tensor::Device::parse(spec).context("--device")?;
    let runtime = match device {
        swav_tensor::Device::Cuda(i) => {
            let rt = swav_tensor::cuda::runtime::runtime(i).with_context(|| format!("--device {spec}"))?;
            tracing::info!("running on {device}: {}", rt.backend().describe());
            Some(rt)
        }
        swav_tensor::Device::Cpu => None,
    };
    Ok((device, runtime))
}
