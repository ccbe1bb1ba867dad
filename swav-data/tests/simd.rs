//! The AVX2 kernels and the baseline ones compute bit-identical crops (its own test binary, because the
//! switch is process-wide).

mod common;

use swav_data::*;

#[test]
fn avx2_and_baseline_kernels_agree_bit_for_bit() {
    let rgb = Image::new(90, 120, 3, common::photo(3, 120, 90).into_raw()).unwrap();
    let gray = Image::new(40, 30, 1, common::noise(4, 1200)).unwrap();
    let mut crops = MultiCropConfig::official();
    crops.augment.jitter_p = 1.0;
    crops.augment.blur_p = 1.0;
    let t3 = MultiCropTransform::new(&crops, 3, Layout::Nhwc, &[0.5], &[0.25]).unwrap();
    let t1 = MultiCropTransform::new(&MultiCropConfig::small(24, 12), 1, Layout::Nchw, &[0.5], &[0.25]).unwrap();
    let e = EvalTransform::new(&EvalConfig::imagenet(), 3, Layout::Nchw, &[0.5], &[0.25]).unwrap();
    let run = || {
        let mut out = Vec::new();
        for i in 0..6 {
            out.extend(t3.crops(&rgb, 1, 2, i));
            out.extend(t1.crops(&gray, 1, 2, i));
        }
        out.push(e.apply(&rgb));
        out
    };
    augment::set_simd_enabled(true);
    let fast = run();
    augment::set_simd_enabled(false);
    let base = run();
    augment::set_simd_enabled(true);
    assert_eq!(fast.len(), base.len());
    for (k, (a, b)) in fast.iter().zip(&base).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "crop {k} differs");
    }
}
