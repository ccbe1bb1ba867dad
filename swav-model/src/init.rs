//! Deterministic parameter initialisation with PyTorch's distributions: Kaiming-normal (fan-out,
//! ReLU gain) for convolutions as torchvision's ResNet does, and `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
//! for linear layers (PyTorch's default). The generator is SplitMix64 with Box-Muller normals, so a
//! seed gives the same network on every machine (not PyTorch's numbers: its generator differs).

pub struct InitRng(u64);

impl InitRng {
    pub fn new(seed: u64) -> InitRng {
        InitRng(seed ^ 0x5157_4156_494e_4954)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn kaiming_normal_fan_out(&mut self, n: usize, fan_out: usize) -> Vec<f32> {
        let std = (2.0 / fan_out as f64).sqrt();
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    pub fn uniform_fan_in(&mut self, n: usize, fan_in: usize) -> Vec<f32> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| ((self.uniform() * 2.0 - 1.0) * bound) as f32).collect()
    }
}
