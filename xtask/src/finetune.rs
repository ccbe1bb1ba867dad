//! `cargo xtask finetune`: the paper's semi-supervised evaluation (swav-eval's `finetune`, the
//! official `eval_semisup.py`): the whole network fine-tuned on a labelled subset, in a run folder
//! that resumes; prints the best and last epochs, writes finetune.json.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use swav_data::Dataset;
use swav_eval::finetune::{finetune, FinetuneConfig, FinetuneOptions, FinetuneReport};
use swav_eval::subset::Selection;

#[derive(clap::Args)]
pub struct Args {
    /// The pretrained model file (a training checkpoint, an imported one, or a PyTorch checkpoint /
    /// safetensors state dict).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Labelled dataset the subset is taken from (`cargo xtask preprocess`).
    #[arg(long)]
    train_data: PathBuf,
    /// Labelled dataset validated on after every epoch (same classes).
    #[arg(long, alias = "test-data")]
    val_data: PathBuf,
    /// Where the run's description and checkpoints go; an existing run resumes.
    #[arg(long)]
    run_dir: PathBuf,
    /// Where to write the report (default: <run-dir>/finetune.json).
    #[arg(long)]
    output: Option<PathBuf>,
    /// The labelled images: a text file of names as the dataset records them (the official 1% /
    /// 10% ImageNet lists work as they are), file names, or image indices, one per line.
    #[arg(long, conflicts_with = "labels_fraction")]
    labels_list: Option<PathBuf>,
    /// The labelled images: this fraction of the training set, drawn with --subset-seed.
    #[arg(long)]
    labels_fraction: Option<f64>,
    /// With --labels-fraction: the same fraction of every class.
    #[arg(long, requires = "labels_fraction")]
    balanced: bool,
    /// Seed of the --labels-fraction draw.
    #[arg(long, default_value_t = 0)]
    subset_seed: u64,
    /// The official settings for 1% of the labels (trunk lr 0.02, head lr 5) or 10% (0.01, 0.2).
    #[arg(long, default_value = "10%")]
    preset: String,
    /// Epochs (official: 20).
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate of the backbone.
    #[arg(long)]
    lr_trunk: Option<f64>,
    /// Learning rate of the new linear head.
    #[arg(long)]
    lr_head: Option<f64>,
    /// Epochs (0-based) at which both learning rates are multiplied by --gamma (official: 12,16).
    #[arg(long, value_delimiter = ',')]
    decay_epochs: Option<Vec<usize>>,
    /// Learning-rate decay factor (official: 0.2).
    #[arg(long)]
    gamma: Option<f64>,
    /// Images per step (official: 256).
    #[arg(long)]
    batch: Option<usize>,
    /// Weight decay (official: 0).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Seed of the head's initialisation, the shuffles and the crops (official: 31).
    #[arg(long)]
    seed: Option<u64>,
    /// Crop size (default: the checkpoint's `input_size`).
    #[arg(long)]
    input_size: Option<usize>,
    /// Loader threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Stop after this many steps in total (a checkpoint is saved; run again to continue).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Checkpoints kept in the run folder (the newest).
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
}

fn config(args: &Args) -> anyhow::Result<FinetuneConfig> {
    let p = FinetuneConfig::preset(&args.preset)?;
    let c = FinetuneConfig {
        epochs: args.epochs.unwrap_or(p.epochs),
        batch_size: args.batch.unwrap_or(p.batch_size),
        lr_trunk: args.lr_trunk.unwrap_or(p.lr_trunk),
        lr_head: args.lr_head.unwrap_or(p.lr_head),
        weight_decay: args.weight_decay.unwrap_or(p.weight_decay),
        decay_epochs: args.decay_epochs.clone().unwrap_or(p.decay_epochs.clone()),
        gamma: args.gamma.unwrap_or(p.gamma),
        seed: args.seed.unwrap_or(p.seed),
        ..p
    };
    c.validate()?;
    Ok(c)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let output = args.output.clone().unwrap_or_else(|| args.run_dir.join("finetune.json"));
    let mut inputs = vec![
        (args.checkpoint.as_path(), "model file"),
        (args.train_data.as_path(), "training data"),
        (args.val_data.as_path(), "validation data"),
    ];
    inputs.extend(args.labels_list.as_deref().map(|p| (p, "labels list")));
    swav_core::fs::check_outputs(
        &inputs,
        &[(&args.run_dir, "run folder (--run-dir)"), (&output, "report (--output)")],
    )?;
    let config = config(&args)?;
    let selection = match (&args.labels_list, args.labels_fraction) {
        (Some(path), _) => Selection::List { path: path.clone() },
        (None, Some(fraction)) => Selection::Fraction { fraction, seed: args.subset_seed, balanced: args.balanced },
        (None, None) => Selection::All,
    };
    let train = Dataset::open(&args.train_data).context("opening the training data")?;
    let val = Dataset::open(&args.val_data).context("opening the validation data")?;
    let stop = Arc::new(AtomicBool::new(false));
    crate::train::install_stop_handler(stop.clone())?;
    let opts = FinetuneOptions {
        selection,
        config,
        input_size: args.input_size,
        workers: args.workers.unwrap_or_else(swav_core::sys::cores),
        max_steps: args.max_steps,
        stop,
        keep_checkpoints: args.keep_checkpoints,
        ..FinetuneOptions::new(&args.run_dir, &args.checkpoint)
    };
    let bar = crate::eval::progress_bar();
    let current = RefCell::new(String::new());
    let outcome = finetune(&train, &val, &opts, &crate::eval::show_progress(&bar, &current));
    bar.finish_and_clear();
    let outcome = outcome.with_context(|| format!("fine-tuning {}", args.checkpoint.display()))?;
    let Some(report) = outcome.report else {
        println!(
            "{} at step {} ({} epochs done); checkpoint {}; run the same command to resume",
            if outcome.interrupted { "interrupted" } else { "stopped" },
            outcome.steps,
            outcome.epochs_completed,
            outcome.checkpoint.display()
        );
        return if outcome.interrupted { Err(crate::Interrupted.into()) } else { Ok(()) };
    };
    print_table(&report);
    report.write(&output).with_context(|| format!("writing {}", output.display()))?;
    println!("wrote {}", output.display());
    Ok(())
}

fn print_table(r: &FinetuneReport) {
    println!("{}", r.protocol);
    println!(
        "{} labelled images ({:?}) of {} classes, {} val images, crops {}x{}, {} epochs, lr trunk {} / head {} decayed x{} at {:?}",
        r.train_images,
        r.subset.selection,
        r.classes,
        r.val_images,
        r.train_input.crop,
        r.train_input.crop,
        r.config.epochs,
        r.config.lr_trunk,
        r.config.lr_head,
        r.config.gamma,
        r.config.decay_epochs
    );
    println!("{:<6} {:>6} {:>8} {:>8}", "", "epoch", "top-1", "top-5");
    for (name, a) in [("best", &r.best), ("last", &r.last)] {
        println!("{name:<6} {:>6} {:>7.2}% {:>7.2}%", a.epoch, 100.0 * a.top1, 100.0 * a.top5);
    }
    println!("fine-tuned network: {}", r.model_file);
}
