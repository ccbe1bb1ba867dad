//! Checkpoints: names, layouts, round trips and clear errors.

use std::collections::BTreeMap;

use swav_model::checkpoint::{load_model_state, model_state, LoadOptions, NamedTensors, Value};
use swav_model::param::{Slot, Visit};
use swav_model::{Arch, ModelConfig, ModelFile, Preprocessing, SwavModel};

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
fn names_follow_torchvision_and_the_official_head() {
    let mut m = SwavModel::new(small(Arch::Resnet50), 0).unwrap();
    let state = model_state(&mut m);
    for name in [
        "conv1.weight",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer4.2.bn3.bias",
        "projection_head.0.weight",
        "projection_head.1.weight",
        "projection_head.3.bias",
        "prototypes.weight",
    ] {
        assert!(state.tensors.contains_key(name), "missing {name}");
    }
    // Convolution weights are stored OIHW as in PyTorch: [out, in, kh, kw].
    assert_eq!(state.tensors["conv1.weight"].shape(), [8, 3, 7, 7]);
    assert_eq!(state.tensors["layer1.0.conv2.weight"].shape(), [8, 8, 3, 3]);
    let mut r18 = SwavModel::new(small(Arch::Resnet18), 0).unwrap();
    assert!(model_state(&mut r18).tensors.contains_key("layer4.1.conv2.weight"));
    let mut multi = SwavModel::new(ModelConfig { prototypes: vec![10, 20], ..small(Arch::Resnet18) }, 0).unwrap();
    let s = model_state(&mut multi);
    assert!(
        s.tensors.contains_key("prototypes.prototypes0.weight")
            && s.tensors.contains_key("prototypes.prototypes1.weight")
    );
}

#[test]
fn save_and_load_round_trip_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut m = SwavModel::new(small(Arch::Resnet18), 3).unwrap();
    // Make the running statistics non-trivial.
    m.visit("", &mut |_, slot| {
        if let Slot::Buffer(t) = slot {
            t.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v += i as f32 * 0.01)
        }
    });
    let pre = Preprocessing::recorded(&m.config, vec![0.5, 0.4, 0.3], vec![0.2], 20).unwrap();
    ModelFile::write(&mut m, &pre, &BTreeMap::from([("note".to_string(), "x".to_string())]), &path).unwrap();
    let ModelFile { model: mut back, preprocessing, .. } = ModelFile::read(&path).unwrap();
    assert_eq!(back.config, m.config);
    assert_eq!(preprocessing, pre);
    assert_eq!(preprocessing.std, vec![0.2; 3]);
    assert_eq!(model_state(&mut back).tensors, model_state(&mut m).tensors);
    let file = NamedTensors::read(&path).unwrap();
    assert_eq!(file.metadata["note"], "x");
    // Different seed, same config: loading overwrites every value.
    let mut other = SwavModel::new(small(Arch::Resnet18), 99).unwrap();
    load_model_state(&mut other, &file, "", LoadOptions::default()).unwrap();
    assert_eq!(model_state(&mut other).tensors, model_state(&mut m).tensors);
}

#[test]
fn module_prefix_is_stripped_and_mismatches_are_named() {
    let mut m = SwavModel::new(small(Arch::Resnet18), 1).unwrap();
    let state = model_state(&mut m);
    let mut ddp = NamedTensors::default();
    for (k, v) in &state.tensors {
        ddp.tensors.insert(format!("module.{k}"), v.clone());
    }
    let mut fresh = SwavModel::new(small(Arch::Resnet18), 2).unwrap();
    let report = load_model_state(&mut fresh, &ddp, "", LoadOptions::default()).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty());
    assert_eq!(model_state(&mut fresh).tensors, state.tensors);

    // A mis-shaped tensor is named with both shapes.
    let mut bad = state.clone();
    bad.tensors.insert("layer2.0.conv1.weight".into(), Value::F32 { shape: vec![16, 8, 1, 3], data: vec![0.0; 384] });
    let err = load_model_state(&mut fresh, &bad, "", LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("layer2.0.conv1.weight") && err.contains("[16, 8, 3, 3]"), "{err}");

    // Missing and unexpected tensors are listed unless allowed.
    let mut partial = state.clone();
    partial.tensors.remove("prototypes.weight");
    partial.tensors.insert("fc.weight".into(), Value::F32 { shape: vec![2], data: vec![0.0; 2] });
    let err = load_model_state(&mut fresh, &partial, "", LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("prototypes.weight"), "{err}");
    let opts = LoadOptions { allow_missing: true, allow_unexpected: true };
    let report = load_model_state(&mut fresh, &partial, "", opts).unwrap();
    assert_eq!(report.missing, vec!["prototypes.weight".to_string()]);
    assert_eq!(report.unexpected, vec!["fc.weight".to_string()]);
}

#[test]
fn loading_a_file_that_is_not_safetensors_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"not a checkpoint at all").unwrap();
    let err = ModelFile::read(&path).err().unwrap().to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
    assert!(ModelFile::read(&dir.path().join("absent.safetensors")).is_err());
}

#[test]
fn state_size_from_the_configuration_matches_the_built_network() {
    let configs = [
        small(Arch::Resnet18),
        small(Arch::Resnet34),
        small(Arch::Resnet50),
        ModelConfig { small_stem: true, in_channels: 1, hidden_mlp: 0, ..small(Arch::Resnet18) },
        ModelConfig { head_bn: false, prototypes: vec![10, 7, 3], ..small(Arch::Resnet50) },
        ModelConfig { width: Some(4), ..small(Arch::Resnet50w2) },
    ];
    for cfg in configs {
        let mut m = SwavModel::new(cfg.clone(), 0).unwrap();
        let built: usize = model_state(&mut m).tensors.values().map(|v| v.shape().iter().product::<usize>()).sum();
        assert_eq!(cfg.state_values(), built as u128, "{cfg:?}");
    }
    // The official ResNet-50 with its head and 3000 prototypes: 28.4 M parameters plus statistics.
    let official = ModelConfig::swav_resnet50().state_values();
    assert!((28_000_000..29_000_000).contains(&official), "{official}");
}

/// A model file whose configuration was edited to describe a huge network is refused before the
/// network is built (which would need gigabytes), and so is a file with a NaN weight.
#[test]
fn hostile_metadata_and_non_finite_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut m = SwavModel::new(small(Arch::Resnet18), 3).unwrap();
    let pre = Preprocessing::recorded(&m.config, vec![0.5], vec![0.5], 32).unwrap();
    ModelFile::write(&mut m, &pre, &BTreeMap::new(), &path).unwrap();
    let file = NamedTensors::read(&path).unwrap();
    for (key, value) in [("width", "3000"), ("feat_dim", "1000000000"), ("prototypes", "[1000000000]")] {
        let mut forged = file.clone();
        let mut cfg: serde_json::Value = serde_json::from_str(&forged.metadata["model_config"]).unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        forged.metadata.insert("model_config".into(), cfg.to_string());
        let bad = dir.path().join(format!("forged-{key}.safetensors"));
        forged.write(&bad).unwrap();
        let err = ModelFile::read(&bad).err().unwrap().to_string();
        assert!(err.contains("does not match the tensors"), "{key}: {err}");
    }
    let mut nan = file.clone();
    if let Some(Value::F32 { data, .. }) = nan.tensors.get_mut("layer1.0.conv1.weight") {
        data[5] = f32::NAN;
    }
    let bad = dir.path().join("nan.safetensors");
    nan.write(&bad).unwrap();
    let err = ModelFile::read(&bad).err().unwrap().to_string();
    assert!(err.contains("layer1.0.conv1.weight") && err.contains("non-finite"), "{err}");
    let mut size = file.clone();
    size.metadata.insert("input_size".into(), "16384".into());
    let bad = dir.path().join("size.safetensors");
    size.write(&bad).unwrap();
    let err = ModelFile::read(&bad).err().unwrap().to_string();
    assert!(err.contains("16384"), "{err}");
}
