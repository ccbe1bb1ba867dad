//! Colour operations on f32 HWC images in [0, 1], with the formulas of torchvision's tensor functional
//! API (`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`).
//! The official pipeline applies the same operations to 8-bit PIL images; the results agree up to PIL's
//! rounding to 8 bits after each operation (and PIL's 8-bit hue arithmetic).
//!
//! One-channel images follow torchvision's rules for grayscale inputs: brightness and contrast apply,
//! saturation, hue and grayscale leave the image unchanged (for R = G = B they are identities anyway).

/// Luma weights of `rgb_to_grayscale` (ITU-R 601-2, as torchvision writes them).
pub const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

#[inline]
fn clamp01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

#[inline]
fn luma(p: &[f32]) -> f32 {
    LUMA[0] * p[0] + LUMA[1] * p[1] + LUMA[2] * p[2]
}

/// `x <- clamp(f * x)`.
pub fn brightness(img: &mut [f32], factor: f32) {
    for v in img {
        *v = clamp01(*v * factor);
    }
}

/// Mean of the grayscale version of the image (the contrast reference).
pub fn gray_mean(img: &[f32], channels: usize) -> f32 {
    let n = img.len() / channels;
    if n == 0 {
        return 0.0;
    }
    let mut sum = 0.0f64;
    if channels == 3 {
        for p in img.chunks_exact(3) {
            sum += luma(p) as f64;
        }
    } else {
        for &v in img {
            sum += v as f64;
        }
    }
    (sum / n as f64) as f32
}

/// `x <- clamp(f * x + (1 - f) * m)` where `m` is the mean of the grayscale image.
pub fn contrast(img: &mut [f32], channels: usize, factor: f32) {
    let m = gray_mean(img, channels);
    let offset = (1.0 - factor) * m;
    for v in img {
        *v = clamp01(factor * *v + offset);
    }
}

/// `x <- clamp(f * x + (1 - f) * gray(pixel))` (RGB only).
pub fn saturation(img: &mut [f32], channels: usize, factor: f32) {
    if channels != 3 {
        return;
    }
    for p in img.chunks_exact_mut(3) {
        let g = (1.0 - factor) * luma(p);
        for v in p {
            *v = clamp01(factor * *v + g);
        }
    }
}

/// Replaces each RGB pixel by its luma on all three channels (RGB only).
pub fn grayscale(img: &mut [f32], channels: usize) {
    if channels != 3 {
        return;
    }
    for p in img.chunks_exact_mut(3) {
        let g = luma(p);
        p.fill(g);
    }
}

/// RGB -> HSV of torchvision's `_rgb2hsv` (h, s, v in [0, 1]).
#[inline]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / div;
    let gc = (maxc - g) / div;
    let bc = (maxc - b) / div;
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = (h / 6.0 + 1.0).rem_euclid(1.0);
    (h, s, maxc)
}

/// HSV -> RGB of torchvision's `_hsv2rgb`.
#[inline]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let i = (i as i32).rem_euclid(6);
    let p = clamp01(v * (1.0 - s));
    let q = clamp01(v * (1.0 - s * f));
    let t = clamp01(v * (1.0 - s * (1.0 - f)));
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Rotates the hue by `shift` turns (`shift` in [-0.5, 0.5]; RGB only).
pub fn hue(img: &mut [f32], channels: usize, shift: f32) {
    if channels != 3 || shift == 0.0 {
        return;
    }
    for p in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let h = (h + shift).rem_euclid(1.0);
        let (r, g, b) = hsv_to_rgb(h, s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}
