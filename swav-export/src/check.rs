//! Check data: random input images and swav-model's own evaluation-mode outputs for them, as `.npy`
//! files named after the ONNX graph's input and outputs (`images.npy`, `features.npy`,
//! `embedding.npy`, `scores.npy`, ...). Any runtime can then be checked against the reference:
//! `scripts/onnx_check.py` does it with onnxruntime.
//!
//! `.npy` is NumPy's format version 1.0: magic, a Python-dict header padded to a multiple of 64 bytes,
//! then little-endian float32 values in C order.

use std::path::{Path, PathBuf};

use swav_model::SwavModel;
use swav_tensor::Tensor;

use crate::export::{output_names, INPUT_NAME};
use crate::{ExportError, Result};

/// A named float32 array, C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedArray {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Standard-normal images `[n, c, size, size]` (NCHW, like normalised pixels), reproducible from `seed`.
pub fn random_images(n: usize, channels: usize, size: usize, seed: u64) -> NamedArray {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        // splitmix64 -> (0, 1]
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let len = n * channels * size * size;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        // Box-Muller.
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        data.push((r * t.cos()) as f32);
        data.push((r * t.sin()) as f32);
    }
    data.truncate(len);
    NamedArray {
        name: INPUT_NAME.into(),
        shape: vec![n, channels, size, size],
        data,
    }
}

/// NCHW -> NHWC.
pub fn nchw_to_nhwc(shape: &[usize], data: &[f32]) -> Vec<f32> {
    let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((b * h + y) * w + x) * c + ch] = data[((b * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// swav-model's evaluation-mode outputs for NCHW `images`, named as the ONNX graph's outputs.
pub fn reference_outputs(
    model: &SwavModel,
    images: &NamedArray,
    with_head: bool,
) -> Result<Vec<NamedArray>> {
    let &[n, c, h, w] = images.shape.as_slice() else {
        return Err(ExportError::Options(format!(
            "images must be NCHW, got shape {:?}",
            images.shape
        )));
    };
    let x = Tensor::from_vec(&[n, h, w, c], nchw_to_nhwc(&images.shape, &images.data))
        .map_err(swav_model::ModelError::from)?;
    let names = output_names(model, with_head);
    let arr = |name: &str, t: Tensor| NamedArray {
        name: name.into(),
        shape: t.shape().to_vec(),
        data: t.into_vec(),
    };
    if !with_head {
        return Ok(vec![arr(&names[0], model.features(&x)?)]);
    }
    let (features, out) = model.forward_eval(&x)?;
    let mut all = vec![arr(&names[0], features), arr(&names[1], out.embedding)];
    all.extend(
        out.scores
            .into_iter()
            .zip(&names[2..])
            .map(|(t, name)| arr(name, t)),
    );
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
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let images = random_images(batch, model.config.in_channels, size, seed);
    let outputs = reference_outputs(model, &images, with_head)?;
    let mut paths = Vec::new();
    for a in std::iter::once(&images).chain(&outputs) {
        let path = dir.join(format!("{}.npy", a.name));
        crate::write_atomic(&path, &npy_bytes(a))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The `.npy` (version 1.0) encoding of a float32 array.
pub fn npy_bytes(a: &NamedArray) -> Vec<u8> {
    let shape = match a.shape.as_slice() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64,
    // ending in a newline.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.extend(std::iter::repeat_n(' ', total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + 4 * a.data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(a.data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Reads a little-endian float32, C-order `.npy` file (what [`npy_bytes`] writes).
pub fn read_npy(path: &Path) -> Result<NamedArray> {
    let bad = |detail: String| ExportError::CheckData {
        path: path.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" || bytes[6] != 1 {
        return Err(bad("not a version 1 .npy file".into()));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header".into()))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad(format!(
            "only little-endian float32 in C order is read, header {header:?}"
        )));
    }
    let shape_str = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape".into()))?;
    let shape = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| bad(format!("shape: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let body = &bytes[10 + hlen..];
    if body.len() != 4 * shape.iter().product::<usize>() {
        return Err(bad(format!(
            "{} data bytes for shape {shape:?}",
            body.len()
        )));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(NamedArray { name, shape, data })
}
