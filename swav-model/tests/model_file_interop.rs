//! `ModelFile::read` on the files of the PyTorch world: the PyTorch-made fixtures and safetensors
//! state dicts without swav-rs metadata are read by content, their network detected, their weights
//! loaded bit-exactly and giving PyTorch's features, their preprocessing reported as defaults; hostile
//! ones are refused before allocation. Then pretrained starts from them (`init_from_file`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use swav_core::imagenet;
use swav_model::checkpoint::{model_state, NamedTensors, Value};
use swav_model::file::{FileKind, HEAD_FRESH, META_HEAD};
use swav_model::param::Visit;
use swav_model::torch::{read_torch_file, Container, TorchFormat};
use swav_model::{
    init_from_file, Arch, InitScope, ModelConfig, ModelError, ModelFile, Overrides, Preprocessing, Source, SwavModel,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

#[derive(serde::Deserialize)]
struct Fixture {
    file: String,
    kind: String,
    expect: String,
    format: String,
    container: Vec<String>,
    entries: BTreeMap<String, String>,
    model_config: Option<ModelConfig>,
    strict: bool,
}

fn model_fixtures() -> Vec<Fixture> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        fixtures: Vec<Fixture>,
    }
    let m: Manifest = serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap();
    m.fixtures.into_iter().filter(|f| f.kind == "model").collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den).sqrt()
}

/// PyTorch's eval-mode backbone features for the fixture's images against the model's.
fn features_error(model: &SwavModel, f: &Fixture) -> f64 {
    let e = NamedTensors::read(&dir().join(&f.expect)).unwrap();
    let images = e.tensor("input.images").unwrap();
    let (_, want) = e.f32("expect.features").unwrap();
    rel_l2(&model.features(&images).unwrap().to_vec(), want)
}

/// The file's tensors with `module.` stripped and `fc.*` left out.
fn source_tensors(path: &Path) -> BTreeMap<String, Value> {
    read_torch_file(path)
        .unwrap()
        .state
        .tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .filter(|(k, _)| !k.starts_with("fc."))
        .collect()
}

fn same_bits(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32 { shape: sa, data: da }, Value::F32 { shape: sb, data: db }) => {
            sa == sb && da.iter().zip(db).all(|(x, y)| x.to_bits() == y.to_bits()) && da.len() == db.len()
        }
        _ => a == b,
    }
}

fn imagenet_defaults(p: &Preprocessing) {
    assert_eq!(p.mean, imagenet::MEAN.to_vec());
    assert_eq!(p.std, imagenet::STD.to_vec());
    assert_eq!(p.input_size, 224);
    assert_eq!([p.mean_source, p.std_source, p.input_size_source], [Source::Default; 3]);
}

#[test]
fn pytorch_files_read_as_model_files() {
    let fixtures = model_fixtures();
    assert_eq!(fixtures.len(), 6);
    for f in &fixtures {
        let path = dir().join(&f.file);
        let file = ModelFile::read(&path).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        let format = if f.format == "zip" { TorchFormat::Zip } else { TorchFormat::Legacy };
        assert_eq!(file.origin.kind, FileKind::Torch(format), "{}", f.file);
        let container = if f.container.is_empty() { Container::Bare } else { Container::Key(f.container.clone()) };
        assert_eq!(file.origin.container, Some(container), "{}", f.file);
        assert_eq!(file.origin.entries, f.entries, "{}", f.file);
        assert!(file.metadata.is_empty(), "{}", f.file);
        imagenet_defaults(&file.preprocessing);
        let made_with = f.model_config.clone().unwrap();
        let mut model = file.model;
        if f.strict {
            assert!(file.origin.head && file.origin.ignored.is_empty(), "{}", f.file);
            assert_eq!(model.config, made_with.canonical(), "{}", f.file);
        } else {
            assert!(!file.origin.head, "{}", f.file);
            assert_eq!(file.origin.ignored, ["fc.bias", "fc.weight"], "{}", f.file);
            assert_eq!((model.config.arch, model.config.width()), (Arch::Resnet18, 8));
        }
        // Every tensor of the file is in the model bit for bit (fp16 and bf16 widen exactly).
        let state = model_state(&mut model).tensors;
        for (name, value) in source_tensors(&path) {
            assert!(same_bits(&state[&name], &value), "{}: {name}", f.file);
        }
        let err = features_error(&model, f);
        assert!(err < 1e-5, "{}: features differ from PyTorch's by {err:.2e}", f.file);
    }
}

#[test]
fn foreign_safetensors_state_dicts_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let f = model_fixtures().into_iter().find(|f| f.file == "swav_r50w4_checkpoint.pth").unwrap();
    let torch = read_torch_file(&dir().join(&f.file)).unwrap();
    // As other tools write them: names as in the PyTorch file, a `format` tag, no swav-rs keys.
    let path = tmp.path().join("foreign.safetensors");
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    NamedTensors { tensors: torch.state.tensors.clone(), metadata: meta.clone() }.write(&path).unwrap();
    let file = ModelFile::read(&path).unwrap();
    assert_eq!(file.origin.kind, FileKind::Safetensors);
    assert_eq!(file.origin.container, None);
    assert_eq!(file.metadata, meta);
    assert_eq!(file.model.config, f.model_config.clone().unwrap().canonical());
    imagenet_defaults(&file.preprocessing);
    assert!(features_error(&file.model, &f) < 1e-5);

    // What such a file records in swav-rs's keys is used, and reported as recorded; overrides win.
    let recorded = tmp.path().join("recorded.safetensors");
    let meta =
        BTreeMap::from([("mean".to_string(), "[0.5]".to_string()), ("input_size".to_string(), "96".to_string())]);
    NamedTensors { tensors: torch.state.tensors.clone(), metadata: meta }.write(&recorded).unwrap();
    let p = ModelFile::read_with(&recorded, &Overrides { input_size: Some(64), ..Default::default() })
        .unwrap()
        .preprocessing;
    assert_eq!((p.mean, p.mean_source), (vec![0.5; 3], Source::Checkpoint));
    assert_eq!((p.std, p.std_source), (imagenet::STD.to_vec(), Source::Default));
    assert_eq!((p.input_size, p.input_size_source), (64, Source::Override));
}

#[test]
fn swav_rs_files_marked_fresh_report_no_trained_head() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = SwavModel::new(small(Arch::Resnet18, 8), 1).unwrap();
    let pre = Preprocessing::recorded(&m.config, vec![0.5], vec![0.5], 32).unwrap();
    let path = tmp.path().join("m.safetensors");
    ModelFile::write(&mut m, &pre, &BTreeMap::new(), &path).unwrap();
    let plain = ModelFile::read(&path).unwrap();
    assert_eq!(plain.origin.kind, FileKind::SwavRs);
    assert!(plain.origin.head);
    ModelFile::write(&mut m, &pre, &BTreeMap::from([(META_HEAD.to_string(), HEAD_FRESH.to_string())]), &path).unwrap();
    assert!(!ModelFile::read(&path).unwrap().origin.head);
}

fn small(arch: Arch, width: usize) -> ModelConfig {
    ModelConfig {
        arch,
        width: Some(width),
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
fn hostile_foreign_files_are_refused_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = SwavModel::new(small(Arch::Resnet18, 4), 2).unwrap();
    let state = model_state(&mut m);
    let write = |name: &str, s: &NamedTensors| {
        let p = tmp.path().join(name);
        s.write(&p).unwrap();
        p
    };
    // A stem and first block that claim 512 channels over tiny later stages: a network of hundreds
    // of millions of values from a 20 MB file.
    let mut forged = state.clone();
    forged.tensors.retain(|k, _| !k.starts_with("projection_head") && !k.starts_with("prototypes"));
    forged.tensors.insert("conv1.weight".into(), Value::F32 { shape: vec![512, 3, 7, 7], data: vec![0.5; 512 * 147] });
    forged.tensors.insert(
        "layer1.0.conv1.weight".into(),
        Value::F32 { shape: vec![512, 512, 3, 3], data: vec![0.5; 512 * 512 * 9] },
    );
    forged.tensors.insert(
        "layer1.0.conv2.weight".into(),
        Value::F32 { shape: vec![512, 512, 3, 3], data: vec![0.5; 512 * 512 * 9] },
    );
    let path = write("forged.safetensors", &forged);
    let err = ModelFile::read(&path).err().unwrap().to_string();
    assert!(err.contains("the tensor shapes describe a network of") && err.contains("forged.safetensors"), "{err}");

    // Non-finite values are refused naming the tensor.
    let mut nan = state.clone();
    if let Some(Value::F32 { data, .. }) = nan.tensors.get_mut("layer2.1.bn1.running_var") {
        data[1] = f32::INFINITY;
    }
    let err = ModelFile::read(&write("nan.safetensors", &nan)).err().unwrap().to_string();
    assert!(err.contains("layer2.1.bn1.running_var") && err.contains("non-finite"), "{err}");

    // Unrecognisable files name the file and the reason.
    let mut renamed = NamedTensors::default();
    for (k, v) in &state.tensors {
        renamed.tensors.insert(format!("encoder.{k}"), v.clone());
    }
    let err = ModelFile::read(&write("renamed.safetensors", &renamed)).err().unwrap();
    assert!(matches!(err, ModelError::Unrecognised { .. }), "{err}");
    let err = err.to_string();
    assert!(err.contains("renamed.safetensors") && err.contains("prefix `encoder.`"), "{err}");

    // A backbone-only file that lacks a backbone tensor is refused, naming it; one that lacks a
    // head tensor of a head it has, too (the loader's strict check).
    let mut torchvision_like = state.clone();
    torchvision_like.tensors.retain(|k, _| !k.starts_with("projection_head") && !k.starts_with("prototypes"));
    torchvision_like.tensors.remove("layer3.1.bn2.running_var");
    let err = ModelFile::read(&write("partial.safetensors", &torchvision_like)).err().unwrap().to_string();
    assert!(err.contains("layer3.1.bn2.running_var") && err.contains("backbone tensors missing"), "{err}");
    let mut headless = state.clone();
    headless.tensors.remove("projection_head.1.running_var");
    let err = ModelFile::read(&write("headless.safetensors", &headless)).err().unwrap().to_string();
    assert!(err.contains("projection_head.1.running_var"), "{err}");

    // Names the network does not have are refused, not silently dropped (only `fc.*` is).
    let mut extra = state.clone();
    extra.tensors.insert("attention.weight".into(), Value::F32 { shape: vec![2], data: vec![0.0; 2] });
    let err = ModelFile::read(&write("extra.safetensors", &extra)).err().unwrap().to_string();
    assert!(err.contains("attention.weight"), "{err}");

    // The trainer's optimizer state is not a model, and is named as what it is.
    let mut train_state = NamedTensors::default();
    for (k, v) in &state.tensors {
        train_state.tensors.insert(format!("momentum.{k}"), v.clone());
    }
    let err = ModelFile::read(&write("step-1.train.safetensors", &train_state)).err().unwrap().to_string();
    assert!(err.contains("training-state file") && err.contains("step-1.train.safetensors"), "{err}");

    // A PyTorch file the reader refuses is reported as such, with its path.
    let err = ModelFile::read(&dir().join("hostile_os_system.pth")).err().unwrap().to_string();
    assert!(err.contains("hostile_os_system.pth") && err.contains("refusing global os.system"), "{err}");
}

/// Names of a model's tensors, sorted.
fn names(m: &mut SwavModel) -> Vec<String> {
    let mut all = BTreeSet::new();
    m.visit("", &mut |n, _| {
        all.insert(n.to_string());
    });
    all.into_iter().collect()
}

#[test]
fn pretrained_starts_load_the_whole_model_or_its_backbone() {
    let fixtures = model_fixtures();
    let swav = fixtures.iter().find(|f| f.file == "swav_r50w4_legacy.pth.tar").unwrap();
    let tv = fixtures.iter().find(|f| f.file == "torchvision_r18w8.pth").unwrap();

    // Whole: every tensor is the file's.
    let config = swav.model_config.clone().unwrap();
    let mut model = SwavModel::new(config.clone(), 77).unwrap();
    let report = init_from_file(&mut model, &dir().join(&swav.file), InitScope::Whole).unwrap();
    assert_eq!(report.loaded, names(&mut model));
    assert!(report.kept.is_empty());
    assert_eq!(report.origin.kind, FileKind::Torch(TorchFormat::Legacy));
    let state = model_state(&mut model).tensors;
    let source = source_tensors(&dir().join(&swav.file));
    assert_eq!(state.len(), source.len());
    for (name, value) in &source {
        assert!(same_bits(&state[name], value), "{name}");
    }
    assert!(features_error(&model, swav) < 1e-5);

    // Backbone: a different head; the backbone is the file's, the head what the seed made.
    let own_head = ModelConfig { hidden_mlp: 0, feat_dim: 12, prototypes: vec![5, 6], ..config.clone() };
    let mut model = SwavModel::new(own_head.clone(), 78).unwrap();
    let report = init_from_file(&mut model, &dir().join(&swav.file), InitScope::Backbone).unwrap();
    let fresh = model_state(&mut SwavModel::new(own_head, 78).unwrap()).tensors;
    let state = model_state(&mut model).tensors;
    assert!(!report.loaded.is_empty() && !report.kept.is_empty());
    for name in &report.loaded {
        assert!(swav_model::file::is_backbone_name(name), "{name}");
        assert!(same_bits(&state[name], &source[name]), "{name}");
    }
    for name in &report.kept {
        assert!(name.starts_with("projection_head") || name.starts_with("prototypes"), "{name}");
        assert!(same_bits(&state[name], &fresh[name]), "{name}");
    }
    assert_eq!(report.loaded.len() + report.kept.len(), state.len());
    assert!(features_error(&model, swav) < 1e-5);

    // torchvision: the backbone only.
    let tv_config = tv.model_config.clone().unwrap();
    let mut model = SwavModel::new(tv_config.clone(), 3).unwrap();
    let report = init_from_file(&mut model, &dir().join(&tv.file), InitScope::Backbone).unwrap();
    assert_eq!(report.origin.ignored, ["fc.bias", "fc.weight"]);
    assert!(!report.origin.head);
    assert!(features_error(&model, tv) < 1e-5);
    let err = init_from_file(&mut model, &dir().join(&tv.file), InitScope::Whole).unwrap_err().to_string();
    assert!(err.contains("no trained projection head") && err.contains("backbone only"), "{err}");

    // Mismatches are refused with both networks named, and leave the model as it was.
    let before = model_state(&mut model).tensors;
    let mut other = SwavModel::new(ModelConfig { width: Some(16), ..tv_config.clone() }, 3).unwrap();
    let err = init_from_file(&mut other, &dir().join(&tv.file), InitScope::Backbone).unwrap_err().to_string();
    assert!(err.contains("resnet18 (width 8") && err.contains("resnet18 (width 16"), "{err}");
    let mut model2 = SwavModel::new(ModelConfig { feat_dim: 9, ..config }, 3).unwrap();
    let err = init_from_file(&mut model2, &dir().join(&swav.file), InitScope::Whole).unwrap_err().to_string();
    assert!(err.contains("feat_dim 16") && err.contains("feat_dim 9") && err.contains("backbone only"), "{err}");
    assert_eq!(model_state(&mut model).tensors, before);
}
