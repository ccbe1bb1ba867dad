//! Deterministic parameter initialisation with PyTorch's distributions: Kaiming-normal (fan-out,
//! ReLU gain) for convolutions as torchvision's ResNet does, and `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
//! for linear layers (PyTorch's default). The stream is swav-core's SplitMix64, so a seed gives the
//! same network on every machine (not PyTorch's numbers: its generator differs).

use swav_core::rng::SplitMix64;

/// The initialisation stream of one network.
pub struct InitRng(SplitMix64);

impl InitRng {
    /// The stream of `seed` (kept apart from the loader's streams of the same seed by a constant).
    pub fn new(seed: u64) -> InitRng {
        InitRng(SplitMix64::new(seed ^ 0x5157_4156_494e_4954))
    }

    /// `n` values from N(0, 2 / fan_out).
    pub fn kaiming_normal_fan_out(&mut self, n: usize, fan_out: usize) -> Vec<f32> {
        let std = (2.0 / fan_out as f64).sqrt();
        (0..n).map(|_| (self.0.normal() * std) as f32).collect()
    }

    /// `n` values from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn uniform_fan_in(&mut self, n: usize, fan_in: usize) -> Vec<f32> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| ((self.0.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
    }
}
