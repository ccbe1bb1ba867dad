//! `cargo xtask bench data`: multi-crop loader throughput in images/s (each image = all its crops), and
//! optionally the official pipeline (torchvision transforms on PIL, `benches/python/multicrop_baseline.py`)
//! on the same images with the same number of worker processes, run right after, and the ratio.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use swav_data::{Dataset, Layout, LoaderConfig, MultiCropConfig, MultiCropLoader};

#[derive(clap::Args)]
pub struct Args {
    /// A dataset written by `cargo xtask preprocess`.
    #[arg(long)]
    data: PathBuf,
    /// Crop preset (official = 2x224+6x96, 2x224, small = 2x28+4x16, fashion-mnist, or AxB+CxD...).
    #[arg(long, default_value = "official")]
    crops: String,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Loader worker threads (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Batches prepared ahead.
    #[arg(long, default_value_t = 2)]
    prefetch: usize,
    /// Measure for this many seconds (after one warm-up batch).
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Channels-first output.
    #[arg(long)]
    nchw: bool,
    /// Also run the Python baseline on this folder of image files (the dataset's source images).
    #[arg(long)]
    baseline_images: Option<PathBuf>,
    /// Python interpreter with torch, torchvision and Pillow, for the baseline.
    #[arg(long, default_value = "python3")]
    python: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ds = Dataset::open(&args.data)?;
    let crops = MultiCropConfig::preset(&args.crops)?;
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let cfg = LoaderConfig {
        batch_size: args.batch.min(ds.len()),
        workers,
        prefetch: args.prefetch,
        layout: if args.nchw { Layout::Nchw } else { Layout::Nhwc },
        // Three-value (ImageNet) normalisation needs RGB output; otherwise keep the dataset's channels.
        channels: crops.augment.mean.as_ref().filter(|m| m.len() == 3).map(|_| 3),
        ..LoaderConfig::default()
    };
    let mut loader = MultiCropLoader::new(&ds, &crops, &cfg)?;
    super::print_cpu();
    println!(
        "dataset {} ({} images, codec {}), crops {} ({} per image), batch {}, {} worker thread(s)",
        args.data.display(),
        ds.len(),
        ds.manifest().parameters.codec.name(),
        args.crops,
        crops.num_crops(),
        cfg.batch_size,
        workers
    );
    // Warm-up: first batch (threads started, buffers allocated, pages mapped).
    let mut epoch = 0u64;
    let mut it = loader.epoch(epoch);
    it.next().context("no batch")??;
    let start = Instant::now();
    let cpu0 = process_cpu_seconds();
    let mut images = 0usize;
    'outer: loop {
        for b in it.by_ref() {
            images += b?.len();
            if start.elapsed().as_secs_f64() >= args.seconds {
                break 'outer;
            }
        }
        drop(it);
        epoch += 1;
        it = loader.epoch(epoch);
    }
    drop(it);
    let secs = start.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let rate = images as f64 / secs;
    println!("swav-data: {rate:.1} images/s ({:.0} crops/s) over {secs:.1} s", rate * crops.num_crops() as f64);
    if let Some(cpu) = cpu {
        // Robust to other load on the machine: images per second of CPU actually used.
        println!(
            "swav-data: {:.2} ms of CPU per image ({:.1} images per CPU-second)",
            cpu * 1e3 / images as f64,
            images as f64 / cpu
        );
    }
    drop(loader);
    super::print_kernels(&["swav_data::"], &[]);

    if let Some(dir) = &args.baseline_images {
        if args.crops != "official" && args.crops != "2x224+6x96" {
            bail!("the Python baseline implements the official 2x224+6x96 pipeline only");
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/python/multicrop_baseline.py");
        let out = std::process::Command::new(&args.python)
            .arg(&script)
            .arg(dir)
            .args([
                "--workers",
                &workers.to_string(),
                "--seconds",
                &args.seconds.to_string(),
                "--batch",
                &args.batch.to_string(),
            ])
            .output()
            .with_context(|| format!("cannot run {} {}", args.python, script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("the baseline failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
        }
        let base: f64 = text
            .lines()
            .find_map(|l| l.split_whitespace().next().filter(|_| l.contains("images/s")).and_then(|v| v.parse().ok()))
            .with_context(|| format!("no images/s figure in the baseline's output: {text}"))?;
        println!("torchvision+PIL baseline: {base:.1} images/s ({workers} worker processes)");
        println!("ratio: {:.2}x (images/s)", rate / base);
        let base_cpu: Option<f64> = text
            .lines()
            .find(|l| l.contains("ms of CPU per image"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok());
        if let (Some(b), Some(ours)) = (base_cpu, cpu) {
            let ours_ms = ours * 1e3 / images as f64;
            println!(
                "baseline: {b:.2} ms of CPU per image; CPU ratio {:.2}x (robust to other load on the machine)",
                b / ours_ms
            );
        }
    }
    Ok(())
}

/// User + system CPU time of this process (all threads), from /proc/self/stat (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
