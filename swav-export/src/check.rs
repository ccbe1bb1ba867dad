//! Check data: random input images and swav-model's own evaluation-mode outputs for them, as `.npy`
//! files named after the ONNX graph's input and outputs (`images.npy`, `features.npy`,
//! `embedding.npy`, `scores.npy`, ...). Any runtime can then be checked against the reference:
//! `scripts/onnx_check.py` does it with onnxruntime.
//! The `.npy` files are written and read with swav-core's codec.

use std::path::{Path, PathBuf};

use swav_core::layout::nchw_to_nhwc;
use swav_core::npy;
use swav_core::rng::SplitMix64;
use swav_model::SwavModel;
use swav_tensor::Tensor;

use crate::export::{output_names, INPUT_NAME};
use crate::{ExportError, Result};

/// A named float32 array, C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedArray {
    /// The ONNX value name (graph input or output) the array belongs to.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them, row-major.
    pub data: Vec<f32>,
}

/// Standard-normal images `[n, c, size, size]` (NCHW, like normalised pixels), reproducible from `seed`.
pub fn random_images(n: usize, channels: usize, size: usize, seed: u64) -> NamedArray {
    let mut rng = SplitMix64::from_key(&[seed, 0x494d_4147_4553]);
    let data = (0..n * channels * size * size).map(|_| rng.normal() as f32).collect();
    NamedArray { name: INPUT_NAME.into(), shape: vec![n, channels, size, size], data }
}

/// swav-model's evaluation-mode outputs for NCHW `images`, named as the ONNX graph's outputs.
pub fn reference_outputs(model: &SwavModel, images: &NamedArray, with_head: bool) -> Result<Vec<NamedArray>> {
    let &[n, c, h, w] = images.shape.as_slice() else {
        return Err(ExportError::Options(format!("images must be NCHW, got shape {:?}", images.shape)));
    };
    let x = Tensor::from_vec(&[n, h, w, c], nchw_to_nhwc([n, c, h, w], &images.data))
        .map_err(swav_model::ModelError::from)?;
    let names = output_names(model, with_head);
    let arr = |name: &str, t: Tensor| NamedArray { name: name.into(), shape: t.shape().to_vec(), data: t.into_vec() };
    if !with_head {
        return Ok(vec![arr(&names[0], model.features(&x)?)]);
    }
    let (features, out) = model.forward_eval(&x)?;
    let mut all = vec![arr(&names[0], features), arr(&names[1], out.embedding)];
    all.extend(out.scores.into_iter().zip(&names[2..]).map(|(t, name)| arr(name, t)));
    Ok(all)
}

/// Writes `images.npy` and one `.npy` per output into `dir` (created if needed); returns the paths.
pub fn write_check_data(
    dir: &Path,
    model: &SwavModel,
    with_head: bool,
    batch: usize,
    size: usize,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Write { path: dir.display().to_string(), source })?;
    let images = random_images(batch, model.config.in_channels, size, seed);
    let outputs = reference_outputs(model, &images, with_head)?;
    let mut paths = Vec::new();
    for a in std::iter::once(&images).chain(&outputs) {
        let path = dir.join(format!("{}.npy", a.name));
        npy::write(&path, &a.shape, &a.data)
            .map_err(|e| ExportError::CheckData { path: path.display().to_string(), detail: e.to_string() })?;
        paths.push(path);
    }
    Ok(paths)
}

/// Reads a float32, C-order `.npy` file (what [`write_check_data`] writes), named after its file stem.
pub fn read_npy(path: &Path) -> Result<NamedArray> {
    let (shape, data) = npy::read::<f32>(path)
        .map_err(|e| ExportError::CheckData { path: path.display().to_string(), detail: e.to_string() })?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(NamedArray { name, shape, data })
}
