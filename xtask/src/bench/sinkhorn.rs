//! `cargo xtask bench sinkhorn`: Sinkhorn-Knopp against a baseline run beside it in the same process.
//! CPU: the straightforward implementation in the official order (one pass per normalisation, one
//! thread) against ours with one thread and with all cores. CUDA: the naive kernels (one pass per
//! normalisation, like PyTorch eager) against the fused ones, timed with CUDA events, plus the memory
//! traffic of each and the bandwidth it implies.

use std::time::{Duration, Instant};
#[cfg(feature = "cuda")]
use swav_sinkhorn::cuda;
use swav_sinkhorn::{self as sk, Params};

#[derive(clap::Args)]
pub struct Args {
    /// Shapes to run, `rows x prototypes`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256x3000,4096x3000")]
    shapes: Vec<String>,
    /// Sinkhorn iterations.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Epsilon.
    #[arg(long, default_value_t = 0.05)]
    epsilon: f32,
    /// Timed repetitions per measurement (the median is reported; CPU measurements stop after ~10 s).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Where to run: cpu, cuda or all.
    #[arg(long, default_value = "all")]
    device: String,
    /// Peak memory bandwidth of the GPU in TB/s, for the bandwidth figures (H100 SXM: 3.35).
    #[arg(long, default_value_t = 3.35)]
    peak_tbps: f64,
    /// Also run the PyTorch baseline (`benches/python/sinkhorn.py`) with this Python interpreter.
    #[arg(long)]
    python: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let shapes = args
        .shapes
        .iter()
        .map(|s| {
            let (r, k) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("shape `{s}` is not ROWSxPROTOTYPES"))?;
            Ok((r.trim().parse::<usize>()?, k.trim().parse::<usize>()?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (cpu, gpu) = match args.device.as_str() {
        "cpu" => (true, false),
        "cuda" => (false, true),
        "all" => (true, true),
        other => anyhow::bail!("--device must be cpu, cuda or all, not `{other}`"),
    };
    let params = Params::new(args.epsilon, args.iterations);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "Sinkhorn-Knopp, epsilon {}, {} iterations, median of up to {} runs",
        args.epsilon, args.iterations, args.repeats
    );
    println!("{:<12} {:<6} {:<44} {:>10} {:>9}", "shape", "device", "implementation", "ms", "speed-up");
    for &(rows, k) in &shapes {
        let scores = random_scores(rows * k, (rows * 31 + k) as u64);
        let shape = format!("{rows}x{k}");
        if cpu {
            bench_cpu(&shape, &scores, rows, k, &params, cores, args.repeats)?;
        }
        if gpu {
            bench_cuda(&shape, &scores, rows, k, &params, args.repeats, args.peak_tbps)?;
        }
    }
    if let Some(python) = &args.python {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/python/sinkhorn.py");
        for (device, on) in [("cpu", cpu), ("cuda", gpu)] {
            if !on {
                continue;
            }
            let status = std::process::Command::new(python)
                .arg(&script)
                .args(["--device", device, "--threads", &cores.to_string(), "--shapes", &args.shapes.join(",")])
                .args(["--epsilon", &args.epsilon.to_string(), "--iterations", &args.iterations.to_string()])
                .status()?;
            if !status.success() {
                println!("PyTorch baseline on {device}: not measured ({status})");
            }
        }
    }
    Ok(())
}

fn bench_cpu(
    shape: &str,
    scores: &[f32],
    rows: usize,
    k: usize,
    params: &Params,
    cores: usize,
    repeats: usize,
) -> anyhow::Result<()> {
    let base =
        median_ms(repeats, || sk::baseline::official(scores, rows, k, params.epsilon, params.iterations).map(|_| ()))?;
    println!("{shape:<12} {:<6} {:<44} {base:>10.3} {:>9}", "cpu", "baseline: official order, 1 thread", "1.00");
    let mut q = vec![0f32; rows * k];
    for threads in [1, cores] {
        let p = Params { threads, ..*params };
        let ms = median_ms(repeats, || sk::sinkhorn_into(scores, rows, k, &p, &sk::SingleProcess, &mut q))?;
        let name = format!("swav-sinkhorn, {threads} thread{}", if threads == 1 { "" } else { "s" });
        println!("{shape:<12} {:<6} {name:<44} {ms:>10.3} {:>8.2}x", "cpu", base / ms);
        if threads == cores && cores == 1 {
            break;
        }
    }
    let ours = sk::sinkhorn(scores, rows, k, params)?;
    let official = sk::baseline::official(scores, rows, k, params.epsilon, params.iterations)?;
    println!(
        "{shape:<12} {:<6} relative difference to the baseline: {:.1e}",
        "cpu",
        sk::relative_error(&ours, &official)
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(shape: &str, _: &[f32], _: usize, _: usize, _: &Params, _: usize, _: f64) -> anyhow::Result<()> {
    println!("{shape:<12} {:<6} not measured: this build has no CUDA support (the `cuda` feature)", "cuda");
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench_cuda(
    shape: &str,
    scores: &[f32],
    rows: usize,
    k: usize,
    params: &Params,
    repeats: usize,
    peak_tbps: f64,
) -> anyhow::Result<()> {
    let stream = match cuda::open_stream(0) {
        Ok(s) => s,
        Err(e) => {
            println!("{shape:<12} {:<6} not measured: {e}", "cuda");
            return Ok(());
        }
    };
    let ctx = stream.context().clone();
    let mut fused = cuda::CudaSinkhorn::new(&stream)?;
    fused.set_check_finite(false);
    let d_scores = stream.clone_htod(scores)?;
    let mut d_q = stream.alloc_zeros::<f32>(rows * k)?;
    let timing = Some(cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    // GPU time of one call, from CUDA events around it (after warm-up).
    let mut gpu_ms = |naive: bool| -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for i in 0..repeats.max(1) + 3 {
            let start = ctx.new_event(timing)?;
            let end = ctx.new_event(timing)?;
            start.record(&stream)?;
            if naive {
                fused.run_naive(&d_scores, rows, k, params, &mut d_q)?;
            } else {
                fused.run(&d_scores, rows, k, params, &sk::SingleProcess, &mut d_q)?;
            }
            end.record(&stream)?;
            let ms = start.elapsed_ms(&end)? as f64;
            if i >= 3 {
                times.push(ms);
            }
        }
        Ok(median(times))
    };
    let naive = gpu_ms(true)?;
    let ours = gpu_ms(false)?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let bytes = (rows * k * 4) as f64;
    // Matrix traffic: naive = exp (R+W), total (R), per iteration 2 sums (R) + 2 divisions (R+W), none
    // cached; fused = T+1 reads + 1 write; floor = 1 read + 1 write.
    let t = params.iterations as f64;
    let naive_traffic = (5.0 + t * 6.0) * bytes;
    let fused_traffic = (t + 2.0) * bytes;
    let floor_ms = 2.0 * bytes / (peak_tbps * 1e12) * 1e3;
    println!(
        "{shape:<12} {:<6} {:<44} {naive:>10.3} {:>9}   ({:.0} GB/s)",
        "cuda",
        "baseline: naive kernels",
        "1.00",
        naive_traffic / (naive * 1e-3) / 1e9
    );
    println!(
        "{shape:<12} {:<6} {:<44} {ours:>10.3} {:>8.2}x   ({:.0} GB/s)",
        "cuda",
        "swav-sinkhorn fused",
        naive / ours,
        fused_traffic / (ours * 1e-3) / 1e9
    );
    // Back-to-back calls, wall clock (launch overhead included), and with the finiteness check on.
    let calls = 50;
    stream.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..calls {
        fused.run(&d_scores, rows, k, params, &sk::SingleProcess, &mut d_q)?;
    }
    stream.synchronize()?;
    let wall = t0.elapsed().as_secs_f64() * 1e3 / calls as f64;
    fused.set_check_finite(true);
    let checked =
        median_ms(repeats, || fused.run(&d_scores, rows, k, params, &sk::SingleProcess, &mut d_q).map(|_| ()))?;
    println!("{shape:<12} {:<6} {:<44} {wall:>10.3}", "cuda", "  back-to-back, wall clock per call");
    println!("{shape:<12} {:<6} {:<44} {checked:>10.3}", "cuda", "  with the NaN check (waits for the result)");
    println!(
        "{shape:<12} {:<6} bandwidth floor (read scores + write Q once at {peak_tbps} TB/s): {floor_ms:.3} ms; \
         fused traffic model (T+1 reads + 1 write): {:.3} ms; device: {name}",
        "cuda",
        fused_traffic / (peak_tbps * 1e12) * 1e3
    );
    let q = stream.clone_dtoh(&d_q)?;
    let cpu = sk::sinkhorn(scores, rows, k, params)?;
    println!("{shape:<12} {:<6} relative difference to the CPU: {:.1e}", "cuda", sk::relative_error(&q, &cpu));
    Ok(())
}

/// Median wall time of `f` in ms over up to `repeats` runs (after one warm-up), stopping after ~10 s.
fn median_ms<E: Into<anyhow::Error>>(repeats: usize, mut f: impl FnMut() -> Result<(), E>) -> anyhow::Result<f64> {
    f().map_err(Into::into)?;
    let budget = Instant::now();
    let mut times = Vec::new();
    while times.len() < repeats.max(1) && (times.len() < 3 || budget.elapsed() < Duration::from_secs(10)) {
        let t = Instant::now();
        f().map_err(Into::into)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Uniform scores in [-1, 1) (cosine similarities' range), deterministic.
fn random_scores(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
