//! `cargo xtask train`: SwAV pretraining on a preprocessed dataset (swav-train).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use swav_train::config::{self, PRESETS};
use swav_train::trainer::{train, TrainOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Dataset directory written by `cargo xtask preprocess`.
    #[arg(long, required_unless_present = "list_presets")]
    data: Option<PathBuf>,
    /// Where the configuration, metrics and checkpoints go; an existing run resumes.
    #[arg(long, required_unless_present = "list_presets")]
    run_dir: Option<PathBuf>,
    /// A built-in configuration (see --list-presets).
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A TOML configuration file with [model], [crops] and [train] tables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a configuration value by its dotted path, e.g. --set train.base_lr=0.3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Number of epochs (same as --set train.epochs=N).
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many iterations in total (a checkpoint is saved; run again to continue).
    #[arg(long)]
    max_steps: Option<usize>,
    /// cpu, or cuda[:N]. With several ranks, a bare `cuda` gives each rank the GPU of its local rank.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Convolution algorithms: auto (Winograd where it needs fewer multiplications), winograd2 (only
    /// the more accurate F(2,3)), direct (im2col GEMM only), measured (the fastest per layer shape on
    /// this machine, measured when the run starts and kept in the run folder's conv-plan.json, which a
    /// resume applies again). Same as --set train.conv=NAME: recorded in the run's configuration, so a
    /// resume with another choice is refused (it would not be bit-identical).
    #[arg(long)]
    conv: Option<String>,
    /// Start a new run from the weights of this model file (swav-rs, PyTorch .pth/.pth.tar, or a
    /// safetensors state dict; same as --set train.init=PATH): fresh optimiser, schedule from step 0.
    #[arg(long, value_name = "MODEL_FILE")]
    init: Option<PathBuf>,
    /// With --init: take only the backbone; the head and prototypes start from a random initialisation.
    #[arg(long, requires = "init")]
    init_backbone_only: bool,
    /// Compute threads (default: one per core; at most a few per core are used).
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse to start when the run's estimated memory exceeds this (bytes, or with a K/M/G/T
    /// suffix; default: the memory the machine has available).
    #[arg(long, value_parser = parse_bytes)]
    max_memory: Option<u64>,
    /// Print the built-in presets and exit.
    #[arg(long)]
    list_presets: bool,
    /// Start N ranks on this machine (through `mpirun -np N`; needs the `mpi` feature): data-parallel
    /// training with batch train.batch_size per rank. Clusters launch ranks themselves: `mpirun -np N
    /// xtask train ...` or `srun xtask train ...`.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Seconds a rank waits for the others in a collective before it stops the job, naming the ranks
    /// that fell behind.
    #[arg(long, default_value_t = 600)]
    rank_timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.list_presets {
        for p in PRESETS {
            println!("{:<28} {}", p.name, p.about);
        }
        return Ok(());
    }
    if let Some(n) = args.nproc_per_node {
        return crate::distributed::launch_local(n);
    }
    let (data, run_dir) = (args.data.expect("required by clap"), args.run_dir.expect("required by clap"));
    let world = crate::distributed::world(std::time::Duration::from_secs(args.rank_timeout))?;
    let (device, runtime) = crate::open_device(&world.device_spec(&args.device))?;
    let collective = world.collective_on(runtime.as_ref()).map_err(|e| world.fail(e))?;
    if let Some(n) = args.threads {
        rayon_threads(n)?;
    }
    let mut overrides = args.set.clone();
    if let Some(e) = args.epochs {
        overrides.push(format!("train.epochs={e}"));
    }
    if let Some(c) = &args.conv {
        overrides.push(format!("train.conv={c}"));
    }
    if let Some(init) = &args.init {
        // Absolute, so that the recorded start stays true whatever the working folder of a resume.
        let init = std::fs::canonicalize(init).with_context(|| format!("--init {}", init.display()))?;
        overrides.push(format!("train.init={}", toml::Value::String(init.display().to_string())));
        overrides.push(format!("train.init_backbone_only={}", args.init_backbone_only));
    }
    let stored = run_dir.join("config.toml");
    let (source, origin) = match (&args.config, &args.preset) {
        (Some(path), _) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        (None, Some(name)) => (config::preset(name)?.toml.to_string(), format!("preset {name}")),
        (None, None) if stored.exists() => (
            std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?,
            stored.display().to_string(),
        ),
        (None, None) => {
            bail!("choose a configuration with --preset <name> (see --list-presets) or --config <file.toml>")
        }
    };
    let config = config::load(&source, &overrides).with_context(|| format!("configuration from {origin}"))?;
    if !data.exists() {
        bail!("dataset directory {} does not exist (make one with `cargo xtask preprocess`)", data.display());
    }

    let stop = Arc::new(AtomicBool::new(false));
    install_stop_handler(stop.clone())?;

    let m = &config.model;
    tracing::info!(
        "training {:?} (width {}, {} stem) on {} with {} crops, batch {}, {} epochs",
        m.arch,
        m.width(),
        if m.small_stem { "small" } else { "standard" },
        data.display(),
        config.crops.groups.iter().map(|g| format!("{}x{}", g.count, g.size)).collect::<Vec<_>>().join("+"),
        config.train.batch_size,
        config.train.epochs
    );
    world.on_timeout(&run_dir);
    let opts = TrainOptions {
        max_steps: args.max_steps,
        stop,
        progress: true,
        max_memory: args.max_memory,
        device,
        collective,
        ..TrainOptions::new(&run_dir, &data)
    };
    let out = match train(&config, &opts) {
        Ok(out) => out,
        // The other ranks may be waiting in a collective: stop them too.
        Err(e) => return Err(world.fail(e.into())),
    };
    if world.rank() != 0 {
        return Ok(());
    }
    let loss = out.last_loss.map_or("-".into(), |l| format!("{l:.4}"));
    if out.interrupted {
        println!(
            "interrupted at step {}; checkpoint {}; run the same command to resume",
            out.steps,
            out.checkpoint.display()
        );
        return Err(crate::Interrupted.into());
    } else {
        println!(
            "{} steps ({} epochs) done, last loss {loss}, {:.1} images/s; checkpoint {}",
            out.steps,
            out.epochs_completed,
            out.images_per_s,
            out.checkpoint.display()
        );
    }
    Ok(())
}

fn rayon_threads(n: usize) -> anyhow::Result<()> {
    let (n, note) = swav_core::sys::cap_threads(n, "--threads");
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    swav_tensor::set_threads(n).context("setting the number of compute threads")
}

/// Ctrl-C and SIGTERM (what schedulers send before killing a job) raise `stop`: training saves a
/// checkpoint after the current step and the command exits with status 130. A second signal exits at
/// once, without a checkpoint (the previous one stays the newest).
pub fn install_stop_handler(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (interrupt again to quit at once)");
    })
    .context("installing the interrupt handler")
}

/// `123`, `512M`, `8G`, `1.5T` (powers of 1024) as bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: unknown unit `{c}` (K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 8G)"))?;
    if !(v.is_finite() && v > 0.0) || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok((v * mult as f64) as u64)
}
