//! Test helpers: reference-case loading, an independent f64 implementation, random inputs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A reference case: metadata and f32 tensors by name.
pub struct Case {
    pub path: PathBuf,
    pub meta: HashMap<String, String>,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Case {
    pub fn load(path: &Path) -> Case {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name} in {}", path.display());
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Case { path: path.to_path_buf(), meta, tensors }
    }

    pub fn param<T: std::str::FromStr>(&self, key: &str) -> T {
        self.meta
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: metadata `{key}` missing or malformed", self.path.display()))
    }

    pub fn tensor(&self, name: &str) -> &[f32] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", self.path.display())).1
    }
}

/// The Sinkhorn reference cases shipped with this crate (PyTorch, float64; see `tests/cases/README.md`):
/// in the checkout named by `$SWAV_SOURCE_DIR` when set (prebuilt test binaries run on another machine,
/// as `scripts/gpu-check.sh` does), else in the source tree the test was built from.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("SWAV_SOURCE_DIR") {
        Some(root) => Path::new(&root).join("swav-sinkhorn/tests/cases"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases"),
    }
}

/// Every case of kind `sinkhorn` in [`reference_dir`] and `$SWAV_REFERENCE_DIR`.
pub fn sinkhorn_cases() -> Vec<Case> {
    let mut dirs = vec![reference_dir()];
    if let Some(extra) = std::env::var_os("SWAV_REFERENCE_DIR") {
        dirs.push(PathBuf::from(extra));
    }
    let mut cases = Vec::new();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        for f in files {
            let case = Case::load(&f);
            if case.meta.get("kind").map(String::as_str) == Some("sinkhorn") {
                cases.push(case);
            }
        }
    }
    cases
}

/// The official algorithm in f64, on all ranks' rows stacked (which is what the distributed version
/// computes), as a plain K x B matrix. Scores are shifted by their global maximum first: a single
/// constant, which the official total-sum normalisation cancels exactly.
pub fn oracle(scores: &[f32], rows: usize, k: usize, eps: f64, iterations: usize) -> Vec<f64> {
    let b = rows;
    let top = scores.iter().fold(f64::MIN, |a, &s| a.max(s as f64));
    let mut q = vec![0f64; k * b]; // K x B
    for i in 0..b {
        for j in 0..k {
            q[j * b + i] = ((scores[i * k + j] as f64 - top) / eps).exp();
        }
    }
    let total: f64 = q.iter().sum();
    q.iter_mut().for_each(|x| *x /= total);
    for _ in 0..iterations {
        for j in 0..k {
            let row = &mut q[j * b..(j + 1) * b];
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s * k as f64);
        }
        for i in 0..b {
            let s: f64 = (0..k).map(|j| q[j * b + i]).sum();
            (0..k).for_each(|j| q[j * b + i] /= s * b as f64);
        }
    }
    let mut out = vec![0f64; b * k];
    for i in 0..b {
        for j in 0..k {
            out[i * k + j] = q[j * b + i] * b as f64;
        }
    }
    out
}

pub fn relative_error_f64(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        d += (g as f64 - w).powi(2);
        n += w * w;
    }
    (d / n).sqrt()
}

/// Uniform in [-scale, scale), deterministic.
pub fn random_scores(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Cosine-like scores: rows of unit vectors against unit prototypes, in [-1, 1].
pub fn cosine_scores(rows: usize, k: usize, dim: usize, seed: u64) -> Vec<f32> {
    let unit = |n: usize, seed: u64| {
        let mut v = random_scores(n * dim, seed, 1.0);
        for row in v.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    };
    let z = unit(rows, seed);
    let c = unit(k, seed + 1);
    let mut s = vec![0f32; rows * k];
    for i in 0..rows {
        for j in 0..k {
            s[i * k + j] = (0..dim).map(|d| z[i * dim + d] * c[j * dim + d]).sum::<f32>().clamp(-1.0, 1.0);
        }
    }
    s
}

pub fn assert_valid_assignments(q: &[f32], k: usize, what: &str) {
    assert!(q.iter().all(|x| x.is_finite() && *x >= 0.0), "{what}: non-finite or negative entries");
    for (i, row) in q.chunks(k).enumerate() {
        let s: f64 = row.iter().map(|&x| x as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "{what}: row {i} sums to {s}");
    }
}
