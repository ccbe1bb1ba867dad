//! Small data and a tiny model for the protocol tests: grayscale 12-px images whose class is their
//! brightness (linearly separable from pooled features, whatever the crop), preprocessed; and a model
//! file of the `cpu-tiny` network.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use swav_core::rng::SplitMix64;
use swav_data::{preprocess, Dataset, PreprocessOptions};
use swav_model::{Arch, ModelConfig, ModelFile, Preprocessing, SwavModel};

/// The `cpu-tiny` preset's network: ResNet-18 of width 4, small stem, one channel, 32-d features.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Resnet18,
        width: Some(4),
        small_stem: true,
        in_channels: 1,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes: vec![10],
        sync_bn: false,
        sync_bn_group: 0,
    }
}

/// A 12 x 12 image of brightness level `level` (of 3), with noise.
fn image(level: usize, rng: &mut SplitMix64) -> image::GrayImage {
    image::GrayImage::from_fn(12, 12, |_, _| image::Luma([(30 + 90 * level as u64 + rng.below(40)) as u8]))
}

/// A labelled dataset of `per_class` images in each of 3 classes. With `shuffled`, each image's
/// brightness is drawn independently of its class: the labels carry no information.
pub fn dataset(root: &Path, name: &str, per_class: usize, shuffled: bool, seed: u64) -> Dataset {
    let input = root.join(format!("{name}-images"));
    let mut rng = SplitMix64::from_key(&[seed, 77]);
    for c in 0..3 {
        let dir = input.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let level = if shuffled { rng.below(3) as usize } else { c };
            image(level, &mut rng).save(dir.join(format!("img{i:03}.png"))).unwrap();
        }
    }
    let output = root.join(name);
    let opts = PreprocessOptions { input, output: output.clone(), workers: 1, ..PreprocessOptions::default() };
    preprocess(&opts, &|_| {}).unwrap();
    Dataset::open(&output).unwrap()
}

/// A model file of a randomly initialised tiny network, with 12-px preprocessing.
pub fn model_file(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    let mut model = SwavModel::new(tiny_config(), 3).unwrap();
    let pre = Preprocessing::recorded(&model.config, vec![0.45], vec![0.3], 12).unwrap();
    ModelFile::write(&mut model, &pre, &BTreeMap::new(), &path).unwrap();
    path
}
