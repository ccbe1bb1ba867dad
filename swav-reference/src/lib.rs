//! Runs the PyTorch reference cases (safetensors files with a `kind` in their metadata: `sinkhorn`,
//! `swav_loss`, `swav_model`) through our implementation and reports the relative L2 error of every
//! tensor against its tolerance. Used by `cargo xtask verify-reference` and by the test suite.
//!
//! float32 conditioning: on a few tensors PyTorch's own float32 run of a case misses the README's
//! tolerance (a bias feeding a BatchNorm has a mathematically zero gradient; gradient sums that
//! cancel in the first layers amplify float32 rounding). `cases/float32_baseline.json`, written by
//! `scripts/make_cases.py --baseline`, records PyTorch's float32 error on every tensor of a
//! case; a tensor over the tolerance still passes when our error is at most
//! [`BASELINE_FACTOR`] times PyTorch's, and the report says so.

use std::collections::BTreeMap;
use std::path::Path;

use swav_model::checkpoint::{load_model_state, model_grads, model_state, LoadOptions, NamedTensors, Value};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::Tensor;

use swav_train::assign::codes_for_crop;
use swav_train::loss::swapped_prediction_loss;

pub use error::ReferenceError;

mod error;

/// Tolerances of the reference README (relative L2 error).
pub const TOL_SINKHORN: f64 = 1e-5;
pub const TOL_VALUES: f64 = 1e-4;
pub const TOL_PARAM_GRADS: f64 = 1e-3;

/// How much larger than PyTorch's own float32 error ours may be on a tensor over the tolerance.
pub const BASELINE_FACTOR: f64 = 2.0;

const FLOAT32_BASELINE: &str = include_str!("../cases/float32_baseline.json");

/// One compared tensor.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tol: f64,
    /// PyTorch's own float32 error on this tensor, when recorded.
    pub float32_baseline: Option<f64>,
}

impl Check {
    /// Within the tolerance, or no worse than [`BASELINE_FACTOR`] x PyTorch float32. NaN fails.
    pub fn pass(&self) -> bool {
        self.rel_err < self.tol || self.float32_baseline.is_some_and(|b| self.rel_err <= BASELINE_FACTOR * b)
    }

    /// Passing only thanks to the float32 baseline.
    pub fn by_baseline(&self) -> bool {
        self.pass() && self.rel_err >= self.tol
    }
}

/// PyTorch's float32 errors for the case at `path`, if recorded for a file of this name, size and loss.
fn float32_baseline(path: &Path, file: &NamedTensors) -> BTreeMap<String, f64> {
    let Ok(table) = serde_json::from_str::<serde_json::Value>(FLOAT32_BASELINE) else { return BTreeMap::new() };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let Some(entry) = table.get(&name) else { return BTreeMap::new() };
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let loss = file.f32("expect.loss").ok().and_then(|(_, d)| d.first().copied());
    let same_file = entry.get("bytes").and_then(|b| b.as_u64()) == Some(bytes)
        && entry.get("loss").and_then(|l| l.as_f64()).map(|l| l as f32) == loss;
    if !same_file {
        return BTreeMap::new();
    }
    entry
        .get("errors")
        .and_then(|e| e.as_object())
        .map(|e| e.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
        .unwrap_or_default()
}

#[derive(Clone, Debug)]
pub struct CaseReport {
    pub kind: String,
    pub checks: Vec<Check>,
}

impl CaseReport {
    pub fn pass(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(Check::pass)
    }
}

/// `||got - want|| / ||want||` in f64; infinite on a length mismatch or a non-finite value.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

struct Case<'a> {
    path: &'a Path,
    file: NamedTensors,
    baseline: BTreeMap<String, f64>,
    checks: Vec<Check>,
}

impl Case<'_> {
    fn err(&self, detail: impl Into<String>) -> ReferenceError {
        ReferenceError::Case { path: self.path.display().to_string(), detail: detail.into() }
    }

    fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<T, ReferenceError> {
        let raw = self.file.metadata.get(key).ok_or_else(|| self.err(format!("metadata `{key}` missing")))?;
        raw.trim().parse().map_err(|_| self.err(format!("metadata `{key}` = `{raw}` is not valid")))
    }

    fn meta_list(&self, key: &str) -> Result<Vec<usize>, ReferenceError> {
        let raw: String = self.meta(key)?;
        raw.split(',').map(|s| s.trim().parse().map_err(|_| self.err(format!("metadata `{key}` = `{raw}`")))).collect()
    }

    fn expect(&self, name: &str) -> Result<&[f32], ReferenceError> {
        self.file.f32(name).map(|(_, d)| d).map_err(|e| self.err(e.to_string()))
    }

    fn compare(&mut self, name: &str, got: &[f32], tol: f64) -> Result<(), ReferenceError> {
        let rel_err = relative_error(got, self.expect(name)?);
        let float32_baseline = self.baseline.get(name).copied();
        self.checks.push(Check { name: name.to_string(), rel_err, tol, float32_baseline });
        Ok(())
    }
}

/// Runs one reference case file.
pub fn verify_case(path: &Path) -> Result<CaseReport, ReferenceError> {
    let file = NamedTensors::read(path)?;
    let baseline = float32_baseline(path, &file);
    let mut case = Case { path, file, baseline, checks: Vec::new() };
    let kind: String = case.meta("kind")?;
    match kind.as_str() {
        "sinkhorn" => sinkhorn_case(&mut case)?,
        "swav_loss" => loss_case(&mut case)?,
        "swav_model" => model_case(&mut case)?,
        other => return Err(case.err(format!("unknown kind `{other}`"))),
    }
    Ok(CaseReport { kind, checks: case.checks })
}

fn sinkhorn_params(case: &Case<'_>) -> Result<swav_sinkhorn::Params, ReferenceError> {
    Ok(swav_sinkhorn::Params::new(case.meta("epsilon")?, case.meta("iterations")?))
}

fn sinkhorn_case(case: &mut Case<'_>) -> Result<(), ReferenceError> {
    let metadata: std::collections::HashMap<String, String> = case.file.metadata.clone().into_iter().collect();
    let file = &case.file;
    let errors = swav_sinkhorn::reference::verify_case(&metadata, |name| file.f32(name).ok().map(|(_, d)| d.to_vec()))
        .map_err(|e| case.err(e.to_string()))?;
    for (name, rel_err) in errors {
        let float32_baseline = case.baseline.get(&name).copied();
        case.checks.push(Check { name, rel_err, tol: TOL_SINKHORN, float32_baseline });
    }
    Ok(())
}

fn loss_case(case: &mut Case<'_>) -> Result<(), ReferenceError> {
    let (batch, crops, k): (usize, usize, usize) = (case.meta("batch")?, case.meta("crops")?, case.meta("prototypes")?);
    let assign = case.meta_list("crops_for_assign")?;
    let queue: usize = case.meta("queue")?;
    let temperature: f32 = case.meta("temperature")?;
    let params = sinkhorn_params(case)?;
    let scores = case.expect("input.scores")?.to_vec();
    let mut codes = Vec::new();
    for (j, &a) in assign.iter().enumerate() {
        let queue_scores =
            if queue > 0 { Some(case.expect(&format!("input.queue_scores.{j}"))?.to_vec()) } else { None };
        let crop = &scores[a * batch * k..(a + 1) * batch * k];
        codes.push(codes_for_crop(crop, queue_scores.as_deref(), batch, k, &params)?);
    }
    for (j, q) in codes.iter().enumerate() {
        case.compare(&format!("expect.codes.{j}"), q, TOL_VALUES)?;
    }
    let out = swapped_prediction_loss(&scores, k, batch, crops, &assign, &codes, temperature)?;
    case.compare("expect.loss", &[out.loss as f32], TOL_VALUES)?;
    case.compare("expect.grad.scores", &out.dscores, TOL_VALUES)?;
    Ok(())
}

fn nchw_to_nhwc(shape: &[usize], data: &[f32]) -> Result<Tensor, ReferenceError> {
    let &[n, c, h, w] = shape else {
        return Err(ReferenceError::Input(format!("an input crop of shape {shape:?} is not NCHW")));
    };
    Ok(Tensor::from_vec(&[n, h, w, c], swav_core::layout::nchw_to_nhwc([n, c, h, w], data))?)
}

/// The model cases check the network's arithmetic against PyTorch's float32 semantics, so they run
/// with direct (im2col) convolutions; Winograd's own accuracy is tested op by op against float64
/// direct loops (swav-tensor's tests).
fn model_case(case: &mut Case<'_>) -> Result<(), ReferenceError> {
    let batch: usize = case.meta("batch")?;
    let crops: String = case.meta("crops")?;
    let assign = case.meta_list("crops_for_assign")?;
    let temperature: f32 = case.meta("temperature")?;
    let params = sinkhorn_params(case)?;
    let (eps, momentum): (f32, f32) = (case.meta("bn_eps")?, case.meta("bn_momentum")?);
    if (eps - 1e-5).abs() > 1e-12 || (momentum - 0.1).abs() > 1e-9 {
        return Err(
            case.err(format!("batch norm eps {eps} / momentum {momentum}: only PyTorch's defaults are modelled"))
        );
    }
    // Crops: "2x64,2x32" -> resolution of each crop, in order.
    let mut sizes = Vec::new();
    for part in crops.split(',') {
        let (count, size) = part.split_once('x').ok_or_else(|| case.err(format!("crops `{crops}`")))?;
        let count: usize = count.parse().map_err(|_| case.err(format!("crops `{crops}`")))?;
        sizes.extend(std::iter::repeat_n(size.to_string(), count));
    }
    let (shape0, _) = case.file.f32("input.crop0").map_err(|e| case.err(e.to_string()))?;
    let config = ModelConfig {
        arch: Arch::parse(&case.meta::<String>("arch")?)?,
        width: case.file.metadata.get("width").and_then(|w| w.parse().ok()),
        small_stem: case.file.metadata.get("small_stem").is_some_and(|v| v == "1" || v == "true"),
        in_channels: shape0[1],
        hidden_mlp: case.meta("hidden_mlp")?,
        head_bn: true,
        feat_dim: case.meta("feat_dim")?,
        prototypes: vec![case.meta("prototypes")?],
    };
    let mut model = SwavModel::new(config, 0)?;
    load_model_state(&mut model, &case.file, "param.", LoadOptions::default())?;
    model.set_conv_algorithm(ConvAlgorithm::Direct);

    let crops: Vec<Tensor> = (0..sizes.len())
        .map(|i| {
            let (shape, data) = case.file.f32(&format!("input.crop{i}")).map_err(|e| case.err(e.to_string()))?;
            nchw_to_nhwc(shape, data)
        })
        .collect::<Result<_, ReferenceError>>()?;
    let features = model.features(&crops[0])?;
    case.compare("expect.eval_features", features.as_slice(), TOL_VALUES)?;

    // Runs of equal resolution, each concatenated along the batch (crop-major).
    let mut groups = Vec::new();
    let mut start = 0;
    while start < crops.len() {
        let end = (start..crops.len()).find(|&i| sizes[i] != sizes[start]).unwrap_or(crops.len());
        groups.push(Tensor::cat(&crops[start..end].iter().collect::<Vec<_>>())?);
        start = end;
    }
    let (out, acts) = model.forward_train(groups)?;
    case.compare("expect.embedding", out.embedding.as_slice(), TOL_VALUES)?;
    case.compare("expect.scores", out.scores[0].as_slice(), TOL_VALUES)?;
    let k = out.scores[0].dim(1);
    let scores = out.scores[0].as_slice();
    let codes = assign
        .iter()
        .map(|&a| codes_for_crop(&scores[a * batch * k..(a + 1) * batch * k], None, batch, k, &params))
        .collect::<Result<Vec<_>, _>>()?;
    let loss = swapped_prediction_loss(scores, k, batch, sizes.len(), &assign, &codes, temperature)?;
    case.compare("expect.loss", &[loss.loss as f32], TOL_VALUES)?;
    let dscores = Tensor::from_vec(out.scores[0].shape(), loss.dscores)?;
    model.backward(acts, &out, &[dscores])?;

    let grads = model_grads(&mut model);
    for (name, value) in &grads.tensors {
        let Value::F32 { data, .. } = value else { continue };
        case.compare(&format!("expect.grad.{name}"), data, TOL_PARAM_GRADS)?;
    }
    let state: BTreeMap<String, Value> = model_state(&mut model).tensors;
    let after: Vec<String> =
        case.file.tensors.keys().filter_map(|k| k.strip_prefix("expect.after.")).map(str::to_string).collect();
    for name in after {
        let Some(Value::F32 { data, .. }) = state.get(&name) else {
            return Err(case.err(format!("the model has no buffer `{name}`")));
        };
        case.compare(&format!("expect.after.{name}"), data, TOL_VALUES)?;
    }
    Ok(())
}
