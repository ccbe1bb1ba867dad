//! `cargo xtask eval`: k-NN and linear-probe accuracy of a checkpoint's frozen features (swav-train's
//! `eval`), optionally beside a randomly initialised network; prints a table, writes eval.json.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::Context;
use swav_data::Dataset;
use swav_eval::features::ExtractOptions;
use swav_eval::frozen::{evaluate, Baseline, EvalOptions, EvalReport, Progress, Scores};
use swav_eval::knn::KnnConfig;
use swav_eval::probe::ProbeConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BaselineKind {
    /// A freshly initialised network of the checkpoint's configuration.
    Random,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by training (`<run-dir>/checkpoints/step-N.safetensors`), an imported one,
    /// or directly a PyTorch checkpoint / safetensors state dict (network detected from its shapes).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Labelled dataset the k-NN memory and the linear probe are built from (`cargo xtask preprocess`).
    #[arg(long)]
    train_data: PathBuf,
    /// Labelled dataset the accuracies are measured on (same classes).
    #[arg(long)]
    test_data: PathBuf,
    /// Also evaluate a baseline network and print it beside the checkpoint.
    #[arg(long, value_enum)]
    baseline: Option<BaselineKind>,
    /// Initialisation seed of the random baseline.
    #[arg(long, default_value_t = 0)]
    baseline_seed: u64,
    /// Where to write the report (JSON, written atomically).
    #[arg(long, default_value = "eval.json")]
    output: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Neighbours of the k-NN classifier.
    #[arg(long, default_value_t = 200)]
    k: usize,
    /// Temperature of the k-NN vote weights exp(cosine / T).
    #[arg(long, default_value_t = 0.1)]
    temperature: f32,
    /// Epochs of the linear probe.
    #[arg(long, default_value_t = ProbeConfig::default().epochs)]
    probe_epochs: usize,
    /// Peak learning rate of the linear probe (cosine to 0; SGD momentum 0.9, standardised features).
    #[arg(long, default_value_t = ProbeConfig::default().lr)]
    probe_lr: f32,
    /// Weight decay of the linear probe.
    #[arg(long, default_value_t = ProbeConfig::default().weight_decay)]
    probe_weight_decay: f32,
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
    swav_core::fs::check_outputs(
        &[(&args.checkpoint, "model file"), (&args.train_data, "training data"), (&args.test_data, "test data")],
        &[(&args.output, "report (--output)")],
    )?;
    let train = Dataset::open(&args.train_data).context("opening the training data")?;
    let test = Dataset::open(&args.test_data).context("opening the test data")?;
    let opts = EvalOptions {
        knn: KnnConfig { k: args.k, temperature: args.temperature },
        probe: ProbeConfig {
            epochs: args.probe_epochs,
            lr: args.probe_lr,
            weight_decay: args.probe_weight_decay,
            ..ProbeConfig::default()
        },
        extract: ExtractOptions {
            batch_size: args.batch,
            workers: args.workers.unwrap_or(ExtractOptions::default().workers),
            device: crate::open_device(&args.device)?.0,
        },
        input_size: args.input_size,
        baseline: args.baseline.map(|BaselineKind::Random| Baseline::Random { seed: args.baseline_seed }),
    };
    let bar = progress_bar();
    let current = RefCell::new(String::new());
    let report = evaluate(&args.checkpoint, &train, &test, &opts, &show_progress(&bar, &current));
    bar.finish_and_clear();
    let report = report.with_context(|| format!("evaluating {}", args.checkpoint.display()))?;
    print_table(&report);
    report.write(&args.output).with_context(|| format!("writing {}", args.output.display()))?;
    println!("wrote {}", args.output.display());
    Ok(())
}

pub(crate) fn print_table(r: &EvalReport) {
    println!(
        "{} train / {} test images, {} classes, {}-d features, input {}x{} (resize {}), k-NN k={} T={}, probe {} epochs",
        r.train_images, r.test_images, r.classes, r.feature_dim, r.input.crop, r.input.crop, r.input.resize, r.knn.k, r.knn.temperature, r.probe.epochs
    );
    println!(
        "{:<14} {:>11} {:>13} {:>12} {:>8} {:>8}",
        "network", "k-NN top-1", "probe top-1*", "features s", "k-NN s", "probe s"
    );
    let row = |name: &str, s: &Scores| {
        println!(
            "{:<14} {:>10.2}% {:>12.2}% {:>12.1} {:>8.1} {:>8.1}",
            name,
            100.0 * s.knn_top1,
            100.0 * s.linear_top1,
            s.features_s,
            s.knn_s,
            s.probe_s
        )
    };
    row("checkpoint", &r.scores);
    if let Some(b) = &r.baseline {
        row("random init", &b.scores);
        println!(
            "{:<14} {:>+10.2}  {:>+12.2}",
            "difference",
            100.0 * (r.knn_top1 - b.scores.knn_top1),
            100.0 * (r.linear_top1 - b.scores.linear_top1)
        );
    }
    println!("* {}; the paper's linear evaluation is `cargo xtask eval-linear`", r.linear_protocol);
    println!("total {:.1} s", r.total_s);
}

/// A progress callback for the evaluation libraries: one bar, reset for each new task, with a line
/// for each finished one.
pub fn show_progress<'a>(bar: &'a indicatif::ProgressBar, current: &'a RefCell<String>) -> impl Fn(Progress<'_>) + 'a {
    move |p: Progress<'_>| {
        if *current.borrow() != p.task {
            if !current.borrow().is_empty() {
                bar.println(format!("{} done ({:.1} s)", current.borrow(), bar.elapsed().as_secs_f64()));
            }
            *current.borrow_mut() = p.task.to_string();
            bar.reset();
            bar.set_length(p.total as u64);
            bar.set_message(p.task.to_string());
        }
        bar.set_position(p.done as u64);
    }
}

/// The progress bar of the feature commands (images done, rate, time left).
pub fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {msg:28} {bar:30} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    bar
}
