//! The kernels compute bit-identical crops at every instruction-set level (AVX-512, AVX2, baseline):
//! the CPU changes the speed, never the batches.

mod common;

use swav_data::*;

#[test]
fn every_instruction_set_gives_the_same_crops() {
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
    use swav_core::isa::{available, with_ceiling, Isa};
    eprintln!("this CPU: {}", available());
    let base = with_ceiling(Isa::Baseline, run);
    for isa in [Isa::Avx2, Isa::Avx512] {
        let fast = with_ceiling(isa, run);
        assert_eq!(fast.len(), base.len());
        for (k, (a, b)) in fast.iter().zip(&base).enumerate() {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{isa}: crop {k} differs");
        }
    }
}
