//! Gaussian blur as PIL's `ImageFilter.GaussianBlur(radius)` computes it (the official SwAV pipeline draws
//! `radius ~ U(0.1, 2.0)` and calls that filter): not a sampled Gaussian but three passes of an *extended
//! box* filter per axis (Gwosdek et al. 2011, "Theoretical foundations of Gaussian convolution by extended
//! box filtering"), edges replicated. The box of radius `r = l + a` has weight `1 / (2r + 1)` on the
//! `2l + 1` central taps and `a / (2r + 1)` on the two taps at distance `l + 1`; `r` is chosen so that one
//! pass has variance `radius^2 / 3`, hence three passes have variance `radius^2`. We compute in f32
//! (PIL rounds to 8 bits after each pass).

use swav_core::simd_fn;

/// PIL's `_gaussian_blur_radius(radius, passes = 3)`: the extended box radius `l + a`.
pub fn extended_box_radius(sigma: f32) -> f32 {
    let sigma2 = sigma as f64 * sigma as f64 / 3.0;
    let big_l = (12.0 * sigma2 + 1.0).sqrt();
    let l = ((big_l - 1.0) / 2.0).floor();
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    (l + a) as f32
}

/// The taps of one extended-box pass: `(l, centre weight, edge weight)`.
pub fn box_taps(radius: f32) -> (usize, f32, f32) {
    let l = radius.floor().max(0.0) as usize;
    let ww = 1.0 / (2.0 * radius + 1.0);
    let fw = (1.0 - (2 * l + 1) as f32 * ww) / 2.0;
    (l, ww, fw)
}

/// The 1-D kernel of three passes (length `2 * 3 * (l + 1) + 1`, centred), for tests and documentation.
pub fn composed_kernel(sigma: f32) -> Vec<f64> {
    let (l, ww, fw) = box_taps(extended_box_radius(sigma));
    let mut one = vec![ww as f64; 2 * l + 3];
    one[0] = fw as f64;
    one[2 * l + 2] = fw as f64;
    let mut k = vec![1.0f64];
    for _ in 0..3 {
        let mut next = vec![0.0; k.len() + one.len() - 1];
        for (i, &a) in k.iter().enumerate() {
            for (j, &b) in one.iter().enumerate() {
                next[i + j] += a * b;
            }
        }
        k = next;
    }
    k
}

/// Reusable buffers of the blur.
#[derive(Default)]
pub struct BlurScratch {
    a: Vec<f32>,
    b: Vec<f32>,
    acc: Vec<f32>,
}

/// Blurs an f32 HWC image in place like PIL's `GaussianBlur(sigma)`.
///
/// Both directions run as whole-row vector loops: three vertical passes with a running row sum, then
/// the image is transposed so that the three horizontal passes are vertical ones too (PIL also
/// transposes), and transposed back.
pub fn gaussian_blur(
    img: &mut [f32],
    height: usize,
    width: usize,
    channels: usize,
    sigma: f32,
    scratch: &mut BlurScratch,
) {
    blur_impl(img, height, width, channels, sigma, scratch)
}

simd_fn! {
fn blur_impl(img: &mut [f32], height: usize, width: usize, channels: usize, sigma: f32, scratch: &mut BlurScratch) {
    if sigma <= 0.0 || height == 0 || width == 0 {
        return;
    }
    let (l, ww, fw) = box_taps(extended_box_radius(sigma));
    let c = channels;
    let BlurScratch { a, b, acc } = scratch;
    a.resize(img.len(), 0.0);
    b.resize(img.len(), 0.0);
    // Vertical: img -> a -> img -> a.
    acc.resize(width * c, 0.0);
    box_columns(img, a, acc, height, width * c, l, ww, fw);
    box_columns(a, img, acc, height, width * c, l, ww, fw);
    box_columns(img, a, acc, height, width * c, l, ww, fw);
    // Horizontal, transposed: a (h, w) -> b (w, h) -> a -> b -> a, then back to img (h, w).
    transpose(a, b, height, width, c);
    acc.resize(height * c, 0.0);
    box_columns(b, a, acc, width, height * c, l, ww, fw);
    box_columns(a, b, acc, width, height * c, l, ww, fw);
    box_columns(b, a, acc, width, height * c, l, ww, fw);
    transpose(a, img, width, height, c);
}
}

/// (rows, cols) of `c`-float pixels -> (cols, rows).
#[inline(always)]
fn transpose(src: &[f32], dst: &mut [f32], rows: usize, cols: usize, c: usize) {
    match c {
        1 => transpose_c::<1>(src, dst, rows, cols),
        3 => transpose_c::<3>(src, dst, rows, cols),
        _ => transpose_any(src, dst, rows, cols, c),
    }
}

#[inline(always)]
fn transpose_c<const C: usize>(src: &[f32], dst: &mut [f32], rows: usize, cols: usize) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for q in c0..(c0 + T).min(cols) {
                    let s = (r * cols + q) * C;
                    let d = (q * rows + r) * C;
                    let px: [f32; C] = src[s..s + C].try_into().expect("C floats");
                    dst[d..d + C].copy_from_slice(&px);
                }
            }
        }
    }
}

#[inline(always)]
fn transpose_any(src: &[f32], dst: &mut [f32], rows: usize, cols: usize, c: usize) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for q in c0..(c0 + T).min(cols) {
                    let s = (r * cols + q) * c;
                    let d = (q * rows + r) * c;
                    dst[d..d + c].copy_from_slice(&src[s..s + c]);
                }
            }
        }
    }
}

/// One extended-box pass along the columns (rows of `row_len` floats), edges replicated.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn box_columns(
    src: &[f32],
    dst: &mut [f32],
    acc: &mut [f32],
    height: usize,
    row_len: usize,
    l: usize,
    ww: f32,
    fw: f32,
) {
    let last = height as isize - 1;
    let row = |y: isize| &src[y.clamp(0, last) as usize * row_len..][..row_len];
    let l = l as isize;
    acc.fill(0.0);
    for k in -l..=l {
        for (a, &v) in acc.iter_mut().zip(row(k)) {
            *a += v;
        }
    }
    for (y, out) in (0..height as isize).zip(dst.chunks_exact_mut(row_len)) {
        let (far0, far1) = (row(y - l - 1), row(y + l + 1));
        for (((o, &a), &f0), &f1) in out.iter_mut().zip(acc.iter()).zip(far0).zip(far1) {
            *o = a * ww + (f0 + f1) * fw;
        }
        let (add, sub) = (row(y + l + 1), row(y - l));
        for ((a, &p), &m) in acc.iter_mut().zip(add).zip(sub) {
            *a += p - m;
        }
    }
}
