//! What the export tests share.

use swav_model::{Arch, ModelConfig};

/// A narrow network (width 8, small head) of the given architecture: fast to build and export.
pub fn small(arch: Arch, small_stem: bool) -> ModelConfig {
    ModelConfig {
        arch,
        width: Some(8),
        small_stem,
        in_channels: 3,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes: vec![10],
        sync_bn: false,
        sync_bn_group: 0,
    }
}
