//! The measured convolution plan of a run (`train.conv = "measured"`): measured once, when the run
//! starts, on the shapes its crops give every backbone convolution, and recorded in the run folder as
//! `conv-plan.json`. Every later start of the run (a resume, or the same run on another machine)
//! applies the recorded plan instead of measuring again, so that it computes the same bits; a run
//! whose plan file is gone is refused rather than silently re-planned.

use std::path::Path;

use serde::{Deserialize, Serialize};
use swav_model::SwavModel;
use swav_tensor::matmul::MulPrecision;
use swav_tensor::ops::conv_plan::{self, ConvKernel, ConvPlan, ConvShape};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::Device;

use crate::config::Config;
use crate::TrainError;

/// The plan's file in the run folder.
pub const FILE: &str = "conv-plan.json";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    /// Where it was measured (for the reader; not checked: a plan stays valid on another machine, only
    /// perhaps not the fastest there).
    cpu: String,
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// `[h, w, cin, cout, kh, kw, stride, pad]`
    shape: [usize; 8],
    kernel: String,
    /// Milliseconds of forward + both gradients per candidate, as measured (absent when written by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    measured_ms: Vec<(String, f64)>,
}

fn to_array(s: &ConvShape) -> [usize; 8] {
    [s.h, s.w, s.cin, s.cout, s.kh, s.kw, s.stride, s.pad]
}

fn from_array(a: [usize; 8]) -> ConvShape {
    let [h, w, cin, cout, kh, kw, stride, pad] = a;
    ConvShape { h, w, cin, cout, kh, kw, stride, pad }
}

/// Gives the model's convolutions the run's algorithm: `train.conv` itself, or for `measured` the plan
/// recorded in `run_dir` (measured and recorded now when the run is new).
pub fn apply(
    run_dir: &Path,
    config: &Config,
    model: &mut SwavModel,
    resumed: bool,
    device: Device,
) -> Result<(), TrainError> {
    let products = crate::trainer::cpu_products(config.train.precision, device)?;
    model.set_conv_precision(products);
    if config.train.conv != ConvAlgorithm::Measured {
        model.set_conv_algorithm(config.train.conv);
        return Ok(());
    }
    let path = run_dir.join(FILE);
    let plan = if path.exists() {
        let plan = load(&path)?;
        tracing::info!(
            "convolutions: the measured plan recorded in {} ({} shapes)",
            path.display(),
            plan.entries.len()
        );
        plan
    } else if resumed {
        return Err(TrainError::Config(format!(
            "train.conv = \"measured\" but {} is missing: the run's checkpoints were computed with the plan it held, \
             and a new measurement could choose other algorithms (other bits). Restore the file, or start a new run",
            path.display()
        )));
    } else if device.is_cuda() {
        // cuDNN chooses the CUDA device's algorithms; nothing to measure here.
        model.set_conv_algorithm(ConvAlgorithm::Measured);
        return Ok(());
    } else {
        let plan = measure(config, model, products)?;
        save(&path, &plan.1)?;
        plan.0
    };
    model.set_conv_algorithm(ConvAlgorithm::Planned(plan.leak()));
    Ok(())
}

/// Measures every backbone convolution shape of one training step of `config`.
pub fn measure(
    config: &Config,
    model: &SwavModel,
    products: MulPrecision,
) -> Result<(ConvPlan, Vec<conv_plan::Measurement>), TrainError> {
    let mut geoms = Vec::new();
    for g in &config.crops.groups {
        geoms.extend(model.conv_geometries(g.count * config.train.batch_size, g.size, g.size)?);
    }
    let started = std::time::Instant::now();
    let (plan, measured) = conv_plan::measure(&geoms, products)?;
    let count = |k: ConvKernel| plan.entries.iter().filter(|e| e.1 == k).count();
    tracing::info!(
        "convolutions: measured {} shapes in {:.1} s: im2col {}, Winograd F(2,3) {}, F(4,3) {}",
        plan.entries.len(),
        started.elapsed().as_secs_f64(),
        count(ConvKernel::Im2col),
        count(ConvKernel::WinogradF2),
        count(ConvKernel::WinogradF4)
    );
    Ok((plan, measured))
}

fn save(path: &Path, measured: &[conv_plan::Measurement]) -> Result<(), TrainError> {
    let file = PlanFile {
        cpu: format!("{} ({})", swav_core::sys::cpu_model(), swav_core::isa::available()),
        entries: measured
            .iter()
            .map(|m| Entry {
                shape: to_array(&m.shape),
                kernel: m.chosen.name().to_string(),
                measured_ms: m.seconds.iter().map(|(k, s)| (k.name().to_string(), s * 1e3)).collect(),
            })
            .collect(),
    };
    let text =
        serde_json::to_string_pretty(&file).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    swav_core::fs::atomic_write(path, text.as_bytes())?;
    Ok(())
}

/// Reads a recorded plan; a plan naming a kernel for a shape it cannot compute is refused.
pub fn load(path: &Path) -> Result<ConvPlan, TrainError> {
    let bad = |e: String| TrainError::Config(format!("{}: {e}", path.display()));
    // A plan holds one entry per layer shape: a few hundred bytes each.
    const MAX_BYTES: u64 = 1 << 22;
    let len = std::fs::metadata(path).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
    if len.len() > MAX_BYTES {
        return Err(bad(format!("{} bytes is too large for a convolution plan", len.len())));
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
    let file: PlanFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut entries = Vec::with_capacity(file.entries.len());
    for e in file.entries {
        let shape = from_array(e.shape);
        let kernel: ConvKernel = e.kernel.parse().map_err(bad)?;
        if !kernel.applies(&shape) {
            return Err(bad(format!("{kernel} cannot compute a convolution of shape {:?}", e.shape)));
        }
        entries.push((shape, kernel));
    }
    Ok(ConvPlan::from_entries(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(k: usize, stride: usize) -> ConvShape {
        ConvShape { h: 8, w: 8, cin: 32, cout: 32, kh: k, kw: k, stride, pad: k / 2 }
    }

    #[test]
    fn a_saved_plan_loads_back_and_a_corrupt_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let m = |s, k| conv_plan::Measurement {
            shape: s,
            n: 2,
            precision: MulPrecision::F32,
            seconds: vec![(k, 1e-3)],
            chosen: k,
        };
        save(&path, &[m(shape(3, 1), ConvKernel::WinogradF4), m(shape(1, 1), ConvKernel::Im2col)]).unwrap();
        let plan = load(&path).unwrap();
        assert_eq!(plan.kernel(&shape(3, 1)), Some(ConvKernel::WinogradF4));
        assert_eq!(plan.kernel(&shape(1, 1)), Some(ConvKernel::Im2col));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("im2col", "winograd-f2")).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("cannot compute"));
        std::fs::write(&path, text.replace("winograd-f4", "fft")).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("unknown convolution kernel"));
    }
}
