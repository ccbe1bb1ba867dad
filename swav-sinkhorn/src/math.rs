//! Scalar building blocks shared by the CPU passes (the CUDA kernels spell the same constants in
//! `cuda/kernels.cu`). Everything here is branch-free so that loops over slices vectorise.

/// Scaling factors (`u` per prototype, `v` per sample) are clamped into `[SCALE_MIN, SCALE_MAX]`. For any
/// input that the official code can handle they stay far inside; the clamp only matters for degenerate
/// inputs (where exact Sinkhorn diverges) and guarantees that no sum is zero or infinite.
pub(crate) const SCALE_MIN: f32 = 1e-30;
/// See [`SCALE_MIN`].
pub(crate) const SCALE_MAX: f32 = 1e30;

/// NaN -> -MAX, +-inf -> +-MAX, finite values unchanged. (`f32::max` returns the non-NaN operand;
/// `clamp` would keep NaN.)
#[inline(always)]
#[allow(clippy::manual_clamp)]
pub(crate) fn sanitize(x: f32) -> f32 {
    x.max(-f32::MAX).min(f32::MAX)
}

#[inline(always)]
#[allow(clippy::manual_clamp)]
pub(crate) fn clamp_scale(x: f32) -> f32 {
    x.max(SCALE_MIN).min(SCALE_MAX)
}

/// `true` for NaN and infinities.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn not_finite(x: f32) -> bool {
    !(x.abs() <= f32::MAX)
}

/// `exp(x)` to about 1 ulp (Cephes `expf` polynomial), vectorisable: round-to-nearest by the 1.5 * 2^23
/// trick, `2^n` built from the same bits. Returns exactly 1 for 0, 0 below -87 (and for -inf); inputs
/// above 88 are clamped (we only ever pass `x <= 0`). Never NaN for non-NaN input.
#[inline(always)]
#[allow(clippy::manual_clamp)]
pub(crate) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 355.0 / 512.0; // n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.0).min(88.0);
    let t = xc * LOG2E + MAGIC; // MAGIC + round(xc * log2 e), exactly representable
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold 0x40_0000 + n; (n + 127) << 23 is 2^n (normal since n >= -126).
    let pow2n = f32::from_bits(t.to_bits().wrapping_add(127u32.wrapping_sub(0x4B40_0000)) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_safe() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-f32::MAX), 0.0);
        assert!(exp(88.0).is_finite());
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn sanitize_maps_non_finite_to_finite() {
        assert_eq!(sanitize(f32::NAN), -f32::MAX);
        assert_eq!(sanitize(f32::INFINITY), f32::MAX);
        assert_eq!(sanitize(f32::NEG_INFINITY), -f32::MAX);
        assert_eq!(sanitize(1.5), 1.5);
        assert!(not_finite(f32::NAN) && not_finite(f32::INFINITY) && !not_finite(f32::MAX));
    }
}
