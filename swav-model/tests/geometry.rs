//! The convolution shapes a model reports for planning, against its forward.

use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::Tensor;

fn small(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        width: Some(8),
        small_stem: false,
        in_channels: 3,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes: vec![10],
        sync_bn: false,
        sync_bn_group: 0,
    }
}

#[test]
fn conv_geometries_follow_the_forward() {
    // Every convolution once (stem, blocks, shortcuts), and the last one at the size the forward
    // actually reaches (checked by running it: the pooled features come from that map).
    for (arch, small_stem, size, convs, last) in
        [(Arch::Resnet18, true, 28, 20, 4), (Arch::Resnet18, false, 64, 20, 2), (Arch::Resnet50, false, 64, 53, 2)]
    {
        let model = SwavModel::new(ModelConfig { small_stem, ..small(arch) }, 0).unwrap();
        let geoms = model.conv_geometries(3, size, size).unwrap();
        assert_eq!(geoms.len(), convs, "{arch:?}");
        assert!(geoms.iter().all(|g| g.n == 3));
        assert_eq!(geoms[0].cin, 3);
        let deepest = geoms.iter().map(|g| g.oh).min().unwrap();
        assert_eq!(deepest, last, "{arch:?} at {size}");
        let x = Tensor::zeros(&[3, size, size, 3], swav_tensor::Device::Cpu);
        assert!(model.backbone.forward_eval(&x).is_ok());
    }
}
