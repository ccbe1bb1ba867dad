//! `cargo xtask bench conv`: where a training step's convolution time goes, layer shape by layer shape.
//! Each distinct backbone convolution of the step's crops is timed alone (forward, weight gradient,
//! data gradient) at the step's batch, weighted by how many layers have that shape, and printed with
//! its FLOP rate; with `--python`, PyTorch times the same shapes (`benches/python/conv_layers.py`,
//! channels-last, same threads) and each row gets its ratio.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::matmul::MulPrecision;
use swav_tensor::ops::conv::{conv2d_backward, conv2d_forward, ConvGeom, ConvParams};
use swav_tensor::ops::conv_plan::{self, ConvShape};
use swav_tensor::ops::winograd::{self, ConvAlgorithm};
use swav_tensor::Tensor;

#[derive(clap::Args)]
pub struct Args {
    /// rn18-small (ResNet-18 small stem, 2x28+4x16, batch 64) or rn50 (ResNet-50, 2x224+6x96, batch 8).
    #[arg(long, default_value = "rn50")]
    preset: String,
    /// Convolution algorithms, as for `bench step` (measured: planned here first).
    #[arg(long, default_value = "measured")]
    conv: String,
    /// What im2col's products multiply: fp32, or bf16 (factors rounded, fp32 sums; needs AVX512_BF16
    /// to be fast).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Timed repetitions of each pass (the best is kept, after one untimed run).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// A Python with torch: also time each shape in PyTorch and print the ratios.
    #[arg(long)]
    python: Option<PathBuf>,
}

/// One distinct layer shape: its geometry at the step's batch, how many layers of the step have it, and
/// whether one of them is a network's first layer (which needs no data gradient).
struct Layer {
    g: ConvGeom,
    count: usize,
    first: bool,
}

fn layers(preset: &str) -> anyhow::Result<Vec<Layer>> {
    let s = super::step::preset(preset)?;
    let cfg = ModelConfig { arch: Arch::parse(&s.arch)?, small_stem: s.small_stem, ..ModelConfig::swav_resnet50() };
    let model = SwavModel::new(cfg, 0)?;
    let mut by_geom: BTreeMap<(usize, ConvShape), Layer> = BTreeMap::new();
    for &(n, size) in &s.crops {
        for (i, g) in model.conv_geometries(n * s.batch, size, size)?.into_iter().enumerate() {
            let layer = by_geom.entry((g.n, ConvShape::from(&g))).or_insert(Layer { g, count: 0, first: false });
            layer.count += 1;
            layer.first |= i == 0;
        }
    }
    Ok(by_geom.into_values().collect())
}

/// Best-of-`reps` seconds of `f` after one untimed run.
fn best_of(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Seconds of forward, weight gradient and data gradient of one layer.
fn time_layer(l: &Layer, algo: ConvAlgorithm, precision: MulPrecision, reps: usize) -> anyhow::Result<[f64; 3]> {
    let g = l.g;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let x = Tensor::from_vec(&[g.n, g.h, g.w, g.cin], super::random_values(g.n * g.h * g.w * g.cin, &mut seed))?;
    let w =
        Tensor::from_vec(&[g.cout, g.kh, g.kw, g.cin], super::random_values(g.cout * g.kh * g.kw * g.cin, &mut seed))?;
    let dy = Tensor::from_vec(&g.out_shape(), super::random_values(g.out_pixels() * g.cout, &mut seed))?;
    let mut dw = Tensor::zeros(w.shape(), x.device());
    let p = ConvParams { stride: g.stride, pad: g.pad, algo, precision };
    let fwd = best_of(reps, || conv2d_forward(&x, &w, p).map(drop).map_err(Into::into))?;
    let wgrad = best_of(reps, || conv2d_backward(&x, &w, &dy, p, &mut dw, false).map(drop).map_err(Into::into))?;
    let both = best_of(reps, || conv2d_backward(&x, &w, &dy, p, &mut dw, true).map(drop).map_err(Into::into))?;
    Ok([fwd, wgrad, if l.first { 0.0 } else { (both - wgrad).max(0.0) }])
}

/// PyTorch's seconds of the three passes for each layer, in order.
fn torch_times(py: &PathBuf, layers: &[Layer], reps: usize) -> anyhow::Result<Vec<[f64; 3]>> {
    let shapes: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let g = l.g;
            serde_json::json!({"n": g.n, "h": g.h, "w": g.w, "cin": g.cin, "cout": g.cout, "k": g.kh,
                               "stride": g.stride, "pad": g.pad, "first": l.first})
        })
        .collect();
    let local = PathBuf::from("benches/python/conv_layers.py");
    let script = if local.is_file() {
        local
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/python/conv_layers.py")
    };
    let out = Command::new(py)
        .arg(&script)
        .args(["--threads", &swav_tensor::Device::Cpu.threads().to_string(), "--reps", &reps.to_string()])
        .args(["--shapes", &serde_json::Value::Array(shapes).to_string()])
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!("the PyTorch layers failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim().lines().last().unwrap_or("")).context("reading the PyTorch layers' JSON")?;
    let rows = v["seconds"].as_array().context("seconds")?;
    if rows.len() != layers.len() {
        bail!("PyTorch timed {} shapes, expected {}", rows.len(), layers.len());
    }
    rows.iter()
        .map(|r| {
            let t = |i: usize| r[i].as_f64().context("a time");
            Ok([t(0)?, t(1)?, t(2)?])
        })
        .collect()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut algo: ConvAlgorithm = a.conv.parse().map_err(anyhow::Error::msg)?;
    let precision = super::step::cpu_precision(&a.precision)?;
    let layers = layers(&a.preset)?;
    super::print_cpu();
    super::print_peak();
    if algo == ConvAlgorithm::Measured {
        let geoms: Vec<ConvGeom> = layers.iter().map(|l| l.g).collect();
        algo = ConvAlgorithm::Planned(conv_plan::measure(&geoms, precision)?.0.leak());
    }
    let theirs = a.python.as_ref().map(|py| torch_times(py, &layers, a.reps)).transpose()?;
    println!(
        "{:<28} {:>5} {:<11} {:>8} {:>8} {:>8} {:>9} {:>7}{}",
        "shape (n, hxw, cin->cout)",
        "count",
        "kernel",
        "fwd ms",
        "wgrad ms",
        "dgrad ms",
        "step ms",
        "GFLOP/s",
        if theirs.is_some() { "   torch fwd/wgrad/dgrad ms   step ms  ratio" } else { "" }
    );
    let (mut ours_total, mut theirs_total, mut flops_total) = (0.0, 0.0, 0.0);
    for (i, l) in layers.iter().enumerate() {
        let g = l.g;
        let t = time_layer(l, algo, precision, a.reps)?;
        let kernel = match winograd::choose(&g, algo) {
            Some(v) => format!("winograd-f{}", v.m),
            None => "im2col".to_string(),
        };
        let step = t.iter().sum::<f64>() * l.count as f64;
        let flops = 2.0 * g.macs() as f64 * if l.first { 2.0 } else { 3.0 } * l.count as f64;
        ours_total += step;
        flops_total += flops;
        let shape = format!("{}, {}x{}, {}->{} {}x{}/{}", g.n, g.h, g.w, g.cin, g.cout, g.kh, g.kw, g.stride);
        let mut line = format!(
            "{shape:<28} {:>5} {kernel:<11} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>7.1}",
            l.count,
            t[0] * 1e3,
            t[1] * 1e3,
            t[2] * 1e3,
            step * 1e3,
            flops / step / 1e9
        );
        if let Some(theirs) = &theirs {
            let p = theirs[i];
            let their_step = p.iter().sum::<f64>() * l.count as f64;
            theirs_total += their_step;
            line += &format!(
                "   {:>6.1} {:>6.1} {:>6.1}   {:>8.1}  {:>4.2}x",
                p[0] * 1e3,
                p[1] * 1e3,
                p[2] * 1e3,
                their_step * 1e3,
                their_step / step
            );
        }
        println!("{line}");
    }
    let peak = super::peak_gflops().map_or(String::new(), |(p, how)| {
        format!(" ({:.0}% of the {how} {p:.0} GFLOP/s peak)", 100.0 * flops_total / ours_total / 1e9 / p)
    });
    println!(
        "swav-rs convolutions: {:.1} ms per step, {:.1} GFLOP/s{peak}",
        ours_total * 1e3,
        flops_total / ours_total / 1e9
    );
    if theirs.is_some() {
        println!(
            "PyTorch convolutions: {:.1} ms per step, {:.1} GFLOP/s; ratio {:.2}x",
            theirs_total * 1e3,
            flops_total / theirs_total / 1e9,
            theirs_total / ours_total
        );
    }
    Ok(())
}
