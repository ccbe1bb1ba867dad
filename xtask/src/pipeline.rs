//! `cargo xtask pipeline`: preprocess -> train -> eval -> export as one command.
//!
//! Each step records a stamp (`<out>/stamps/<step>.json`) holding a hash of everything its result
//! depends on: its inputs (paths, sizes, modification times), its configuration and the stamps of the
//! steps before it. A step whose stamp matches and whose outputs exist is skipped, so running the
//! command again after an interruption continues where it stopped; training itself resumes from its
//! newest checkpoint. `--force <step>` redoes that step and everything after it.
//!
//! With no `--config`, the embedded default runs: the Fashion-MNIST test split shipped in
//! `assets/fashion-mnist`, 8,000 images to train on and 2,000 held out, the `cpu-demo` preset, and an
//! evaluation beside a randomly initialised network.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use swav_data::{Dataset, PreprocessOptions};
use swav_eval::frozen::{evaluate, Baseline, EvalOptions, EvalReport};
use swav_train::config;
use swav_train::trainer::{train, TrainOptions};

const DEFAULT_PIPELINE: &str = include_str!("../pipeline.toml");

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    Preprocess,
    Train,
    Eval,
    Export,
}

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
    /// Redo this step and every step after it.
    #[arg(long, value_enum)]
    force: Option<Step>,
    /// Output folder (overrides the description's `out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Convolution algorithms of training and evaluation: auto, winograd2, direct.
    #[arg(long, default_value = "auto")]
    conv: String,
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

/// FNV-1a: a stable, dependency-free hash of the stamp inputs.
fn fnv(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Path, size and modification time of a file or folder (recursively for folders).
fn describe_input(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("input {} does not exist", path.display()))?;
    if meta.is_file() {
        let mtime =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        return Ok(format!("{}:{}:{}", path.display(), meta.len(), mtime));
    }
    let mut parts = vec![path.display().to_string()];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        parts.push(describe_input(&e)?);
    }
    Ok(parts.join("|"))
}

struct Stamps {
    dir: PathBuf,
}

impl Stamps {
    fn path(&self, step: &str) -> PathBuf {
        self.dir.join(format!("{step}.json"))
    }

    fn matches(&self, step: &str, key: &str) -> bool {
        std::fs::read_to_string(self.path(step))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["key"] == key)
    }

    fn write(&self, step: &str, key: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let body = serde_json::json!({ "step": step, "key": key });
        swav_core::fs::atomic_write(&self.path(step), body.to_string().as_bytes())?;
        Ok(())
    }

    fn clear_from(&self, step: Step) {
        for s in [Step::Preprocess, Step::Train, Step::Eval, Step::Export] {
            if s >= step {
                let _ = std::fs::remove_file(self.path(s.name()));
            }
        }
    }
}

/// Number of images in an IDX images file (`.gz` or plain).
fn idx_count(path: &Path) -> anyhow::Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 8];
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_exact(&mut head)
    } else {
        std::io::BufReader::new(file).read_exact(&mut head)
    }
    .with_context(|| format!("reading the IDX header of {}", path.display()))?;
    if head[2] != 0x08 || head[3] != 3 {
        bail!("{} is not an IDX images file: give [data] test, or an IDX file to hold images out of", path.display());
    }
    Ok(u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize)
}

/// The repository root (relative paths of the embedded description are resolved from it).
fn repo_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (source, base) = match &args.config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
        None => (DEFAULT_PIPELINE.to_string(), repo_root()),
    };
    let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let mut pipe: Pipeline = toml::from_str(&source).context("pipeline description")?;
    if let Some(out) = &args.out {
        pipe.out_dir = out.clone();
    }
    let out = if args.out.is_some() { pipe.out_dir.clone() } else { resolve(&pipe.out_dir) };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let stamps = Stamps { dir: out.join("stamps") };
    if let Some(step) = args.force {
        stamps.clear_from(step);
    }
    println!("pipeline output: {}", out.display());

    // 1. Preprocess: train and test datasets.
    let train_input = resolve(&pipe.data.train);
    let (train_sel, test_input, test_sel) = match &pipe.data.test {
        Some(t) => (None, resolve(t), None),
        None => {
            let n = idx_count(&train_input)?;
            if pipe.data.holdout == 0 || pipe.data.holdout >= n {
                bail!("[data] holdout = {} must be between 1 and {} (or give [data] test)", pipe.data.holdout, n - 1);
            }
            (Some(0..n - pipe.data.holdout), train_input.clone(), Some(n - pipe.data.holdout..n))
        }
    };
    let (train_dir, test_dir) = (out.join("data/train"), out.join("data/test"));
    let pre_key =
        fnv(&[&describe_input(&train_input)?, &describe_input(&test_input)?, &format!("{train_sel:?}{test_sel:?}")]);
    if stamps.matches("preprocess", &pre_key) && train_dir.exists() && test_dir.exists() {
        println!("[1/4] preprocess: up to date");
    } else {
        println!("[1/4] preprocess: {} -> {}", train_input.display(), out.join("data").display());
        for (input, sel, dir) in
            [(&train_input, train_sel.clone(), &train_dir), (&test_input, test_sel.clone(), &test_dir)]
        {
            let opts = PreprocessOptions {
                input: input.clone(),
                output: dir.clone(),
                overwrite: true,
                select: sel,
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
    let cfg =
        config::load(&train_source, &[pipe.train.set.clone(), vec![format!("train.conv={}", args.conv)]].concat())
            .with_context(|| format!("training configuration ({origin})"))?;
    let run_dir = out.join("run");
    let train_key = fnv(&[&pre_key, &cfg.to_toml()]);
    let checkpoint = if stamps.matches("train", &train_key) {
        let found = swav_train::checkpoint::latest(&run_dir)?
            .context("the train stamp is present but the run has no checkpoint: use --force train")?;
        println!("[2/4] train: up to date ({} steps)", found.sidecar.step);
        found.model_path()
    } else {
        // A run of another configuration or dataset is started afresh; an interrupted run of this
        // one resumes from its newest checkpoint.
        let key_file = run_dir.join("pipeline-key");
        if run_dir.exists() && std::fs::read_to_string(&key_file).ok().as_deref() != Some(train_key.as_str()) {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing the stale run {}", run_dir.display()))?;
        }
        std::fs::create_dir_all(&run_dir)?;
        std::fs::write(&key_file, &train_key)?;
        println!(
            "[2/4] train: {origin}, {} epochs, batch {} -> {}",
            cfg.train.epochs,
            cfg.train.batch_size,
            run_dir.display()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: saving a checkpoint; run the pipeline again to continue");
        })
        .context("installing the Ctrl-C handler")?;
        let opts = TrainOptions {
            run_dir: run_dir.clone(),
            data_dir: train_dir.clone(),
            max_steps: None,
            stop,
            progress: true,
        };
        let t0 = Instant::now();
        let outcome = train(&cfg, &opts)?;
        if outcome.interrupted {
            println!("interrupted at step {}: run the same command to continue", outcome.steps);
            return Ok(());
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
    let eval_key = fnv(&[&train_key, &serde_json::to_string(&pipe.eval).expect("serialises")]);
    let report = if stamps.matches("eval", &eval_key) && eval_path.exists() {
        println!("[3/4] eval: up to date");
        EvalReport::read(&eval_path)?
    } else {
        println!(
            "[3/4] eval: k-NN (k = {}) and linear probe on {} held-out images",
            pipe.eval.k,
            Dataset::open(&test_dir)?.len()
        );
        let opts = EvalOptions {
            knn: swav_eval::knn::KnnConfig { k: pipe.eval.k, ..Default::default() },
            baseline: pipe.eval.random_baseline.then_some(Baseline::Random { seed: cfg.train.seed + 1 }),
            ..Default::default()
        };
        let report = evaluate(&checkpoint, &Dataset::open(&train_dir)?, &Dataset::open(&test_dir)?, &opts, &|_| {})?;
        report.write(&eval_path)?;
        stamps.write("eval", &eval_key)?;
        report
    };
    crate::eval::print_table(&report);

    // 4. Export the backbone to ONNX.
    if pipe.export.enabled {
        let onnx = out.join("model.onnx");
        let export_key = fnv(&[&train_key, &serde_json::to_string(&pipe.export).expect("serialises")]);
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
