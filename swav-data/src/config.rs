//! Multi-crop and evaluation settings (serde, TOML-friendly) and the presets.
//!
//! ```toml
//! [[groups]]
//! count = 2
//! size = 224
//! min_scale = 0.14
//! max_scale = 1.0
//!
//! [[groups]]
//! count = 6
//! size = 96
//! min_scale = 0.05
//! max_scale = 0.14
//!
//! [augment]          # every field optional; defaults are the official SwAV settings
//! blur_p = 0.5
//! mean = [0.485, 0.456, 0.406]
//! std = [0.228, 0.224, 0.225]
//! ```

use serde::{Deserialize, Serialize};
use swav_core::imagenet;

use crate::error::{DataError, Result};

/// `count` crops of `size x size` pixels, each a RandomResizedCrop covering a fraction in
/// `[min_scale, max_scale]` of the image area.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropGroup {
    /// Crops of this size per image (at least 1).
    pub count: usize,
    /// Side of the square output crop in pixels (1 to 8192).
    pub size: usize,
    /// Smallest fraction of the source image's area a crop covers (`0 < min_scale <= max_scale`).
    pub min_scale: f32,
    /// Largest fraction of the source image's area a crop covers (at most 1).
    pub max_scale: f32,
}

/// The random augmentations applied to every crop (torchvision semantics, see SWAV.md), in this order:
/// RandomResizedCrop -> horizontal flip -> colour jitter (with probability `jitter_p`, the four
/// adjustments in random order) -> random grayscale -> Gaussian blur -> normalisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Aspect-ratio range of RandomResizedCrop (width / height).
    pub ratio: [f32; 2],
    /// Probability of a horizontal flip.
    pub flip_p: f32,
    /// Probability of applying the colour jitter.
    pub jitter_p: f32,
    /// Brightness, contrast and saturation factors are drawn from `[max(0, 1 - x), 1 + x]`; this is `x`
    /// for brightness (0 turns the adjustment off).
    pub brightness: f32,
    /// `x` of the contrast factor (see `brightness`); contrast blends with the mean gray level.
    pub contrast: f32,
    /// `x` of the saturation factor (see `brightness`); saturation blends with each pixel's gray level
    /// and leaves one-channel images unchanged.
    pub saturation: f32,
    /// Hue shift drawn from `[-hue, hue]` (at most 0.5).
    pub hue: f32,
    /// Probability of converting to grayscale (after the jitter).
    pub grayscale_p: f32,
    /// Probability of the Gaussian blur.
    pub blur_p: f32,
    /// Blur radius (PIL's `GaussianBlur` radius, i.e. sigma) drawn uniformly from this range.
    pub blur_sigma: [f32; 2],
    /// Per-channel normalisation `(x - mean) / std` of pixels in [0, 1]. One value applies to every
    /// channel. `None` (the default) uses the dataset's own statistics from its manifest.
    pub mean: Option<Vec<f32>>,
    /// The `std` of the normalisation (see `mean`): 1 or 3 positive values, given together with `mean`.
    pub std: Option<Vec<f32>>,
}

impl Default for AugmentConfig {
    /// The official SwAV augmentations (colour distortion strength 1) with the dataset's statistics.
    fn default() -> Self {
        AugmentConfig {
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.8,
            contrast: 0.8,
            saturation: 0.8,
            hue: 0.2,
            grayscale_p: 0.2,
            blur_p: 0.5,
            blur_sigma: [0.1, 2.0],
            mean: None,
            std: None,
        }
    }
}

impl AugmentConfig {
    /// Colour distortion of strength `s` as in the SimCLR/SwAV code: jitter (0.8s, 0.8s, 0.8s, 0.2s).
    pub fn with_jitter_strength(mut self, s: f32) -> Self {
        self.brightness = 0.8 * s;
        self.contrast = 0.8 * s;
        self.saturation = 0.8 * s;
        self.hue = 0.2 * s;
        self
    }

    /// ImageNet normalisation (the official constants).
    pub fn with_imagenet_normalisation(mut self) -> Self {
        self.mean = Some(imagenet::MEAN.to_vec());
        self.std = Some(imagenet::STD.to_vec());
        self
    }
}

/// Crop groups plus augmentations: everything the multi-crop loader needs besides batch settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiCropConfig {
    /// The crop resolutions, in output order: a batch holds one buffer per group, and crop numbers
    /// (which key the random streams) run through the groups in this order.
    pub groups: Vec<CropGroup>,
    /// The augmentations, the same for every group (the official ones when absent from a file).
    #[serde(default)]
    pub augment: AugmentConfig,
}

impl MultiCropConfig {
    /// The official setting: 2x224 (scale 0.14-1) + 6x96 (scale 0.05-0.14), ImageNet normalisation.
    pub fn official() -> Self {
        MultiCropConfig {
            groups: vec![
                CropGroup { count: 2, size: 224, min_scale: 0.14, max_scale: 1.0 },
                CropGroup { count: 6, size: 96, min_scale: 0.05, max_scale: 0.14 },
            ],
            augment: AugmentConfig::default().with_imagenet_normalisation(),
        }
    }

    /// 2x224 crops alone (scale 0.08-1), ImageNet normalisation.
    pub fn two_224() -> Self {
        MultiCropConfig {
            groups: vec![CropGroup { count: 2, size: 224, min_scale: 0.08, max_scale: 1.0 }],
            augment: AugmentConfig::default().with_imagenet_normalisation(),
        }
    }

    /// Small images (e.g. 28 px): 2 x `large` (scale 0.14-1) + 4 x `small` (scale 0.05-0.14), the official
    /// scales and colour distortion at strength 0.5, no blur (it erases tiny images), dataset statistics.
    pub fn small(large: usize, small: usize) -> Self {
        MultiCropConfig {
            groups: vec![
                CropGroup { count: 2, size: large, min_scale: 0.14, max_scale: 1.0 },
                CropGroup { count: 4, size: small, min_scale: 0.05, max_scale: 0.14 },
            ],
            augment: AugmentConfig { blur_p: 0.0, ..AugmentConfig::default().with_jitter_strength(0.5) },
        }
    }

    /// Gentler crops for small grayscale sets such as Fashion-MNIST on a small budget: 2x28 (scale 0.3-1)
    /// + 4x16 (scale 0.2-0.5), brightness/contrast jitter 0.4 with p 0.8, no grayscale, no blur.
    pub fn fashion_mnist() -> Self {
        MultiCropConfig {
            groups: vec![
                CropGroup { count: 2, size: 28, min_scale: 0.3, max_scale: 1.0 },
                CropGroup { count: 4, size: 16, min_scale: 0.2, max_scale: 0.5 },
            ],
            augment: AugmentConfig {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.0,
                hue: 0.0,
                grayscale_p: 0.0,
                blur_p: 0.0,
                ..AugmentConfig::default()
            },
        }
    }

    /// A preset by name: `official` (= `2x224+6x96`), `2x224`, `small` (= `2x28+4x16`), `fashion-mnist`,
    /// or any `AxB+CxD...` list of crop groups: one group gets scale 0.08-1; with several, the first gets
    /// 0.14-1 and the others 0.05-0.14 (the official rule), with the default augmentations.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "official" | "2x224+6x96" => return Ok(Self::official()),
            "2x224" => return Ok(Self::two_224()),
            "small" | "2x28+4x16" => return Ok(Self::small(28, 16)),
            "fashion-mnist" | "fmnist" => return Ok(Self::fashion_mnist()),
            _ => {}
        }
        let bad = || {
            DataError::Config(format!(
                "unknown crop preset `{name}`: use official, 2x224, small, fashion-mnist or a list such as 2x160+4x96"
            ))
        };
        let mut groups = Vec::new();
        for part in name.split('+') {
            let (count, size) = part.split_once('x').ok_or_else(bad)?;
            let count: usize = count.trim().parse().map_err(|_| bad())?;
            let size: usize = size.trim().parse().map_err(|_| bad())?;
            groups.push(CropGroup { count, size, min_scale: 0.05, max_scale: 0.14 });
        }
        if groups.len() == 1 {
            groups[0].min_scale = 0.08;
            groups[0].max_scale = 1.0;
        } else {
            groups[0].min_scale = 0.14;
            groups[0].max_scale = 1.0;
        }
        let cfg = MultiCropConfig { groups, augment: AugmentConfig::default() };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Total number of crops per image.
    pub fn num_crops(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Checks every range and probability; a [`DataError::Config`] names the field that is out of range.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(DataError::Config(m));
        if self.groups.is_empty() {
            return err("no crop group: give at least one {count, size, min_scale, max_scale}".into());
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.count == 0 || g.size == 0 || g.size > 8192 {
                return err(format!(
                    "crop group {i}: count must be >= 1 and size in 1..=8192 (got {} x {})",
                    g.count, g.size
                ));
            }
            if !(g.min_scale > 0.0 && g.min_scale <= g.max_scale && g.max_scale <= 1.0) {
                return err(format!(
                    "crop group {i}: need 0 < min_scale <= max_scale <= 1 (got {}..{})",
                    g.min_scale, g.max_scale
                ));
            }
        }
        let a = &self.augment;
        if !(a.ratio[0] > 0.0 && a.ratio[0] <= a.ratio[1] && a.ratio[1].is_finite()) {
            return err(format!("augment.ratio must satisfy 0 < lo <= hi (got {:?})", a.ratio));
        }
        for (name, p) in
            [("flip_p", a.flip_p), ("jitter_p", a.jitter_p), ("grayscale_p", a.grayscale_p), ("blur_p", a.blur_p)]
        {
            if !(0.0..=1.0).contains(&p) {
                return err(format!("augment.{name} must be a probability in [0, 1] (got {p})"));
            }
        }
        for (name, x) in [("brightness", a.brightness), ("contrast", a.contrast), ("saturation", a.saturation)] {
            if !(x >= 0.0 && x.is_finite()) {
                return err(format!("augment.{name} must be >= 0 (got {x})"));
            }
        }
        if !(0.0..=0.5).contains(&a.hue) {
            return err(format!("augment.hue must be in [0, 0.5] (got {})", a.hue));
        }
        if !(a.blur_sigma[0] > 0.0 && a.blur_sigma[0] <= a.blur_sigma[1] && a.blur_sigma[1] <= 100.0) {
            return err(format!("augment.blur_sigma must satisfy 0 < lo <= hi <= 100 (got {:?})", a.blur_sigma));
        }
        check_norm(&a.mean, &a.std, "augment")
    }
}

pub(crate) fn check_norm(mean: &Option<Vec<f32>>, std: &Option<Vec<f32>>, what: &str) -> Result<()> {
    match (mean, std) {
        (None, None) => Ok(()),
        (Some(m), Some(s)) => {
            if !(m.len() == 1 || m.len() == 3) || m.len() != s.len() {
                return Err(DataError::Config(format!(
                    "{what}.mean and {what}.std need 1 or 3 values each, the same number"
                )));
            }
            if s.iter().any(|&v| !(v > 0.0 && v.is_finite())) || m.iter().any(|v| !v.is_finite()) {
                return Err(DataError::Config(format!("{what}.std must be positive and mean finite")));
            }
            Ok(())
        }
        _ => Err(DataError::Config(format!("{what}.mean and {what}.std must be given together"))),
    }
}

/// The evaluation transform: resize the shorter side to `resize` (PIL bilinear, antialiased), crop the
/// centre `crop x crop` (zero-padded if the image is smaller, like torchvision's `CenterCrop`), normalise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Length in pixels of the shorter side after resizing (1 to 16384).
    pub resize: usize,
    /// Side in pixels of the square centre crop (1 to 16384).
    pub crop: usize,
    /// Per-channel mean of the normalisation `(x - mean) / std` of pixels in [0, 1] (1 or 3 values);
    /// `None` uses the dataset's own statistics from its manifest.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// The `std` of the normalisation, given together with `mean`.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
}

impl EvalConfig {
    /// The official evaluation transform: Resize(256), CenterCrop(224), ImageNet normalisation.
    pub fn imagenet() -> Self {
        EvalConfig { resize: 256, crop: 224, mean: Some(imagenet::MEAN.to_vec()), std: Some(imagenet::STD.to_vec()) }
    }

    /// Resize to `size`, crop `size` (the whole image for square inputs), dataset statistics.
    pub fn whole(size: usize) -> Self {
        EvalConfig { resize: size, crop: size, mean: None, std: None }
    }

    /// Checks the sizes and the normalisation; a [`DataError::Config`] says which value is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.resize == 0 || self.crop == 0 || self.resize > 16384 || self.crop > 16384 {
            return Err(DataError::Config(format!(
                "eval resize and crop must be in 1..=16384 (got {} and {})",
                self.resize, self.crop
            )));
        }
        check_norm(&self.mean, &self.std, "eval")
    }
}
