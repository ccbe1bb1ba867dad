//! SplitMix64 (Steele, Lea & Flood 2014): the one random stream of swav-rs, fully specified here so
//! that a seed gives the same crops, the same initial network and the same evaluation on every machine
//! and with every version of every dependency.
//!
//! - step: `state += GAMMA; output = mix(state)`, GAMMA = 0x9E3779B97F4A7C15, `mix` the SplitMix64
//!   finaliser (xor-shift 30, * 0xBF58476D1CE4E5B9, xor-shift 27, * 0x94D049BB133111EB, xor-shift 31);
//! - [`SplitMix64::from_key`] keys a stream by a tuple of integers (e.g. seed, epoch, image, crop):
//!   `h = 0x5357_4156_4441_5441; for k in key { h = mix(h ^ mix(k + GAMMA)) }`, and the state is `h`.
//!   Keyed streams never depend on how work is split between threads;
//! - [`SplitMix64::next_f64`] takes the top 53 bits: `(x >> 11) * 2^-53`, uniform in [0, 1);
//! - [`SplitMix64::below`] is Lemire's multiply-shift with rejection (unbiased);
//! - [`SplitMix64::normal`] is Box-Muller on two draws, keeping the cosine branch only.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic generator; see the module docs for the exact stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from the raw `state`.
    pub fn new(state: u64) -> Self {
        SplitMix64 { state }
    }

    /// A generator keyed by `key`; different keys give independent-looking streams.
    pub fn from_key(key: &[u64]) -> Self {
        let mut h = 0x5357_4156_4441_5441u64;
        for &k in key {
            h = mix(h ^ mix(k.wrapping_add(GAMMA)));
        }
        SplitMix64 { state: h }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// True with probability `p` (`p <= 0` never, `p >= 1` always; one draw is consumed either way).
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Uniform integer in [0, n); `n` must be positive.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Standard normal (Box-Muller, two draws, cosine branch).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle (from the last element down, `j = below(i + 1)`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 from state 0 gives these first outputs (the published algorithm's test vectors,
        // e.g. those of xoshiro's seeding code).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::from_key(&[1, 2, 3]);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[r.below(7) as usize] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn keys_give_different_streams() {
        let first = |key: &[u64]| SplitMix64::from_key(key).next_u64();
        let all = [first(&[0, 0, 0, 0]), first(&[0, 0, 1, 0]), first(&[0, 1, 0, 0]), first(&[0, 0, 0, 1])];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
        assert_eq!(all[0], first(&[0, 0, 0, 0]));
    }

    #[test]
    fn normal_has_unit_moments() {
        let mut r = SplitMix64::new(42);
        let n = 100_000;
        let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }
}
