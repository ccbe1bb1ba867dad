//! A case file as the runners of each kind read it: metadata, input tensors, the model it describes;
//! and the one-ulp perturbation of its inputs that measures float32 conditioning (see `judge`).

use std::path::Path;

use swav_model::checkpoint::{NamedTensors, Value};
use swav_model::{Arch, ModelConfig};
use swav_tensor::{Device, Tensor};

use crate::judge::Reference;
use crate::ReferenceError;

/// One run's view of a case file: the file itself, or its perturbed copy.
pub(crate) struct Case<'a> {
    pub path: &'a Path,
    pub file: &'a NamedTensors,
    /// Where the network runs.
    pub device: Device,
}

impl Case<'_> {
    pub fn err(&self, detail: impl Into<String>) -> ReferenceError {
        ReferenceError::Case { path: self.path.display().to_string(), detail: detail.into() }
    }

    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<T, ReferenceError> {
        let raw = self.file.metadata.get(key).ok_or_else(|| self.err(format!("metadata `{key}` missing")))?;
        raw.trim().parse().map_err(|_| self.err(format!("metadata `{key}` = `{raw}` is not valid")))
    }

    /// A metadata flag: `true`/`1` or `false`/`0`; `default` when the key is absent.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ReferenceError> {
        match self.file.metadata.get(key).map(|v| v.trim()) {
            None => Ok(default),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(self.err(format!("metadata `{key}` = `{other}` is not true/false"))),
        }
    }

    /// A comma-separated metadata list (`"0,1"`, `"0.05,0.18"`).
    pub fn meta_list<T: std::str::FromStr>(&self, key: &str) -> Result<Vec<T>, ReferenceError> {
        let raw: String = self.meta(key)?;
        raw.split(',').map(|s| s.trim().parse().map_err(|_| self.err(format!("metadata `{key}` = `{raw}`")))).collect()
    }

    pub fn tensor(&self, name: &str) -> Result<(&[usize], &[f32]), ReferenceError> {
        self.file.f32(name).map_err(|e| self.err(e.to_string()))
    }

    /// The resolution of every crop, in order, from `crops` = "2x64,2x32".
    pub fn crop_sizes(&self) -> Result<Vec<usize>, ReferenceError> {
        let crops: String = self.meta("crops")?;
        let mut sizes = Vec::new();
        for part in crops.split(',') {
            let parsed = part.split_once('x').and_then(|(n, s)| Some((n.trim().parse().ok()?, s.trim().parse().ok()?)));
            let (count, size): (usize, usize) = parsed.ok_or_else(|| self.err(format!("crops `{crops}`")))?;
            sizes.extend(std::iter::repeat_n(size, count));
        }
        Ok(sizes)
    }

    /// The crops `{prefix}crop{i}` (`[batch, channels, size, size]` in the file) as the model's input:
    /// one NHWC tensor per run of equal resolution, the run's crops concatenated along the batch
    /// (crop-major), on the case's device.
    pub fn crop_groups(&self, prefix: &str, sizes: &[usize], batch: usize) -> Result<Vec<Tensor>, ReferenceError> {
        let crops = (0..sizes.len())
            .map(|i| {
                let name = format!("{prefix}crop{i}");
                let (shape, data) = self.tensor(&name)?;
                if shape.len() != 4 || shape[0] != batch || shape[2] != sizes[i] || shape[3] != sizes[i] {
                    return Err(self.err(format!("{name} has shape {shape:?}, not [{batch}, c, {0}, {0}]", sizes[i])));
                }
                nchw_to_nhwc(shape, data)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut groups = Vec::new();
        let mut start = 0;
        while start < crops.len() {
            let end = (start..crops.len()).find(|&i| sizes[i] != sizes[start]).unwrap_or(crops.len());
            groups.push(Tensor::cat(&crops[start..end].iter().collect::<Vec<_>>())?.to_device(self.device)?);
            start = end;
        }
        Ok(groups)
    }

    /// The network the case describes, for `in_channels` input channels. `width`, `small_stem` and
    /// `head_bn` are optional keys (the official ResNet's width, its stem, and a BatchNorm in the
    /// head by default).
    pub fn model_config(&self, in_channels: usize) -> Result<ModelConfig, ReferenceError> {
        let (eps, momentum): (f32, f32) = (self.meta("bn_eps")?, self.meta("bn_momentum")?);
        if (eps - 1e-5).abs() > 1e-12 || (momentum - 0.1).abs() > 1e-9 {
            return Err(
                self.err(format!("batch norm eps {eps} / momentum {momentum}: only PyTorch's defaults are modelled"))
            );
        }
        let width = match self.file.metadata.get("width") {
            Some(_) => Some(self.meta("width")?),
            None => None,
        };
        Ok(ModelConfig {
            arch: Arch::parse(&self.meta::<String>("arch")?)?,
            width,
            small_stem: self.flag("small_stem", false)?,
            in_channels,
            hidden_mlp: self.meta("hidden_mlp")?,
            head_bn: self.flag("head_bn", true)?,
            feat_dim: self.meta("feat_dim")?,
            prototypes: vec![self.meta("prototypes")?],
            sync_bn: false,
            sync_bn_group: 0,
        })
    }
}

impl Reference for Case<'_> {
    fn tensor(&self, name: &str) -> Option<Vec<f64>> {
        self.file.f32(name).ok().map(|(_, d)| d.iter().map(|&v| v as f64).collect())
    }
}

fn nchw_to_nhwc(shape: &[usize], data: &[f32]) -> Result<Tensor, ReferenceError> {
    let &[n, c, h, w] = shape else {
        return Err(ReferenceError::Input(format!("an input crop of shape {shape:?} is not NCHW")));
    };
    Ok(Tensor::from_vec(&[n, h, w, c], swav_core::layout::nchw_to_nhwc([n, c, h, w], data))?)
}

/// The case with every non-zero value of its inputs (`param.*`, `input.*`) moved by `ulps` units in
/// the last place, up or down in magnitude by a pseudo-random choice fixed by `pattern` (the same
/// pattern with `-ulps` moves every value the other way). Zeros stay zero: a float64 zero is stored
/// exactly.
pub(crate) fn perturbed(file: &NamedTensors, ulps: i64, pattern: u64) -> NamedTensors {
    let mut out = file.clone();
    for (name, value) in out.tensors.iter_mut() {
        let Value::F32 { data, .. } = value else { continue };
        if !(name.starts_with("param.") || name.starts_with("input.")) {
            continue;
        }
        let seed = splitmix(pattern ^ 0x9e37_79b9_7f4a_7c15);
        let mut state = name.bytes().fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        for v in data.iter_mut() {
            state = splitmix(state);
            if *v == 0.0 || !v.is_finite() {
                continue;
            }
            // Adjacent bit patterns are adjacent floats of the same sign: +-1 is one ulp in magnitude.
            let bits = v.to_bits();
            let step = if state >> 63 == 1 { ulps } else { -ulps };
            let moved = f32::from_bits((bits as i64 + step).clamp(0, u32::MAX as i64) as u32);
            if moved.is_finite() && moved != 0.0 && moved.is_sign_negative() == v.is_sign_negative() {
                *v = moved;
            }
        }
    }
    out
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturbation_moves_inputs_by_whole_ulps_both_ways_and_nothing_else() {
        let mut file = NamedTensors::default();
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        for name in ["param.w", "input.crop0", "expect.loss"] {
            file.tensors.insert(name.into(), Value::F32 { shape: vec![64], data: values.clone() });
        }
        let (p, q) = (perturbed(&file, 4, 0), perturbed(&file, -4, 0));
        let (mut up, mut down) = (0, 0);
        for name in ["param.w", "input.crop0"] {
            let (_, moved) = p.f32(name).unwrap();
            let (_, other_way) = q.f32(name).unwrap();
            for ((&a, &b), &c) in values.iter().zip(moved).zip(other_way) {
                if a == 0.0 {
                    assert_eq!((b, c), (0.0, 0.0));
                    continue;
                }
                let ulps = b.to_bits() as i64 - a.to_bits() as i64;
                assert_eq!(ulps.abs(), 4, "{a} -> {b}");
                assert_eq!(c.to_bits() as i64 - a.to_bits() as i64, -ulps, "{a}: -4 ulps is the other way");
                if b.abs() > a.abs() {
                    up += 1;
                } else {
                    down += 1;
                }
            }
        }
        assert!(up > 30 && down > 30, "directions should be mixed: {up} up, {down} down");
        assert_eq!(p.f32("expect.loss").unwrap().1, values.as_slice());
        assert_ne!(perturbed(&file, 4, 1).f32("param.w").unwrap().1, p.f32("param.w").unwrap().1);
    }
}
