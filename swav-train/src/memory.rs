//! How much memory a training run needs, estimated from its configuration alone before anything is
//! allocated, so that a configuration that cannot fit (a typo of `--set model.prototypes=[100000000]`,
//! a batch meant for a GPU) is refused with the estimate instead of growing until the system kills it.
//!
//! Parameters are counted three times (value, gradient, momentum buffer), activations of every crop
//! group three times (each convolution's output, its batch norm's output, and their gradients in the
//! backward), the head's and the scores' rows twice, plus the loader's prefetched batches. This is an
//! estimate of the order of magnitude (measured within a factor of two of the peak RSS on the presets).

use crate::config::Config;

const F32: u128 = 4;

/// The parts of the estimate, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Parameters with their gradients and momentum buffers.
    pub parameters: u128,
    /// Activations kept for the backward, with their gradients.
    pub activations: u128,
    /// Crop batches prepared ahead by the loader.
    pub loader: u128,
}

impl MemoryEstimate {
    /// The sum of the parts.
    pub fn total(&self) -> u128 {
        self.parameters + self.activations + self.loader
    }
}

/// The estimate for a run with this configuration.
pub fn estimate(config: &Config) -> MemoryEstimate {
    let m = &config.model;
    let batch = config.train.batch_size as u128;
    let mut activations = 0u128;
    let mut crop_values = 0u128;
    for g in &config.crops.groups {
        let images = g.count as u128 * batch;
        activations += 3 * images * m.activation_values(g.size);
        crop_values += images * (g.size as u128).pow(2) * m.in_channels as u128;
    }
    let rows = config.crops.num_crops() as u128 * batch;
    let k: u128 = m.prototypes.iter().map(|&k| k as u128).sum();
    activations += 2 * rows * (m.hidden_mlp as u128 * 2 + m.feat_dim as u128 + 2 * k);
    MemoryEstimate {
        parameters: 3 * m.state_values() * F32,
        activations: activations * F32,
        loader: (config.train.prefetch as u128 + 1) * crop_values * F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_grows_with_what_it_should() {
        let base = crate::config::load(crate::config::preset("cpu-tiny").unwrap().toml, &[]).unwrap();
        let e = estimate(&base);
        assert!(e.parameters > 0 && e.activations > 0 && e.loader > 0);
        let more = |set: &str| {
            estimate(&crate::config::load(crate::config::preset("cpu-tiny").unwrap().toml, &[set.into()]).unwrap())
        };
        assert!(more("train.batch_size=64").activations > 3 * e.activations);
        assert!(more("model.prototypes=[100000000]").parameters > 100_000_000 * 4);
        // The official recipe at batch 64 on a GPU needs gigabytes: the order of magnitude holds.
        let official = crate::config::load(
            crate::config::preset("imagenet-rn50-400ep-bs256").unwrap().toml,
            &["train.batch_size=64".into()],
        )
        .unwrap();
        let total = estimate(&official).total();
        assert!((4u128 << 30..64u128 << 30).contains(&total), "{total}");
    }
}
