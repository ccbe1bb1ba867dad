//! Convolution algorithms chosen by measurement: for each layer shape, the fastest of im2col GEMM,
//! Winograd F(2,3) and F(4,3) on the machine at hand, timed over a whole training use (forward, weight
//! gradient and data gradient). Which one wins depends on the CPU (vector width, caches, the GEMM's
//! kernels), so fixed thresholds tuned on one CPU are wrong on another.
//!
//! A [`ConvPlan`] is plain data (shape -> kernel): a training run records it and a resume applies the
//! recorded plan instead of measuring again, because the algorithms differ in the last bits and a
//! resumed run must compute exactly what the original would have. Measurements are cached per process.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use super::conv::{conv2d_backward, conv2d_forward, ConvGeom, ConvParams};
use super::winograd::ConvAlgorithm;
use crate::matmul::MulPrecision;
use crate::{Result, Tensor};

/// One way to compute a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvKernel {
    /// im2col (or gather) GEMM: any shape.
    Im2col,
    /// Winograd F(2x2, 3x3): 3x3, stride 1, padding 1 only.
    WinogradF2,
    /// Winograd F(4x4, 3x3): 3x3, stride 1, padding 1 only.
    WinogradF4,
}

impl ConvKernel {
    /// Every kernel, in the order candidates are tried.
    pub const ALL: [ConvKernel; 3] = [ConvKernel::Im2col, ConvKernel::WinogradF2, ConvKernel::WinogradF4];

    /// The name in recorded plans.
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Im2col => "im2col",
            ConvKernel::WinogradF2 => "winograd-f2",
            ConvKernel::WinogradF4 => "winograd-f4",
        }
    }

    /// Whether this kernel can compute convolutions of shape `s`.
    pub fn applies(self, s: &ConvShape) -> bool {
        self == ConvKernel::Im2col || (s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1)
    }
}

impl fmt::Display for ConvKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ConvKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<ConvKernel, String> {
        ConvKernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown convolution kernel `{s}` (im2col, winograd-f2, winograd-f4)"))
    }
}

/// A layer shape as a plan keys it: everything of a [`ConvGeom`] but the batch size (a layer sees one
/// batch size per resolution, and the algorithms scale alike with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvShape {
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl From<&ConvGeom> for ConvShape {
    fn from(g: &ConvGeom) -> ConvShape {
        ConvShape { h: g.h, w: g.w, cin: g.cin, cout: g.cout, kh: g.kh, kw: g.kw, stride: g.stride, pad: g.pad }
    }
}

/// The kernel of each measured shape, sorted by shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConvPlan {
    /// `(shape, kernel)`, sorted by shape, one per shape.
    pub entries: Vec<(ConvShape, ConvKernel)>,
}

impl ConvPlan {
    /// The planned kernel of shape `s`, if the plan has one that applies.
    pub fn kernel(&self, s: &ConvShape) -> Option<ConvKernel> {
        let i = self.entries.binary_search_by(|(k, _)| k.cmp(s)).ok()?;
        Some(self.entries[i].1).filter(|k| k.applies(s))
    }

    /// Builds a plan from entries in any order (a later duplicate replaces an earlier one).
    pub fn from_entries(entries: impl IntoIterator<Item = (ConvShape, ConvKernel)>) -> ConvPlan {
        let map: std::collections::BTreeMap<ConvShape, ConvKernel> = entries.into_iter().collect();
        ConvPlan { entries: map.into_iter().collect() }
    }

    /// A plan that lives as long as the layers that carry it (one per training run: never freed).
    pub fn leak(self) -> &'static ConvPlan {
        Box::leak(Box::new(self))
    }
}

/// How long one candidate took on one shape, and the kernel chosen.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The shape measured.
    pub shape: ConvShape,
    /// Batch size measured with (at most the layer's).
    pub n: usize,
    /// What the products multiplied (im2col's; Winograd's are f32 at either).
    pub precision: MulPrecision,
    /// Seconds per forward + both gradients, for each candidate tried.
    pub seconds: Vec<(ConvKernel, f64)>,
    /// The fastest of them.
    pub chosen: ConvKernel,
}

static CACHE: Mutex<Vec<Measurement>> = Mutex::new(Vec::new());

/// Output pixels a measurement convolves at most: enough to time the kernels as they run in a step
/// (every algorithm's cost is linear in the batch), few enough to plan a ResNet-50 in seconds.
const MEASURE_PIXELS: usize = 1 << 14;

/// Measures every distinct shape of `geoms` with products at `precision` (cached per process) and
/// returns the plan with what was measured.
pub fn measure(geoms: &[ConvGeom], precision: MulPrecision) -> Result<(ConvPlan, Vec<Measurement>)> {
    // Timed as the step runs them: forked from a compute thread.
    crate::on_compute_thread(|| measure_here(geoms, precision))
}

fn measure_here(geoms: &[ConvGeom], precision: MulPrecision) -> Result<(ConvPlan, Vec<Measurement>)> {
    let mut distinct: HashMap<ConvShape, ConvGeom> = HashMap::new();
    for g in geoms {
        distinct.entry(ConvShape::from(g)).or_insert(*g);
    }
    let mut shapes: Vec<_> = distinct.into_iter().collect();
    shapes.sort_by_key(|(s, _)| *s);
    let mut out = Vec::new();
    for (shape, g) in shapes {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.iter().find(|m| m.shape == shape && m.precision == precision).cloned();
        drop(cache);
        let m = match cached {
            Some(m) => m,
            None => {
                let m = measure_shape(&g, precision)?;
                CACHE.lock().unwrap_or_else(|e| e.into_inner()).push(m.clone());
                m
            }
        };
        out.push(m);
    }
    Ok((ConvPlan::from_entries(out.iter().map(|m| (m.shape, m.chosen))), out))
}

fn measure_shape(g: &ConvGeom, precision: MulPrecision) -> Result<Measurement> {
    let shape = ConvShape::from(g);
    let n = (MEASURE_PIXELS / (g.oh * g.ow).max(1)).clamp(1, g.n.max(1));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    let x = Tensor::from_vec(&[n, g.h, g.w, g.cin], random(n * g.h * g.w * g.cin))?;
    let w = Tensor::from_vec(&[g.cout, g.kh, g.kw, g.cin], random(g.cout * g.kh * g.kw * g.cin))?;
    let dy = Tensor::from_vec(&[n, g.oh, g.ow, g.cout], random(n * g.oh * g.ow * g.cout))?;
    let mut dw = Tensor::zeros(w.shape(), x.device());
    let mut seconds = Vec::new();
    for kernel in ConvKernel::ALL.into_iter().filter(|k| k.applies(&shape)) {
        let p = ConvParams { stride: g.stride, pad: g.pad, algo: ConvAlgorithm::Only(kernel), precision };
        let mut best = f64::INFINITY;
        // One untimed run pages in the buffers and warms the caches; the best of the next two is the
        // least disturbed by other work on the machine.
        for rep in 0..3 {
            let t0 = Instant::now();
            conv2d_forward(&x, &w, p)?;
            conv2d_backward(&x, &w, &dy, p, &mut dw, true)?;
            if rep > 0 {
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
        seconds.push((kernel, best));
    }
    let chosen = seconds.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map_or(ConvKernel::Im2col, |s| s.0);
    Ok(Measurement { shape, n, precision, seconds, chosen })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, cin: usize, cout: usize, k: usize, stride: usize) -> ConvGeom {
        ConvGeom::new(&[2, h, h, cin], &[cout, k, k, cin], stride, k / 2).unwrap()
    }

    #[test]
    fn measures_each_distinct_shape_once_and_plans_only_kernels_that_apply() {
        let geoms = [geom(8, 32, 32, 3, 1), geom(8, 32, 32, 3, 1), geom(8, 32, 64, 3, 2), geom(8, 16, 16, 1, 1)];
        let (plan, measured) = measure(&geoms, MulPrecision::F32).unwrap();
        assert_eq!(plan.entries.len(), 3);
        assert_eq!(measured.len(), 3);
        for m in &measured {
            let tried: Vec<ConvKernel> = m.seconds.iter().map(|s| s.0).collect();
            let winograd = m.shape.kh == 3 && m.shape.stride == 1;
            assert_eq!(tried.len(), if winograd { 3 } else { 1 }, "{:?}", m.shape);
            assert!(m.seconds.iter().all(|s| s.1.is_finite() && s.1 > 0.0));
            assert_eq!(plan.kernel(&m.shape), Some(m.chosen));
        }
        assert_eq!(plan.kernel(&ConvShape::from(&geom(8, 32, 64, 3, 2))), Some(ConvKernel::Im2col));
        assert_eq!(plan.kernel(&ConvShape::from(&geom(9, 32, 32, 3, 1))), None, "an unplanned shape");
        // A plan naming Winograd for a strided shape (a corrupt file) is not applied to it.
        let s = ConvShape::from(&geom(8, 32, 64, 3, 2));
        assert_eq!(ConvPlan::from_entries([(s, ConvKernel::WinogradF4)]).kernel(&s), None);
        assert_eq!("winograd-f2".parse::<ConvKernel>(), Ok(ConvKernel::WinogradF2));
    }
}
