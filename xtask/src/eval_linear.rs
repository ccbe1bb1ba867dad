//! `cargo xtask eval-linear`: the paper's linear evaluation (swav-eval's `linear`, the official
//! `eval_linear.py`) of a model file's frozen backbone; prints the best and last epochs, writes
//! linear.json.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::Context;
use swav_data::Dataset;
use swav_eval::linear::{linear_eval, LinearConfig, LinearOptions, LinearReport};

#[derive(clap::Args)]
pub struct Args {
    /// Model file (a training checkpoint, an imported one, or directly a PyTorch checkpoint /
    /// safetensors state dict): its backbone is evaluated, frozen.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Labelled dataset the classifier is trained on (`cargo xtask preprocess`).
    #[arg(long)]
    train_data: PathBuf,
    /// Labelled dataset it is validated on after every epoch (same classes).
    #[arg(long, alias = "test-data")]
    val_data: PathBuf,
    /// Where to write the report (JSON, written atomically).
    #[arg(long, default_value = "linear.json")]
    output: PathBuf,
    /// Epochs (official: 100).
    #[arg(long, default_value_t = LinearConfig::default().epochs)]
    epochs: usize,
    /// Learning rate of the first epoch, annealed per epoch by a cosine to --final-lr (official: 0.3).
    #[arg(long, default_value_t = LinearConfig::default().lr)]
    lr: f64,
    /// Learning rate the cosine ends at (official: 0).
    #[arg(long, default_value_t = LinearConfig::default().final_lr)]
    final_lr: f64,
    /// Images per SGD step (official: 256).
    #[arg(long, default_value_t = LinearConfig::default().batch_size)]
    batch: usize,
    /// Weight decay on the classifier's weight and bias (official: 1e-6).
    #[arg(long, default_value_t = LinearConfig::default().weight_decay)]
    weight_decay: f64,
    /// SGD momentum (official: 0.9).
    #[arg(long, default_value_t = LinearConfig::default().momentum)]
    momentum: f64,
    /// Seed of the classifier's initialisation, the shuffles and the crops (official: 31).
    #[arg(long, default_value_t = LinearConfig::default().seed)]
    seed: u64,
    /// Crop size (default: the checkpoint's `input_size`).
    #[arg(long)]
    input_size: Option<usize>,
    /// Loader threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    swav_core::fs::check_outputs(
        &[(&args.checkpoint, "model file"), (&args.train_data, "training data"), (&args.val_data, "validation data")],
        &[(&args.output, "report (--output)")],
    )?;
    let config = LinearConfig {
        epochs: args.epochs,
        batch_size: args.batch,
        lr: args.lr,
        final_lr: args.final_lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };
    config.validate()?;
    let train = Dataset::open(&args.train_data).context("opening the training data")?;
    let val = Dataset::open(&args.val_data).context("opening the validation data")?;
    let opts = LinearOptions {
        config,
        input_size: args.input_size,
        workers: args.workers.unwrap_or(LinearOptions::default().workers),
    };
    let bar = crate::eval::progress_bar();
    let current = RefCell::new(String::new());
    let report = linear_eval(&args.checkpoint, &train, &val, &opts, &crate::eval::show_progress(&bar, &current));
    bar.finish_and_clear();
    let report = report.with_context(|| format!("linear evaluation of {}", args.checkpoint.display()))?;
    print_table(&report);
    report.write(&args.output).with_context(|| format!("writing {}", args.output.display()))?;
    println!("wrote {}", args.output.display());
    Ok(())
}

fn print_table(r: &LinearReport) {
    println!("{}", r.protocol);
    println!(
        "{} train / {} val images, {} classes, {}-d features, train crops {}x{} (scale {}-{}, flip), val {}x{} (resize {}), {} epochs, lr {} cosine, batch {}",
        r.train_images,
        r.val_images,
        r.classes,
        r.feature_dim,
        r.train_input.crop,
        r.train_input.crop,
        r.train_input.scale[0],
        r.train_input.scale[1],
        r.val_input.crop,
        r.val_input.crop,
        r.val_input.resize,
        r.config.epochs,
        r.config.lr,
        r.config.batch_size
    );
    println!("{:<6} {:>6} {:>8} {:>8}", "", "epoch", "top-1", "top-5");
    for (name, a) in [("best", &r.best), ("last", &r.last)] {
        println!("{name:<6} {:>6} {:>7.2}% {:>7.2}%", a.epoch, 100.0 * a.top1, 100.0 * a.top5);
    }
    println!("total {:.1} s", r.total_s);
}
