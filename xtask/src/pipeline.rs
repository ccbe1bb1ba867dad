//! `cargo xtask pipeline`: preprocess -> train -> eval -> export -> report as one command.
//!
//! The decisions live in `swav_train::pipeline` (content keys, stamps, the held-out split, ownership
//! of the run folder, the embedded data); this module calls the steps in order and prints. A step
//! whose stamp matches its key is skipped, so running the command again after an interruption
//! continues where it stopped (training itself resumes from its newest checkpoint). `--force <step>`
//! redoes that step and every step after it. The output folder is locked while the command runs.
//!
//! With no `--config`, the embedded default runs: the Fashion-MNIST test split compiled into this
//! binary (written to `<out>/input/` on first use), 8,000 images to train on and 2,000 held out, the
//! `cpu-demo` preset, and an evaluation beside a randomly initialised network.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use swav_core::lock::FolderLock;
use swav_data::{Dataset, PreprocessOptions};
use swav_eval::frozen::{evaluate, Baseline, EvalOptions, EvalReport};
use swav_train::config;
use swav_train::pipeline::{claim_run_dir, holdout_split, key, materialize, InputDigests, RunDirClaim, Stamps};
use swav_train::trainer::{train, TrainOptions};

const DEFAULT_PIPELINE: &str = include_str!("../pipeline.toml");

/// The default demo's images, compiled in so that an installed binary runs it anywhere.
const EMBEDDED_DATA: &[(&str, &[u8])] = &[
    ("t10k-images-idx3-ubyte.gz", include_bytes!("../../assets/fashion-mnist/t10k-images-idx3-ubyte.gz")),
    ("t10k-labels-idx1-ubyte.gz", include_bytes!("../../assets/fashion-mnist/t10k-labels-idx1-ubyte.gz")),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    Preprocess,
    Train,
    Eval,
    Export,
}

const STEPS: [Step; 4] = [Step::Preprocess, Step::Train, Step::Eval, Step::Export];

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Preprocess => "preprocess",
            Step::Train => "train",
            Step::Eval => "eval",
            Step::Export => "export",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline description (TOML, see xtask/pipeline.toml); default: the embedded Fashion-MNIST demo.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redo this step and every step after it (a forced training starts from scratch).
    #[arg(long, value_enum)]
    force: Option<Step>,
    /// Output folder (overrides the description's `out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Convolution algorithms of training: auto, winograd2, direct (recorded in the run).
    #[arg(long)]
    conv: Option<String>,
    /// Where training and evaluation run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pipeline {
    out_dir: PathBuf,
    data: DataSection,
    train: TrainSection,
    #[serde(default)]
    eval: EvalSection,
    #[serde(default)]
    export: ExportSection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSection {
    /// Training images: an image folder or an IDX images file.
    train: PathBuf,
    /// Held-out images with the same classes; when absent, the last `holdout` images of `train`
    /// (an IDX file) are held out.
    test: Option<PathBuf>,
    #[serde(default)]
    holdout: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainSection {
    preset: Option<String>,
    config: Option<PathBuf>,
    #[serde(default)]
    set: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalSection {
    /// Also evaluate a randomly initialised network of the same configuration.
    random_baseline: bool,
    k: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { random_baseline: true, k: 200 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportSection {
    enabled: bool,
    with_head: bool,
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection { enabled: true, with_head: false }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (device, _) = crate::open_device(&args.device)?;
    let source = match &args.config {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => DEFAULT_PIPELINE.to_string(),
    };
    let pipe: Pipeline = toml::from_str(&source).context("pipeline description")?;
    let out = match (&args.out, &args.config) {
        (Some(out), _) => out.clone(),
        (None, Some(p)) => p.parent().unwrap_or(Path::new(".")).join(&pipe.out_dir),
        (None, None) => pipe.out_dir.clone(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = FolderLock::acquire(&out)?;
    // Relative paths resolve from the description's folder; the embedded default's from the folder
    // its images are written to.
    let base = match &args.config {
        Some(p) => p.parent().unwrap_or(Path::new(".")).to_path_buf(),
        None => materialize(&out.join("input/fashion-mnist"), EMBEDDED_DATA)?.parent().expect("a parent").to_path_buf(),
    };
    let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let stamps = Stamps::new(&out);
    if let Some(step) = args.force {
        stamps.clear(&STEPS.iter().filter(|s| **s >= step).map(|s| s.name()).collect::<Vec<_>>())?;
    }
    println!("pipeline output: {}", out.display());

    // 1. Preprocess: train and test datasets.
    let train_input = resolve(&pipe.data.train);
    let (train_sel, test_input, test_sel) = match &pipe.data.test {
        Some(t) => (None, resolve(t), None),
        None => {
            let (train, test) = holdout_split(&train_input, pipe.data.holdout)?;
            (Some(train), train_input.clone(), Some(test))
        }
    };
    let (train_dir, test_dir) = (out.join("data/train"), out.join("data/test"));
    let mut digests = InputDigests::open(&out);
    let describe = |d: &mut InputDigests, p: &Path| d.digest(p).with_context(|| format!("input {}", p.display()));
    let pre_key = key(&[
        &describe(&mut digests, &train_input)?,
        &describe(&mut digests, &test_input)?,
        &format!("{train_sel:?}{test_sel:?}"),
    ]);
    digests.save()?;
    if stamps.matches("preprocess", &pre_key)
        && train_dir.join("manifest.json").exists()
        && test_dir.join("manifest.json").exists()
    {
        println!("[1/4] preprocess: up to date");
    } else {
        println!("[1/4] preprocess: {} -> {}", train_input.display(), out.join("data").display());
        for (input, select, dir) in [(&train_input, train_sel, &train_dir), (&test_input, test_sel, &test_dir)] {
            let opts = PreprocessOptions {
                input: input.clone(),
                output: dir.clone(),
                overwrite: true,
                select,
                ..Default::default()
            };
            let report =
                swav_data::preprocess(&opts, &|_| {}).with_context(|| format!("preprocessing {}", input.display()))?;
            println!("      {} images -> {}", report.written, dir.display());
        }
        stamps.write("preprocess", &pre_key)?;
    }

    // 2. Train.
    let (train_source, origin) = match (&pipe.train.config, &pipe.train.preset) {
        (Some(p), _) => (
            std::fs::read_to_string(resolve(p)).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        (None, Some(name)) => (config::preset(name)?.toml.to_string(), format!("preset {name}")),
        (None, None) => bail!("[train] needs a preset or a config file"),
    };
    let mut overrides = pipe.train.set.clone();
    overrides.extend(args.conv.iter().map(|c| format!("train.conv={c}")));
    let cfg = config::load(&train_source, &overrides).with_context(|| format!("training configuration ({origin})"))?;
    let run_dir = out.join("run");
    let train_key = key(&[&pre_key, &cfg.to_toml()]);
    let fresh = args.force.is_some_and(|s| s <= Step::Train);
    let claim = claim_run_dir(&run_dir, &train_key, fresh, &|msg| println!("      {msg}"))?;
    let checkpoint = if stamps.matches("train", &train_key) && claim == RunDirClaim::Resumed {
        let found = swav_train::checkpoint::latest(&run_dir)?
            .context("the train stamp is present but the run has no checkpoint: use --force train")?;
        println!("[2/4] train: up to date ({} steps)", found.sidecar.step);
        found.model_path()
    } else {
        println!(
            "[2/4] train: {origin}, {} epochs, batch {} -> {}",
            cfg.train.epochs,
            cfg.train.batch_size,
            run_dir.display()
        );
        let stop = Arc::new(AtomicBool::new(false));
        crate::train::install_stop_handler(stop.clone())?;
        let opts = TrainOptions {
            max_memory: None,
            device,
            run_dir: run_dir.clone(),
            data_dir: train_dir.clone(),
            max_steps: None,
            stop,
            progress: true,
            collective: std::sync::Arc::new(swav_tensor::collective::SingleProcess),
        };
        let t0 = Instant::now();
        let outcome = train(&cfg, &opts)?;
        if outcome.interrupted {
            println!("interrupted at step {}: run the same command to continue", outcome.steps);
            return Err(crate::Interrupted.into());
        }
        println!(
            "      {} steps in {:.0} s ({:.1} images/s), last loss {:.4}",
            outcome.steps,
            t0.elapsed().as_secs_f64(),
            outcome.images_per_s,
            outcome.last_loss.unwrap_or(f64::NAN)
        );
        stamps.write("train", &train_key)?;
        outcome.checkpoint
    };

    // 3. Evaluate beside a random initialisation.
    let eval_path = out.join("eval.json");
    let eval_key = key(&[&train_key, &serde_json::to_string(&pipe.eval).expect("serialises")]);
    let report = if stamps.matches("eval", &eval_key) && eval_path.exists() {
        println!("[3/4] eval: up to date");
        EvalReport::read(&eval_path)?
    } else {
        let test = Dataset::open(&test_dir)?;
        println!("[3/4] eval: k-NN (k = {}) and linear probe on {} held-out images", pipe.eval.k, test.len());
        let opts = EvalOptions {
            knn: swav_eval::knn::KnnConfig { k: pipe.eval.k, ..Default::default() },
            extract: swav_eval::features::ExtractOptions { device, ..Default::default() },
            baseline: pipe.eval.random_baseline.then_some(Baseline::Random { seed: cfg.train.seed + 1 }),
            ..Default::default()
        };
        let report = evaluate(&checkpoint, &Dataset::open(&train_dir)?, &test, &opts, &|_| {})?;
        report.write(&eval_path)?;
        stamps.write("eval", &eval_key)?;
        report
    };
    crate::eval::print_table(&report);

    // 4. Export the backbone to ONNX.
    if pipe.export.enabled {
        let onnx = out.join("model.onnx");
        let export_key = key(&[&train_key, &serde_json::to_string(&pipe.export).expect("serialises")]);
        if stamps.matches("export", &export_key) && onnx.exists() {
            println!("[4/4] export: up to date ({})", onnx.display());
        } else {
            let opts = swav_export::ExportOptions { with_head: pipe.export.with_head, ..Default::default() };
            swav_export::export_checkpoint(&checkpoint, &onnx, &Default::default(), &opts)
                .context("exporting to ONNX")?;
            println!("[4/4] export: {}", onnx.display());
            stamps.write("export", &export_key)?;
        }
    }

    // The run at a glance: loss curve and summary beside eval.json.
    let files = crate::run_report::write_report_to(&run_dir, &eval_path, &out).context("writing the run report")?;
    println!("report: {} and {}", files.png.display(), files.txt.display());
    let verdict = match &report.baseline {
        Some(b) if report.knn_top1 > b.scores.knn_top1 && report.linear_top1 > b.scores.linear_top1 => {
            "the trained features beat the random initialisation on both"
        }
        Some(b) if report.knn_top1 > b.scores.knn_top1 || report.linear_top1 > b.scores.linear_top1 => {
            "the trained features beat the random initialisation on one of the two"
        }
        Some(_) => "the trained features do not beat the random initialisation",
        None => "no baseline evaluated",
    };
    println!("pipeline done in {:.0} s: {verdict}", started.elapsed().as_secs_f64());
    Ok(())
}
