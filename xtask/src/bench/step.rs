//! `cargo xtask bench step`: milliseconds per SwAV training step (multi-crop forward, Sinkhorn codes,
//! swapped loss, backward, SGD step) on random crops, and, with `--python`, the same step in PyTorch
//! (`benches/python/step.py`) on the same machine with the same threads, with the ratio.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::matmul::MulPrecision;
use swav_tensor::{Device, Tensor};
use swav_train::config::TrainConfig;
use swav_train::lars::Lars;
use swav_train::step::{swav_step, SwavState};

#[derive(clap::Args)]
pub struct Args {
    /// rn18-small (ResNet-18 small stem, 2x28+4x16, batch 64) or rn50 (ResNet-50, 2x224+6x96, batch 8);
    /// the options below override its fields.
    #[arg(long, default_value = "rn18-small")]
    preset: String,
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    crops: Option<String>,
    #[arg(long)]
    batch: Option<usize>,
    /// Measured steps (after the warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32 or bf16. On a CUDA device, the activations (default bf16); on the CPU, what the
    /// convolutions multiply (default fp32; bf16 needs AVX512_BF16, and PyTorch then runs under CPU
    /// autocast).
    #[arg(long)]
    precision: Option<String>,
    /// Channels of the stem and first stage (default: the arch's, 64).
    #[arg(long)]
    width: Option<usize>,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    channels: usize,
    #[arg(long, default_value_t = 2048)]
    hidden_mlp: usize,
    #[arg(long, default_value_t = 3000)]
    prototypes: usize,
    /// Convolution algorithms: auto (Winograd where cheaper), winograd2, direct, measured (the fastest
    /// per layer shape, measured here first; the plan is printed), im2col, winograd-f2, winograd-f4.
    #[arg(long, default_value = "auto")]
    conv: String,
    /// Print the time spent in each op.
    #[arg(long)]
    profile: bool,
    /// A Python with torch and torchvision: also run the PyTorch step and print the ratio.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Alternate this many times between swav-rs's measured steps and PyTorch's (with --python): on a
    /// machine whose speed drifts, each round compares the two within the same minutes, and the median
    /// of the rounds' ratios is the result.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

pub(super) struct Setup {
    pub(super) arch: String,
    pub(super) small_stem: bool,
    pub(super) crops: Vec<(usize, usize)>,
    pub(super) batch: usize,
}

/// The model, crops and batch of a step preset (shared with `bench conv`).
pub(super) fn preset(name: &str) -> anyhow::Result<Setup> {
    Ok(match name {
        "rn18-small" => Setup { arch: "resnet18".into(), small_stem: true, crops: vec![(2, 28), (4, 16)], batch: 64 },
        "rn50" => Setup { arch: "resnet50".into(), small_stem: false, crops: vec![(2, 224), (6, 96)], batch: 8 },
        other => bail!("unknown step preset `{other}` (rn18-small or rn50)"),
    })
}

fn setup(a: &Args) -> anyhow::Result<Setup> {
    let mut s = preset(&a.preset)?;
    if let Some(arch) = &a.arch {
        s.arch = arch.clone();
    }
    if let Some(b) = a.batch {
        s.batch = b;
    }
    if let Some(c) = &a.crops {
        s.crops = c
            .split(',')
            .map(|p| {
                let (n, size) = p.split_once('x').context("crops look like 2x28,4x16")?;
                Ok((n.parse()?, size.parse()?))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(s)
}

/// Minor page faults of this process so far (Linux): memory touched for the first time. A step in the
/// steady state should have few, since freed tensors are reused by the caching allocator.
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (in parentheses, which may hold spaces): state is the first, minflt
    // the eighth.
    stat.rsplit_once(')')?.1.split_whitespace().nth(7)?.parse().ok()
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn parse_precision(name: Option<&str>) -> anyhow::Result<Option<swav_train::config::Precision>> {
    Ok(match name {
        None => None,
        Some("fp32") => Some(swav_train::config::Precision::Fp32),
        Some("bf16") => Some(swav_train::config::Precision::Bf16),
        Some(other) => anyhow::bail!("--precision must be fp32 or bf16, not `{other}`"),
    })
}

/// What the CPU's convolutions multiply for `--precision name` (refused where bf16 has no hardware).
pub fn cpu_precision(name: &str) -> anyhow::Result<MulPrecision> {
    Ok(swav_train::trainer::cpu_products(parse_precision(Some(name))?, Device::Cpu)?)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (device, runtime) = crate::open_device(&a.device)?;
    let precision = parse_precision(a.precision.as_deref())?;
    let activations = swav_train::trainer::activation_dtype(precision, device)?;
    let products = swav_train::trainer::cpu_products(precision, device)?;
    let conv: swav_tensor::ops::winograd::ConvAlgorithm = a.conv.parse().map_err(anyhow::Error::msg)?;
    let s = setup(&a)?;
    let cfg = ModelConfig {
        arch: Arch::parse(&s.arch)?,
        width: a.width,
        small_stem: s.small_stem,
        in_channels: a.channels,
        hidden_mlp: a.hidden_mlp,
        head_bn: true,
        feat_dim: 128,
        prototypes: vec![a.prototypes],
        sync_bn: false,
        sync_bn_group: 0,
    };
    let train = TrainConfig {
        epochs: 1,
        batch_size: s.batch,
        base_lr: 0.1,
        final_lr: 0.1,
        warmup_epochs: 0,
        start_warmup: 0.0,
        weight_decay: 1e-6,
        momentum: 0.9,
        lars: false,
        trust_coefficient: 0.001,
        temperature: 0.1,
        epsilon: 0.05,
        sinkhorn_iterations: 3,
        crops_for_assign: vec![0, 1],
        freeze_prototypes_niters: 0,
        queue_length: 0,
        epoch_queue_starts: 0,
        seed: 0,
        workers: 0,
        prefetch: 1,
        checkpoint_every_epochs: 1,
        keep_checkpoints: 1,
        checkpoint_freq: 0,
        conv,
        init: None,
        init_backbone_only: false,
        precision,
    };
    let crops_text = s.crops.iter().map(|(n, sz)| format!("{n}x{sz}")).collect::<Vec<_>>().join(",");
    let threads = rayon_threads();
    println!(
        "SwAV step: {} {}stem, crops {crops_text}, batch {}, {threads} threads, {}, convolutions {}",
        s.arch,
        if s.small_stem { "small " } else { "" },
        s.batch,
        match &runtime {
            Some(rt) => format!("{device} ({}, {activations:?} activations)", rt.backend().describe()),
            None => format!("cpu ({} products)", products.name()),
        },
        a.conv
    );
    super::print_cpu();
    if !device.is_cuda() {
        super::print_peak();
    }
    let mut state = SwavState::new(SwavModel::new(cfg, 0)?, Lars::new(0.9, 1e-6, 0.001, false));
    state.model.set_conv_precision(products);
    if conv == swav_tensor::ops::winograd::ConvAlgorithm::Measured && !device.is_cuda() {
        let t0 = Instant::now();
        let mut geoms = Vec::new();
        for &(n, size) in &s.crops {
            geoms.extend(state.model.conv_geometries(n * s.batch, size, size)?);
        }
        let (plan, measured) = swav_tensor::ops::conv_plan::measure(&geoms, products)?;
        println!("measured convolution plan ({:.1} s):", t0.elapsed().as_secs_f64());
        for m in &measured {
            let s = m.shape;
            let times: Vec<String> = m.seconds.iter().map(|(k, t)| format!("{k} {:.1} ms", t * 1e3)).collect();
            println!(
                "  {}x{} {}->{} {}x{}/{}: {} ({}, {} images)",
                s.h,
                s.w,
                s.cin,
                s.cout,
                s.kh,
                s.kw,
                s.stride,
                m.chosen,
                times.join(", "),
                m.n
            );
        }
        state.model.set_conv_algorithm(swav_tensor::ops::winograd::ConvAlgorithm::Planned(plan.leak()));
    } else {
        state.model.set_conv_algorithm(conv);
    }
    state.model.to_device(device)?;
    state.model.set_linear_compute(activations);
    let mut torch = match &a.python {
        None => None,
        Some(py) => {
            // The checkout's script when run from one (a binary carried to another machine runs there),
            // else the one of the source tree it was built from.
            let local = PathBuf::from("benches/python/step.py");
            let script = if local.is_file() {
                local
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/python/step.py")
            };
            let mut cmd = Command::new(py);
            cmd.arg(&script)
                .args(["--arch", &s.arch, "--crops", &crops_text, "--batch", &s.batch.to_string()])
                .args([
                    "--steps",
                    &a.steps.to_string(),
                    "--warmup",
                    &a.warmup.to_string(),
                    "--threads",
                    &threads.to_string(),
                ])
                .args([
                    "--channels",
                    &a.channels.to_string(),
                    "--hidden",
                    &a.hidden_mlp.to_string(),
                    "--prototypes",
                    &a.prototypes.to_string(),
                ]);
            if a.width.is_some_and(|w| w != 64) {
                bail!("the PyTorch baseline uses torchvision's widths; --width cannot be compared");
            }
            if s.small_stem {
                cmd.arg("--small-stem");
            }
            if let Device::Cuda(i) = device {
                let precision = if activations == swav_tensor::DType::Bf16 { "bf16" } else { "fp32" };
                cmd.args(["--device", &format!("cuda:{i}"), "--precision", precision]);
            } else if products == MulPrecision::Bf16 {
                cmd.args(["--precision", "bf16"]);
            }
            Some((py, cmd))
        }
    };
    if a.rounds == 0 || (a.rounds > 1 && torch.is_none()) {
        bail!("--rounds needs --python and at least 1");
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut times = Vec::new();
    // (swav-rs, PyTorch) milliseconds per step of each round.
    let mut rounds: Vec<(f64, f64)> = Vec::new();
    let mut torch_json = serde_json::Value::Null;
    let mut i = 0;
    for round in 0..a.rounds {
        let mut round_times = Vec::new();
        let last = i + a.steps + if round == 0 { a.warmup } else { 0 };
        while i < last {
            let groups: Vec<Tensor> = s
                .crops
                .iter()
                .map(|&(n, size)| {
                    let len = n * s.batch * size * size * a.channels;
                    let data = super::random_values(len, &mut seed);
                    Tensor::from_vec(&[n * s.batch, size, size, a.channels], data).and_then(|t| {
                        if device.is_cuda() {
                            t.to_device(device)?.to_dtype(activations)
                        } else {
                            Ok(t)
                        }
                    })
                })
                .collect::<Result<_, _>>()?;
            if a.profile && i == a.warmup {
                swav_tensor::profile::enable();
            }
            let faults_before = minor_faults();
            let t0 = Instant::now();
            let stats = swav_step(&mut state, &train, groups, s.batch, i, 0.1)?;
            if let Some(rt) = &runtime {
                rt.backend().synchronize()?;
            }
            let dt = t0.elapsed().as_secs_f64();
            if i >= a.warmup {
                times.push(dt);
                round_times.push(dt);
            }
            let faults = minor_faults()
                .zip(faults_before)
                .map_or(String::new(), |(now, before)| format!(", {:.1}k page faults", (now - before) as f64 / 1e3));
            eprintln!(
                "  step {i}: {:.1} ms (loss {:.3}{faults}){}",
                dt * 1e3,
                stats.loss,
                if i < a.warmup { " warm-up" } else { "" }
            );
            i += 1;
        }
        if let Some((py, cmd)) = &mut torch {
            let out = cmd.output().with_context(|| format!("running {}", py.display()))?;
            if !out.status.success() {
                bail!("the PyTorch baseline failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout);
            torch_json = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
                .context("reading the baseline's JSON")?;
            let theirs = torch_json["step_ms"].as_f64().context("step_ms")?;
            round_times.sort_by(f64::total_cmp);
            let ours = round_times[round_times.len() / 2] * 1e3;
            if a.rounds > 1 {
                println!(
                    "round {round}: swav-rs {ours:.1} ms/step, PyTorch {theirs:.1} ms/step, ratio {:.2}x",
                    theirs / ours
                );
            }
            rounds.push((ours, theirs));
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let ours = times[times.len() / 2] * 1e3;
    if a.profile {
        println!("time per op over the measured steps (share of step time):");
        for (op, secs, calls) in swav_tensor::profile::report() {
            println!(
                "  {op:<20} {:>8.1} ms/step {:>5.1}%  ({} calls/step)",
                secs / times.len() as f64 * 1e3,
                100.0 * secs / total,
                calls / times.len() as u64
            );
        }
    }
    if !device.is_cuda() {
        let gemm = format!("gemm crate (convolution and linear GEMMs) {}", swav_tensor::matmul::gemm_isa());
        super::print_kernels(&["swav_tensor::"], &[gemm]);
    }
    let rss = peak_rss_mib();
    println!(
        "swav-rs: {ours:.1} ms/step, {:.1} images/s, peak RSS {}{}",
        s.batch as f64 / ours * 1e3,
        rss.map_or("?".into(), |r| format!("{r:.0} MiB")),
        runtime.as_ref().map_or(String::new(), |rt| {
            let (st, mib) = (rt.stats(), |b: usize| b as f64 / (1u64 << 20) as f64);
            format!(
                ", peak device memory {:.0} MiB (reserved {:.0} MiB: {:.0} persistent, {:.0} per step)",
                mib(st.peak),
                mib(st.reserved),
                mib(st.reserved - st.step_reserved),
                mib(st.step_reserved)
            )
        })
    );
    // Convolution FLOPs as a direct convolution counts them (Winograd does fewer multiplications, so a
    // rate above the peak is possible in principle): forward, weight gradient, and data gradient for
    // every layer but the first.
    let mut conv_flops = 0.0;
    for &(n, size) in &s.crops {
        let geoms = state.model.conv_geometries(n * s.batch, size, size)?;
        for (i, g) in geoms.iter().enumerate() {
            conv_flops += 2.0 * g.macs() as f64 * if i == 0 { 2.0 } else { 3.0 };
        }
    }
    let peak = (!device.is_cuda()).then(super::peak_gflops).flatten();
    let rate = |ms: f64| {
        let gflops = conv_flops / (ms * 1e-3) / 1e9;
        match peak {
            Some((p, how)) => {
                format!("{gflops:.1} GFLOP/s, {:.0}% of the {how} {p:.0} GFLOP/s peak", 100.0 * gflops / p)
            }
            None => format!("{gflops:.1} GFLOP/s"),
        }
    };
    println!("convolutions: {:.1} GFLOP per step; swav-rs {}", conv_flops / 1e9, rate(ours));
    if !rounds.is_empty() {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let h = v.len() / 2;
            if v.len().is_multiple_of(2) {
                (v[h - 1] + v[h]) / 2.0
            } else {
                v[h]
            }
        };
        let theirs = median(rounds.iter().map(|r| r.1).collect());
        let ratios: Vec<f64> = rounds.iter().map(|r| r.1 / r.0).collect();
        let v = &torch_json;
        println!(
            "PyTorch {}: {theirs:.1} ms/step, peak RSS {:.0} MiB{}",
            v["torch"].as_str().unwrap_or("?"),
            v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            v["peak_device_mib"].as_f64().map_or(String::new(), |m| format!(", peak device memory {m:.0} MiB"))
        );
        println!("PyTorch convolutions: {}", rate(theirs));
        let each = ratios.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", ");
        let ratio = median(ratios);
        if rounds.len() > 1 {
            println!(
                "ratio (PyTorch time / swav-rs time): {ratio:.2}x, the median of {} rounds ({each})",
                rounds.len()
            );
        } else {
            println!("ratio (PyTorch time / swav-rs time): {ratio:.2}x");
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    swav_tensor::Device::Cpu.threads()
}
