//! Colour operations on f32 HWC images in [0, 1], with the formulas of torchvision's tensor functional
//! API (`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`).
//! The official pipeline applies the same operations to 8-bit PIL images; the results agree up to PIL's
//! rounding to 8 bits after each operation (and PIL's 8-bit hue arithmetic).
//!
//! One-channel images follow torchvision's rules for grayscale inputs: brightness and contrast apply,
//! saturation, hue and grayscale leave the image unchanged (for R = G = B they are identities anyway).

use swav_core::simd_fn;

/// Luma weights of `rgb_to_grayscale` (ITU-R 601-2, as torchvision writes them).
pub const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

#[inline(always)]
fn clamp01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

#[inline(always)]
fn luma(p: &[f32]) -> f32 {
    LUMA[0] * p[0] + LUMA[1] * p[1] + LUMA[2] * p[2]
}

simd_fn! {
/// `x <- clamp(f * x)`.
pub fn brightness(img: &mut [f32], factor: f32) {
    for v in img {
        *v = clamp01(*v * factor);
    }
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

simd_fn! {
/// `x <- clamp(f * x + (1 - f) * m)` where `m` is the mean of the grayscale image.
pub fn contrast(img: &mut [f32], channels: usize, factor: f32) {
    let m = gray_mean(img, channels);
    let offset = (1.0 - factor) * m;
    for v in img {
        *v = clamp01(factor * *v + offset);
    }
}
}

simd_fn! {
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
}

simd_fn! {
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
///
/// The arithmetic of `rgb_to_hsv`, `(h + shift) mod 1`, `hsv_to_rgb`, written without branches so that
/// it vectorises (8 pixels at a time): the hue sector is chosen by selects, both `mod 1` are one
/// truncation of a positive value, and HSV -> RGB uses the closed form
/// `c = v - v s clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6h) mod 6`, n = 5, 3, 1 for R, G, B, which
/// equals torchvision's six-case table.
pub fn hue(img: &mut [f32], channels: usize, shift: f32) {
    if channels != 3 || shift == 0.0 {
        return;
    }
    hue_rgb(img, shift)
}

simd_fn! {
fn hue_rgb(img: &mut [f32], shift: f32) {
    const N: usize = 8;
    let mut chunks = img.chunks_exact_mut(3 * N);
    for chunk in &mut chunks {
        let mut r = [0.0f32; N];
        let mut g = [0.0f32; N];
        let mut b = [0.0f32; N];
        for i in 0..N {
            r[i] = chunk[3 * i];
            g[i] = chunk[3 * i + 1];
            b[i] = chunk[3 * i + 2];
        }
        for i in 0..N {
            (r[i], g[i], b[i]) = hue_pixel(r[i], g[i], b[i], shift);
        }
        for i in 0..N {
            chunk[3 * i] = r[i];
            chunk[3 * i + 1] = g[i];
            chunk[3 * i + 2] = b[i];
        }
    }
    for p in chunks.into_remainder().chunks_exact_mut(3) {
        (p[0], p[1], p[2]) = hue_pixel(p[0], p[1], p[2], shift);
    }
}
}

#[inline(always)]
fn hue_pixel(r: f32, g: f32, b: f32, shift: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    // Grey pixels (cr = 0) get s = 0 and come out unchanged, as in torchvision.
    let s = cr / maxc.max(1e-30);
    let inv = 1.0 / cr.max(1e-30);
    let hr = (g - b) * inv;
    let hg = 2.0 + (b - r) * inv;
    let hb = 4.0 + (r - g) * inv;
    let h = if maxc == r {
        hr
    } else if maxc == g {
        hg
    } else {
        hb
    };
    // h / 6 is in [-1/6, 5/6] and |shift| <= 0.5, so x is in (0, 7/3): floor(x) is 0, 1 or 2 (selects
    // rather than a float -> int conversion, which does not vectorise on baseline x86-64).
    let x = h * (1.0 / 6.0) + 1.0 + shift;
    let fl = if x >= 2.0 {
        2.0
    } else if x >= 1.0 {
        1.0
    } else {
        0.0
    };
    let h6 = (x - fl) * 6.0;
    let vs = maxc * s;
    let chan = |n: f32| {
        let k = n + h6;
        let k = if k >= 6.0 { k - 6.0 } else { k };
        clamp01(maxc - vs * k.min(4.0 - k).clamp(0.0, 1.0))
    };
    (chan(5.0), chan(3.0), chan(1.0))
}
