//! Augmentations checked against independent formulas: colour operations on fixed parameters, crop box
//! statistics, flip, resampling weights, the blur kernel, the evaluation transform and normalisation.

mod common;

use swav_data::augment::blur::{composed_kernel, extended_box_radius, gaussian_blur, BlurScratch};
use swav_data::augment::color;
use swav_data::augment::resample::{Resampler, Window};
use swav_data::augment::{random_resized_crop_box, CropDecision};
use swav_data::*;

fn rand_image(seed: u64, n: usize) -> Vec<f32> {
    common::noise(seed, n).into_iter().map(|v| v as f32 / 255.0).collect()
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!((x as f64 - y).abs() <= tol, "element {i}: {x} vs {y}");
    }
}

fn gray(p: &[f64]) -> f64 {
    0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

#[test]
fn brightness_contrast_saturation_grayscale() {
    let img = rand_image(1, 12 * 10 * 3);
    let px: Vec<f64> = img.iter().map(|&v| v as f64).collect();
    let c = |v: f64| v.clamp(0.0, 1.0);

    let mut a = img.clone();
    color::brightness(&mut a, 1.37);
    close(&a, &px.iter().map(|&v| c(v * 1.37)).collect::<Vec<_>>(), 1e-6);

    let mut a = img.clone();
    color::contrast(&mut a, 3, 0.55);
    let mean = px.chunks(3).map(gray).sum::<f64>() / (px.len() / 3) as f64;
    close(&a, &px.iter().map(|&v| c(0.55 * v + 0.45 * mean)).collect::<Vec<_>>(), 1e-5);

    // One channel: the mean of the image itself.
    let mut a = img.clone();
    color::contrast(&mut a, 1, 1.6);
    let mean1 = px.iter().sum::<f64>() / px.len() as f64;
    close(&a, &px.iter().map(|&v| c(1.6 * v - 0.6 * mean1)).collect::<Vec<_>>(), 1e-5);

    let mut a = img.clone();
    color::saturation(&mut a, 3, 1.8);
    let want: Vec<f64> = px
        .chunks(3)
        .flat_map(|p| {
            let g = gray(p);
            p.iter().map(move |&v| c(1.8 * v - 0.8 * g)).collect::<Vec<_>>()
        })
        .collect();
    close(&a, &want, 1e-5);

    let mut a = img.clone();
    color::grayscale(&mut a, 3);
    close(&a, &px.chunks(3).flat_map(|p| [gray(p); 3]).collect::<Vec<_>>(), 1e-6);

    // Saturation, hue and grayscale leave one-channel images alone.
    let mut a = img.clone();
    color::saturation(&mut a, 1, 0.2);
    color::hue(&mut a, 1, 0.3);
    color::grayscale(&mut a, 1);
    assert_eq!(a, img);
}

/// Python's `colorsys` algorithm (a different formulation from torchvision's).
fn colorsys_rgb_to_hsv(r: f64, g: f64, b: f64) -> (f64, f64, f64) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if minc == maxc {
        return (0.0, 0.0, maxc);
    }
    let s = (maxc - minc) / maxc;
    let rc = (maxc - r) / (maxc - minc);
    let gc = (maxc - g) / (maxc - minc);
    let bc = (maxc - b) / (maxc - minc);
    let h = if r == maxc {
        bc - gc
    } else if g == maxc {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((h / 6.0).rem_euclid(1.0), s, maxc)
}

fn colorsys_hsv_to_rgb(h: f64, s: f64, v: f64) -> (f64, f64, f64) {
    if s == 0.0 {
        return (v, v, v);
    }
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match (i as i64).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

#[test]
fn hue_rotation() {
    let img = rand_image(2, 9 * 9 * 3);
    for shift in [-0.2f32, -0.05, 0.13, 0.2, 0.5] {
        let mut a = img.clone();
        color::hue(&mut a, 3, shift);
        let want: Vec<f64> = img
            .chunks(3)
            .flat_map(|p| {
                let (h, s, v) = colorsys_rgb_to_hsv(p[0] as f64, p[1] as f64, p[2] as f64);
                let (r, g, b) = colorsys_hsv_to_rgb((h + shift as f64).rem_euclid(1.0), s, v);
                [r, g, b]
            })
            .collect();
        close(&a, &want, 2e-5);
    }
    // Pure colours: a third of a turn maps red to green and green to blue.
    let mut a = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    color::hue(&mut a, 3, 1.0 / 3.0);
    close(&a, &[0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 1e-5);
}

#[test]
fn random_resized_crop_boxes_respect_scale_and_ratio() {
    let (h, w) = (256usize, 341usize);
    let mut rng = SplitMix64::from_key(&[42]);
    let (mut fallback, mut area_sum, mut log_ratio_sum, mut n) = (0, 0.0, 0.0, 0.0);
    for _ in 0..20_000 {
        let b = random_resized_crop_box(&mut rng, h, w, [0.14, 1.0], [0.75, 4.0 / 3.0]);
        assert!(b.height >= 1 && b.width >= 1 && b.top + b.height <= h && b.left + b.width <= w, "{b:?}");
        let frac = (b.height * b.width) as f64 / (h * w) as f64;
        let ratio = b.width as f64 / b.height as f64;
        if (b.height, b.width) == (h, w) {
            fallback += 1;
            continue;
        }
        // w and h are rounded: allow half a pixel on each side.
        let lo = ((b.width as f64 - 0.5) * (b.height as f64 - 0.5)) / (h * w) as f64;
        let hi = ((b.width as f64 + 0.5) * (b.height as f64 + 0.5)) / (h * w) as f64;
        assert!(hi >= 0.14 && lo <= 1.0, "area fraction {frac}");
        let rlo = (b.width as f64 - 0.5) / (b.height as f64 + 0.5);
        let rhi = (b.width as f64 + 0.5) / (b.height as f64 - 0.5);
        assert!(rhi >= 0.75 && rlo <= 4.0 / 3.0, "ratio {ratio}");
        n += 1.0;
        area_sum += frac;
        log_ratio_sum += ratio.ln();
    }
    assert!(fallback < 200, "{fallback} fallbacks");
    // Large areas with extreme ratios do not fit and are retried, so the mean is a bit below 0.57.
    let mean = area_sum / n;
    assert!((0.45..0.58).contains(&mean), "mean area fraction {mean}");
    // ...and tall boxes fail more often on a landscape image, so wide ones dominate a little.
    let lr = log_ratio_sum / n;
    assert!((0.0..0.1).contains(&lr), "mean log ratio {lr}");

    // Small crops always fit: area fraction ~ U(0.05, 0.14), log ratio ~ U(ln 3/4, ln 4/3), position uniform.
    let (mut s, mut s2, mut lr, mut top_frac, n) = (0.0, 0.0, 0.0, 0.0, 20_000.0);
    for _ in 0..20_000 {
        let b = random_resized_crop_box(&mut rng, 300, 300, [0.05, 0.14], [0.75, 4.0 / 3.0]);
        let f = (b.height * b.width) as f64 / 90_000.0;
        s += f;
        s2 += f * f;
        lr += (b.width as f64 / b.height as f64).ln();
        top_frac += b.top as f64 / (300 - b.height) as f64;
    }
    let mean = s / n;
    let var = s2 / n - mean * mean;
    assert!((mean - 0.095).abs() < 0.002, "{mean}");
    assert!((var - 0.09f64.powi(2) / 12.0).abs() < 1e-4, "{var}");
    assert!((lr / n).abs() < 0.01);
    assert!((top_frac / n - 0.5).abs() < 0.02);

    // Impossible boxes: torchvision's centre fallback (ratio clamped to 4/3).
    let b = random_resized_crop_box(&mut rng, 100, 400, [1.0, 1.0], [0.75, 4.0 / 3.0]);
    assert_eq!(b, CropBox { top: 0, left: 133, height: 100, width: 133 });
    let b = random_resized_crop_box(&mut rng, 400, 100, [1.0, 1.0], [0.75, 4.0 / 3.0]);
    assert_eq!(b, CropBox { top: 133, left: 0, height: 133, width: 100 });
}

#[test]
fn crop_decisions_follow_the_probabilities() {
    let a = AugmentConfig::default();
    let n = 20_000;
    let (mut flip, mut jit, mut gray, mut blur) = (0, 0, 0, 0);
    for i in 0..n {
        let mut rng = swav_data::rng::for_crop(1, 2, i, 0);
        let d = CropDecision::draw(&mut rng, &a, 64, 64, [0.14, 1.0]);
        flip += d.flip as usize;
        gray += d.grayscale as usize;
        if let Some((order, f)) = d.jitter {
            jit += 1;
            let mut o = order;
            o.sort();
            assert_eq!(o, [0, 1, 2, 3]);
            for x in &f[..3] {
                assert!((0.2..=1.8).contains(x));
            }
            assert!((-0.2..=0.2).contains(&f[3]));
        }
        if let Some(s) = d.blur_sigma {
            blur += 1;
            assert!((0.1..=2.0).contains(&s));
        }
    }
    let p = |k: usize| k as f64 / n as f64;
    assert!((p(flip) - 0.5).abs() < 0.02 && (p(jit) - 0.8).abs() < 0.02);
    assert!((p(gray) - 0.2).abs() < 0.02 && (p(blur) - 0.5).abs() < 0.02);
}

fn view(px: &[u8], h: usize, w: usize, c: usize) -> ImageView<'_> {
    ImageView { height: h, width: w, channels: c, pixels: px }
}

#[test]
fn resampling_weights_match_pil_bilinear() {
    let (h, w) = (8usize, 16usize);
    let px = common::noise(3, h * w);
    let src = view(&px, h, w, 1);
    let mut r = Resampler::default();
    let full = |oh: usize, ow: usize| Window { y0: 0, x0: 0, h: oh, w: ow };

    // Same size: identity.
    let mut out = vec![0.0; h * w];
    r.resample(src, (0, 0, h, w), (h, w), full(h, w), false, 1.0, &mut out);
    close(&out, &px.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-4);

    // Halving one axis: PIL's triangle filter stretched to support 2 gives taps (1, 3, 3, 1) / 8.
    let mut out = vec![0.0; h * (w / 2)];
    r.resample(src, (0, 0, h, w), (h, w / 2), full(h, w / 2), false, 1.0, &mut out);
    for y in 0..h {
        for x in 1..w / 2 - 1 {
            let s = |i: usize| px[y * w + i] as f64;
            let want = (s(2 * x - 1) + 3.0 * s(2 * x) + 3.0 * s(2 * x + 1) + s(2 * x + 2)) / 8.0;
            assert!((out[y * (w / 2) + x] as f64 - want).abs() < 1e-3, "({y}, {x})");
        }
    }

    // Doubling: textbook bilinear interpolation at u = (x + 0.5) / 2 - 0.5, edges clamped.
    let (oh, ow) = (2 * h, 2 * w);
    let mut out = vec![0.0; oh * ow];
    r.resample(src, (0, 0, h, w), (oh, ow), full(oh, ow), false, 1.0, &mut out);
    let lerp1 = |n: usize, u: f64| -> (usize, usize, f64) {
        let u = u.clamp(0.0, (n - 1) as f64);
        let i = u.floor() as usize;
        (i, (i + 1).min(n - 1), u - i as f64)
    };
    for y in 0..oh {
        for x in 0..ow {
            let (y0, y1, fy) = lerp1(h, (y as f64 + 0.5) / 2.0 - 0.5);
            let (x0, x1, fx) = lerp1(w, (x as f64 + 0.5) / 2.0 - 0.5);
            let p = |yy: usize, xx: usize| px[yy * w + xx] as f64;
            let want =
                (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1)) + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1));
            assert!((out[y * ow + x] as f64 - want).abs() < 1e-3, "({y}, {x}): {} vs {want}", out[y * ow + x]);
        }
    }

    // A crop box reads only its own pixels: cropping then resizing == resizing the cropped copy.
    let (t, l, bh, bw) = (2, 3, 5, 9);
    let cropped: Vec<u8> = (t..t + bh).flat_map(|y| px[y * w + l..y * w + l + bw].to_vec()).collect();
    let mut a = vec![0.0; 7 * 4];
    let mut b = vec![0.0; 7 * 4];
    r.resample(src, (t, l, bh, bw), (7, 4), full(7, 4), false, 1.0, &mut a);
    r.resample(view(&cropped, bh, bw, 1), (0, 0, bh, bw), (7, 4), full(7, 4), false, 1.0, &mut b);
    assert_eq!(a, b);
}

#[test]
fn flip_mirrors_the_crop() {
    let (h, w) = (20usize, 30usize);
    let px = common::noise(4, h * w * 3);
    let src = view(&px, h, w, 3);
    let mut r = Resampler::default();
    let win = Window { y0: 0, x0: 0, h: 12, w: 12 };
    let mut a = vec![0.0; 12 * 12 * 3];
    let mut b = vec![0.0; 12 * 12 * 3];
    r.resample(src, (3, 5, 14, 17), (12, 12), win, false, 1.0 / 255.0, &mut a);
    r.resample(src, (3, 5, 14, 17), (12, 12), win, true, 1.0 / 255.0, &mut b);
    for y in 0..12 {
        for x in 0..12 {
            for c in 0..3 {
                assert_eq!(a[(y * 12 + x) * 3 + c], b[(y * 12 + 11 - x) * 3 + c]);
            }
        }
    }
}

#[test]
fn blur_kernel_has_variance_sigma_squared() {
    for sigma in [0.1f32, 0.37, 0.5, 1.0, 1.5, 2.0] {
        let k = composed_kernel(sigma);
        let c = (k.len() / 2) as f64;
        let sum: f64 = k.iter().sum();
        let var: f64 = k.iter().enumerate().map(|(i, &v)| v * (i as f64 - c).powi(2)).sum();
        assert!((sum - 1.0).abs() < 1e-6, "sigma {sigma}: sum {sum}");
        assert!((var - (sigma as f64).powi(2)).abs() < 1e-4 * (1.0 + var), "sigma {sigma}: variance {var}");
    }
    // PIL's extended box radius for sigma 1: sigma^2/3 = 1/3, L = sqrt(5), l = 0, a = -1/(6 (1/3 - 1)) = 1/4.
    assert!((extended_box_radius(1.0) - 0.25).abs() < 1e-6);
}

#[test]
fn blur_of_an_impulse_is_the_separable_kernel() {
    let (n, c) = (31usize, 3usize);
    for sigma in [0.6f32, 1.9] {
        let mut img = vec![0.0f32; n * n * c];
        let mid = n / 2;
        for ch in 0..c {
            img[(mid * n + mid) * c + ch] = 1.0 + ch as f32;
        }
        gaussian_blur(&mut img, n, n, c, sigma, &mut BlurScratch::default());
        let k = composed_kernel(sigma);
        let r = k.len() / 2;
        let kv = |d: isize| {
            if d.unsigned_abs() <= r {
                k[(d + r as isize) as usize]
            } else {
                0.0
            }
        };
        for y in 0..n {
            for x in 0..n {
                for ch in 0..c {
                    let want = (1.0 + ch as f64) * kv(y as isize - mid as isize) * kv(x as isize - mid as isize);
                    assert!((img[(y * n + x) * c + ch] as f64 - want).abs() < 1e-5, "sigma {sigma} ({y},{x},{ch})");
                }
            }
        }
    }
    // Constant images stay constant (edges replicated); 1-channel too.
    let mut img = vec![0.3f32; 9 * 7];
    gaussian_blur(&mut img, 9, 7, 1, 2.0, &mut BlurScratch::default());
    assert!(img.iter().all(|&v| (v - 0.3).abs() < 1e-6));
}

#[test]
fn normalisation_and_channel_expansion() {
    // A constant grey image with every random colour operation disabled: each output is (v - m) / s.
    let img = Image::new(40, 50, 1, vec![200u8; 40 * 50]).unwrap();
    let mut cfg = MultiCropConfig::small(16, 8);
    cfg.augment = AugmentConfig {
        jitter_p: 0.0,
        grayscale_p: 0.0,
        blur_p: 0.0,
        mean: Some(vec![0.1, 0.2, 0.3]),
        std: Some(vec![0.5, 0.25, 2.0]),
        ..AugmentConfig::default()
    };
    let t = MultiCropTransform::new(&cfg, 3, Layout::Nhwc, &[0.0], &[1.0]).unwrap();
    let crops = t.crops(&img, 0, 0, 0);
    assert_eq!(crops.len(), 6);
    let v = 200.0 / 255.0;
    for crop in &crops {
        for p in crop.chunks(3) {
            close(p, &[(v - 0.1) / 0.5, (v - 0.2) / 0.25, (v - 0.3) / 2.0], 1e-5);
        }
    }
    // Three-value normalisation on a one-channel output is refused with a clear message.
    let err = MultiCropTransform::new(&cfg, 1, Layout::Nhwc, &[0.0], &[1.0]).unwrap_err().to_string();
    assert!(err.contains("3 values") && err.contains("1 channel"), "{err}");
    // Dataset statistics are the default.
    cfg.augment.mean = None;
    cfg.augment.std = None;
    let t = MultiCropTransform::new(&cfg, 1, Layout::Nhwc, &[0.5], &[0.25]).unwrap();
    for x in &t.crops(&img, 0, 0, 0)[0] {
        assert!((x - (v as f32 - 0.5) / 0.25).abs() < 1e-5);
    }
}

#[test]
fn eval_transform_resize_centre_crop_and_padding() {
    let t = EvalTransform::new(&EvalConfig::imagenet(), 3, Layout::Nhwc, &[0.0], &[1.0]).unwrap();
    assert_eq!(t.resized_size(375, 500), (256, 341));
    assert_eq!(t.resized_size(500, 375), (341, 256));
    assert_eq!(t.resized_size(256, 256), (256, 256));

    // A horizontal ramp, resized to the same height and cropped: the crop is the central columns.
    let (h, w) = (10usize, 20usize);
    let px: Vec<u8> = (0..h).flat_map(|_| (0..w).map(|x| (x * 10) as u8)).collect();
    let img = Image::new(h as u32, w as u32, 1, px).unwrap();
    let cfg = EvalConfig { resize: 10, crop: 6, mean: Some(vec![0.0]), std: Some(vec![1.0]) };
    let t = EvalTransform::new(&cfg, 1, Layout::Nhwc, &[0.0], &[1.0]).unwrap();
    let out = t.apply(&img);
    // top = round((10 - 6) / 2) = 2, left = round((20 - 6) / 2) = 7.
    for y in 0..6 {
        for x in 0..6 {
            assert!((out[y * 6 + x] - ((x + 7) * 10) as f32 / 255.0).abs() < 1e-5);
        }
    }
    // Crop larger than the image: zero padding (2 before, 2 after for 10 -> 14), normalised.
    let cfg = EvalConfig { resize: 10, crop: 14, mean: Some(vec![0.5]), std: Some(vec![0.5]) };
    let img = Image::new(10, 10, 1, vec![255u8; 100]).unwrap();
    let out = EvalTransform::new(&cfg, 1, Layout::Nhwc, &[0.0], &[1.0]).unwrap().apply(&img);
    for y in 0..14 {
        for x in 0..14 {
            let inside = (2..12).contains(&y) && (2..12).contains(&x);
            let want = if inside { 1.0 } else { -1.0 };
            assert!((out[y * 14 + x] - want).abs() < 1e-5, "({y},{x}) = {}", out[y * 14 + x]);
        }
    }
}

#[test]
fn configs_round_trip_through_toml_and_validate() {
    for cfg in [
        MultiCropConfig::official(),
        MultiCropConfig::two_224(),
        MultiCropConfig::small(28, 16),
        MultiCropConfig::fashion_mnist(),
    ] {
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        let back: MultiCropConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }
    let text = "[[groups]]\ncount = 2\nsize = 32\nmin_scale = 0.2\nmax_scale = 1.0\n\n[augment]\nblur_p = 0.0\n";
    let cfg: MultiCropConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.augment.blur_p, 0.0);
    assert_eq!(cfg.augment.flip_p, 0.5);
    assert_eq!(MultiCropConfig::preset("2x224+6x96").unwrap(), MultiCropConfig::official());
    let p = MultiCropConfig::preset("2x160+4x96").unwrap();
    assert_eq!((p.groups[0].min_scale, p.groups[1].max_scale, p.num_crops()), (0.14, 0.14, 6));
    assert_eq!(MultiCropConfig::preset("3x64").unwrap().groups[0].min_scale, 0.08);
    assert!(MultiCropConfig::preset("lots").is_err());
    assert!(toml::from_str::<MultiCropConfig>("groups = []\nbogus = 1\n").is_err());
    let mut bad = MultiCropConfig::official();
    bad.groups[1].min_scale = 0.5;
    assert!(bad.validate().unwrap_err().to_string().contains("crop group 1"));
}

#[test]
fn degenerate_shapes_give_finite_crops() {
    let mut cfg = MultiCropConfig::official();
    cfg.augment.jitter_p = 1.0;
    cfg.augment.blur_p = 1.0;
    cfg.augment.grayscale_p = 0.5;
    let t3 = MultiCropTransform::new(&cfg, 3, Layout::Nchw, &[0.5], &[0.25]).unwrap();
    let t1 = MultiCropTransform::new(&MultiCropConfig::small(28, 16), 1, Layout::Nhwc, &[0.5], &[0.25]).unwrap();
    let e = EvalTransform::new(&EvalConfig::imagenet(), 3, Layout::Nhwc, &[0.5], &[0.25]).unwrap();
    for (h, w) in [(1u32, 1u32), (1, 300), (300, 1), (2, 3), (5, 4000)] {
        for c in [1u8, 3] {
            let n = (h * w) as usize * c as usize;
            let img = Image::new(h, w, c, common::noise(h as u64 * 7 + w as u64, n)).unwrap();
            for i in 0..4 {
                for crop in t3.crops(&img, 1, 0, i).iter().chain(&t1.crops(&img, 1, 0, i)) {
                    assert!(crop.iter().all(|v| v.is_finite()), "{h}x{w}x{c}");
                }
            }
            let out = e.apply(&img);
            assert_eq!(out.len(), 224 * 224 * 3);
            assert!(out.iter().all(|v| v.is_finite()));
        }
    }
}
