//! The per-crop augmentation pipeline of SwAV (torchvision semantics, see SWAV.md) and the evaluation
//! transform, on 8-bit HWC images, producing normalised f32 crops.
//!
//! One crop is: decide everything from the crop's own generator (`rng::for_crop(seed, epoch, index,
//! crop)`, draws in the order of [`CropDecision`]) -> crop + resize + flip in one resampling pass straight
//! from the decoded image -> colour jitter (the four adjustments in the drawn order) -> grayscale -> blur
//! -> normalise while writing into the batch buffer in the requested layout (normalisation, channel
//! expansion and the NHWC/NCHW transpose are one pass). The colour adjustments are separate passes over
//! the crop, which stays in the L2 cache (at most 224 x 224 x 3 floats): contrast needs the mean of the
//! image as left by the previous adjustment, and the order is random; brightness, contrast and
//! saturation together take under 10% of the time (hue 15%, see BENCHMARKS.md), so fusing them would
//! save little. Work happens in
//! reusable per-thread buffers ([`Scratch`]); nothing is allocated per crop once they have grown.
//!
//! Grayscale sources stay 1-channel through the pipeline (every colour operation is then either the same
//! as on R = G = B or an identity) and are replicated to 3 channels only when written, if asked.

// The hot loops are written once and compiled per instruction set by swav-core's `simd_fn!`: the
// same bits on every machine, the fastest code each CPU has.
use swav_core::simd_fn;

pub mod blur;
pub mod color;
pub mod resample;

use serde::{Deserialize, Serialize};

use crate::config::{AugmentConfig, EvalConfig, MultiCropConfig};
use crate::error::{DataError, Result};
use crate::image::{Image, ImageView};
use crate::rng::{self, SplitMix64};
use resample::{Resampler, Window};

/// Memory layout of the crops in a batch buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// [N, H, W, C] (channels last, the default).
    #[default]
    Nhwc,
    /// [N, C, H, W] (channels first).
    Nchw,
}

/// A crop box in source pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First row of the box.
    pub top: usize,
    /// First column of the box.
    pub left: usize,
    /// Rows in the box (at least 1; `top + height` is at most the image height).
    pub height: usize,
    /// Columns in the box (at least 1; `left + width` is at most the image width).
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area fraction `U(scale)` and a
/// log-uniform aspect ratio (`round` is Python's, ties to even), then the centre crop fallback.
/// Draws per try: area, log-ratio, and if the box fits, top then left.
pub fn random_resized_crop_box(
    rng: &mut SplitMix64,
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below((height - h + 1) as u64) as usize;
            let left = rng.below((width - w + 1) as u64) as usize;
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, ((width as f64 / ratio[0]).round_ties_even() as usize).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (((height as f64 * ratio[1]).round_ties_even() as usize).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Everything random about one crop, drawn in this order: crop box, flip, jitter (applied?, then the
/// order of the four adjustments by Fisher-Yates, then brightness, contrast, saturation and hue factors),
/// grayscale, blur (applied?, then sigma).
#[derive(Clone, Debug, PartialEq)]
pub struct CropDecision {
    /// The source box, resized to the group's `size x size`.
    pub crop: CropBox,
    /// Whether the crop is mirrored left to right.
    pub flip: bool,
    /// Adjustment order (0 brightness, 1 contrast, 2 saturation, 3 hue) and the four factors.
    /// `None` when the jitter is not applied (probability `1 - jitter_p`). The brightness, contrast and
    /// saturation factors multiply (1 is the identity); the hue factor is a shift in turns, in
    /// `[-hue, hue]`.
    pub jitter: Option<([usize; 4], [f32; 4])>,
    /// Whether the crop is converted to grayscale after the jitter.
    pub grayscale: bool,
    /// The Gaussian blur's sigma (PIL radius) in output pixels, or `None` for no blur.
    pub blur_sigma: Option<f32>,
}

impl CropDecision {
    /// Draws the decision for a crop of `scale` range from an image of `height x width`.
    pub fn draw(rng: &mut SplitMix64, a: &AugmentConfig, height: usize, width: usize, scale: [f64; 2]) -> CropDecision {
        let crop = random_resized_crop_box(rng, height, width, scale, [a.ratio[0] as f64, a.ratio[1] as f64]);
        let flip = rng.chance(a.flip_p as f64);
        let jitter = rng.chance(a.jitter_p as f64).then(|| {
            let mut order = [0usize, 1, 2, 3];
            rng.shuffle(&mut order);
            let f = |rng: &mut SplitMix64, x: f32| rng.uniform((1.0 - x as f64).max(0.0), 1.0 + x as f64) as f32;
            let b = f(rng, a.brightness);
            let c = f(rng, a.contrast);
            let s = f(rng, a.saturation);
            let h = rng.uniform(-a.hue as f64, a.hue as f64) as f32;
            (order, [b, c, s, h])
        });
        let grayscale = rng.chance(a.grayscale_p as f64);
        let blur_sigma =
            rng.chance(a.blur_p as f64).then(|| rng.uniform(a.blur_sigma[0] as f64, a.blur_sigma[1] as f64) as f32);
        CropDecision { crop, flip, jitter, grayscale, blur_sigma }
    }
}

/// Reusable per-thread buffers of the transforms.
#[derive(Default)]
pub struct Scratch {
    resampler: Resampler,
    work: Vec<f32>,
    blur: blur::BlurScratch,
    gray: Vec<u8>,
}

/// Normalisation constants resolved for the output channels.
#[derive(Clone, Copy, Debug)]
struct Norm {
    mean: [f32; 3],
    inv_std: [f32; 3],
}

/// The luma weights of [`to_gray`] (PIL's `convert("L")`).
const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// The normalisation a dataset's pixel statistics give for images of `out_channels` channels, as the
/// loader delivers them: the statistics themselves when the counts match; for RGB data read as one
/// channel (converted to luma), the luma of the mean and the luma-weighted std (exact when the channels
/// move together, as in natural images; a mild over-estimate otherwise); a gray dataset's one value
/// for every channel of an RGB output. A std is at least 1e-3, so that a constant channel does not
/// divide by zero.
pub fn dataset_normalisation(mean: &[f64], std: &[f64], out_channels: usize) -> (Vec<f32>, Vec<f32>) {
    let floor = |v: f64| (v as f32).max(1e-3);
    match (mean.len(), out_channels) {
        (3, 1) => {
            let luma = |v: &[f64]| LUMA.iter().zip(v).map(|(w, x)| w * x).sum::<f64>();
            (vec![luma(mean) as f32], vec![floor(luma(std))])
        }
        (1, c) => (vec![mean[0] as f32; c], vec![floor(std.first().copied().unwrap_or(1.0)); c]),
        _ => (mean.iter().map(|&v| v as f32).collect(), std.iter().map(|&v| floor(v)).collect()),
    }
}

fn resolve_norm(
    mean: &Option<Vec<f32>>,
    std: &Option<Vec<f32>>,
    out_channels: usize,
    dataset_mean: &[f64],
    dataset_std: &[f64],
) -> Result<Norm> {
    let (m, s): (Vec<f32>, Vec<f32>) = match (mean, std) {
        (Some(m), Some(s)) => (m.clone(), s.clone()),
        _ => dataset_normalisation(dataset_mean, dataset_std, out_channels),
    };
    let pick = |v: &[f32], what: &str| -> Result<[f32; 3]> {
        match (v.len(), out_channels) {
            (1, _) => Ok([v[0]; 3]),
            (3, 3) => Ok([v[0], v[1], v[2]]),
            (n, c) => {
                let expected = if c == 1 { "1 value".to_string() } else { format!("1 value or {c}") };
                Err(DataError::Config(format!(
                    "normalisation {what} has {n} values but the output has {c} channel(s): give {expected}"
                )))
            }
        }
    };
    let mean = pick(&m, "mean")?;
    let std = pick(&s, "std")?;
    Ok(Norm { mean, inv_std: std.map(|v| 1.0 / v) })
}

/// Converts an RGB view to 8-bit luma (PIL's `convert("L")`: (299 R + 587 G + 114 B) / 1000, rounded).
fn to_gray<'a>(src: ImageView<'_>, buf: &'a mut Vec<u8>) -> ImageView<'a> {
    buf.clear();
    buf.extend(
        src.pixels
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8),
    );
    ImageView { height: src.height, width: src.width, channels: 1, pixels: buf }
}

simd_fn! {
/// Normalises an HWC f32 image of `c_in` channels and writes it as `c_out` channels in `layout`.
fn store(
    work: &[f32],
    hw: usize,
    c_in: usize,
    c_out: usize,
    norm: &Norm,
    layout: Layout,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), hw * c_out);
    match (layout, c_in, c_out) {
        (Layout::Nhwc, 3, 3) => {
            for (o, p) in out.chunks_exact_mut(3).zip(work.chunks_exact(3)) {
                for c in 0..3 {
                    o[c] = (p[c] - norm.mean[c]) * norm.inv_std[c];
                }
            }
        }
        (Layout::Nhwc, 1, 1) => {
            for (o, &v) in out.iter_mut().zip(work) {
                *o = (v - norm.mean[0]) * norm.inv_std[0];
            }
        }
        (Layout::Nhwc, 1, 3) => {
            for (o, &v) in out.chunks_exact_mut(3).zip(work) {
                for ((o, m), s) in o.iter_mut().zip(norm.mean).zip(norm.inv_std) {
                    *o = (v - m) * s;
                }
            }
        }
        (Layout::Nchw, _, _) => {
            for c in 0..c_out {
                let plane = &mut out[c * hw..(c + 1) * hw];
                let ci = if c_in == 1 { 0 } else { c };
                for (o, p) in plane.iter_mut().zip(work.chunks_exact(c_in)) {
                    *o = (p[ci] - norm.mean[c]) * norm.inv_std[c];
                }
            }
        }
        _ => unreachable!("channel conversion {c_in} -> {c_out} is done before the pipeline"),
    }
}
}

/// The shape of one group of crops in a batch: `count` crops of `height x width x channels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupShape {
    /// Crops of this shape per image.
    pub count: usize,
    /// Rows of one crop.
    pub height: usize,
    /// Columns of one crop.
    pub width: usize,
    /// Channels of one crop as written (the loader's output channels, 1 or 3).
    pub channels: usize,
}

impl GroupShape {
    /// Floats of one crop of one image.
    pub fn crop_len(&self) -> usize {
        self.height * self.width * self.channels
    }
}

/// The multi-crop transform: crop `k` of image `index` in epoch `epoch` is a pure function of
/// (seed, epoch, index, k) and the image.
#[derive(Clone, Debug)]
pub struct MultiCropTransform {
    cfg: MultiCropConfig,
    out_channels: usize,
    layout: Layout,
    norm: Norm,
    shapes: Vec<GroupShape>,
    /// Crop number -> group.
    group_of: Vec<usize>,
}

/// The number of output channels, which must be 1 or 3.
fn output_channels(out_channels: u8) -> Result<usize> {
    if !(out_channels == 1 || out_channels == 3) {
        return Err(DataError::Config(format!("output channels must be 1 or 3 (got {out_channels})")));
    }
    Ok(out_channels as usize)
}

impl MultiCropTransform {
    /// `out_channels` is 1 or 3; `dataset_mean`/`dataset_std` (the manifest's) are used when the config
    /// gives no normalisation.
    pub fn new(
        cfg: &MultiCropConfig,
        out_channels: u8,
        layout: Layout,
        dataset_mean: &[f64],
        dataset_std: &[f64],
    ) -> Result<Self> {
        cfg.validate()?;
        let c = output_channels(out_channels)?;
        let norm = resolve_norm(&cfg.augment.mean, &cfg.augment.std, c, dataset_mean, dataset_std)?;
        let shapes = cfg
            .groups
            .iter()
            .map(|g| GroupShape { count: g.count, height: g.size, width: g.size, channels: c })
            .collect();
        let group_of = cfg.groups.iter().enumerate().flat_map(|(i, g)| std::iter::repeat_n(i, g.count)).collect();
        Ok(MultiCropTransform { cfg: cfg.clone(), out_channels: c, layout, norm, shapes, group_of })
    }

    /// One entry per crop group.
    pub fn shapes(&self) -> &[GroupShape] {
        &self.shapes
    }

    /// Total crops per image.
    pub fn num_crops(&self) -> usize {
        self.group_of.len()
    }

    /// The random decision of crop `crop` (numbered across groups) of a `height x width` image.
    pub fn decide(&self, seed: u64, epoch: u64, index: u64, crop: usize, height: usize, width: usize) -> CropDecision {
        let g = &self.cfg.groups[self.group_of[crop]];
        let mut rng = rng::for_crop(seed, epoch, index, crop as u64);
        CropDecision::draw(&mut rng, &self.cfg.augment, height, width, [g.min_scale as f64, g.max_scale as f64])
    }

    /// Writes crop `crop` of `src` into `out` (`shapes()[group].crop_len()` floats, in the layout).
    #[allow(clippy::too_many_arguments)]
    pub fn crop_into(
        &self,
        src: ImageView<'_>,
        seed: u64,
        epoch: u64,
        index: u64,
        crop: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let Scratch { resampler, work, blur: blur_scratch, gray } = scratch;
        let src = if self.out_channels == 1 && src.channels == 3 { to_gray(src, gray) } else { src };
        let size = self.shapes[self.group_of[crop]].height;
        let d = self.decide(seed, epoch, index, crop, src.height, src.width);
        let c = src.channels;
        work.resize(size * size * c, 0.0);
        resampler.resample(
            src,
            (d.crop.top, d.crop.left, d.crop.height, d.crop.width),
            (size, size),
            Window { y0: 0, x0: 0, h: size, w: size },
            d.flip,
            1.0 / 255.0,
            work,
        );
        let a = &self.cfg.augment;
        if let Some((order, f)) = d.jitter {
            for op in order {
                match op {
                    0 if a.brightness > 0.0 => color::brightness(work, f[0]),
                    1 if a.contrast > 0.0 => color::contrast(work, c, f[1]),
                    2 if a.saturation > 0.0 => color::saturation(work, c, f[2]),
                    3 if a.hue > 0.0 => color::hue(work, c, f[3]),
                    _ => {}
                }
            }
        }
        if d.grayscale {
            color::grayscale(work, c);
        }
        if let Some(sigma) = d.blur_sigma {
            blur::gaussian_blur(work, size, size, c, sigma, blur_scratch);
        }
        store(work, size * size, c, self.out_channels, &self.norm, self.layout, out);
    }

    /// All crops of one image, allocated (convenient for inspection; the loader uses `crop_into`).
    pub fn crops(&self, image: &Image, seed: u64, epoch: u64, index: u64) -> Vec<Vec<f32>> {
        let mut scratch = Scratch::default();
        (0..self.num_crops())
            .map(|k| {
                let mut out = vec![0.0; self.shapes[self.group_of[k]].crop_len()];
                self.crop_into(image.view(), seed, epoch, index, k, &mut scratch, &mut out);
                out
            })
            .collect()
    }
}

/// The evaluation transform (resize shorter side, centre crop, normalise); deterministic.
#[derive(Clone, Debug)]
pub struct EvalTransform {
    cfg: EvalConfig,
    out_channels: usize,
    layout: Layout,
    norm: Norm,
}

impl EvalTransform {
    /// `out_channels` is 1 or 3; `dataset_mean`/`dataset_std` (the manifest's) are used when `cfg` gives
    /// no normalisation. Fails with [`DataError::Config`] on an invalid `cfg` or a normalisation whose
    /// value count does not fit the output channels.
    pub fn new(
        cfg: &EvalConfig,
        out_channels: u8,
        layout: Layout,
        dataset_mean: &[f64],
        dataset_std: &[f64],
    ) -> Result<Self> {
        cfg.validate()?;
        let c = output_channels(out_channels)?;
        let norm = resolve_norm(&cfg.mean, &cfg.std, c, dataset_mean, dataset_std)?;
        Ok(EvalTransform { cfg: cfg.clone(), out_channels: c, layout, norm })
    }

    /// The output: one `crop x crop` image of the output channels.
    pub fn shape(&self) -> GroupShape {
        GroupShape { count: 1, height: self.cfg.crop, width: self.cfg.crop, channels: self.out_channels }
    }

    /// torchvision's `Resize(int)` output size: the shorter side becomes `resize`, the longer one
    /// `int(resize * long / short)`.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        let r = self.cfg.resize;
        if width <= height {
            (((r as f64 * height as f64 / width as f64) as usize).max(1), r)
        } else {
            (r, ((r as f64 * width as f64 / height as f64) as usize).max(1))
        }
    }

    /// Writes the transformed image into `out` (`shape().crop_len()` floats, in the layout).
    pub fn apply_into(&self, src: ImageView<'_>, scratch: &mut Scratch, out: &mut [f32]) {
        let Scratch { resampler, work, gray, .. } = scratch;
        let src = if self.out_channels == 1 && src.channels == 3 { to_gray(src, gray) } else { src };
        let (oh, ow) = self.resized_size(src.height, src.width);
        let crop = self.cfg.crop;
        // torchvision CenterCrop: pad (zeros) by (crop - size) // 2 before, or crop at round((size - crop) / 2).
        let offset = |size: usize| -> isize {
            if crop > size {
                -(((crop - size) / 2) as isize)
            } else {
                ((size - crop) as f64 / 2.0).round_ties_even() as isize
            }
        };
        let c = src.channels;
        work.resize(crop * crop * c, 0.0);
        resampler.resample(
            src,
            (0, 0, src.height, src.width),
            (oh, ow),
            Window { y0: offset(oh), x0: offset(ow), h: crop, w: crop },
            false,
            1.0 / 255.0,
            work,
        );
        store(work, crop * crop, c, self.out_channels, &self.norm, self.layout, out);
    }

    /// The transformed image, allocated.
    pub fn apply(&self, image: &Image) -> Vec<f32> {
        let mut out = vec![0.0; self.shape().crop_len()];
        self.apply_into(image.view(), &mut Scratch::default(), &mut out);
        out
    }
}
