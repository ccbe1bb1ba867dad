//! The exported file's interface (names, dimensions, opset, metadata, operators), the preprocessing
//! resolution, and bad input: broken checkpoints, bad metadata and options, atomic output.

mod common;
use common::small;

use std::collections::BTreeMap;
use std::path::Path;

use swav_core::imagenet::{MEAN as IMAGENET_MEAN, STD as IMAGENET_STD};
use swav_export::{export_checkpoint, to_onnx, BatchDim, ExportError, ExportOptions};
use swav_model::checkpoint::{model_state, NamedTensors, Value};
use swav_model::file::{FORMAT, META_CONFIG, META_FORMAT};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_model::{ModelFile, Overrides, Preprocessing, Source};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

fn parse(bytes: &[u8]) -> pb::ModelProto {
    tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]).expect("valid protobuf")
}

fn metadata(p: &pb::ModelProto) -> BTreeMap<String, String> {
    p.metadata_props.iter().map(|e| (e.key.clone(), e.value.clone())).collect()
}

fn dims(v: &pb::ValueInfoProto) -> Vec<String> {
    let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        panic!("{} is not a tensor", v.name)
    };
    assert_eq!(t.elem_type, 1, "float32");
    t.shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
            None => "?".into(),
        })
        .collect()
}

fn save(m: &mut SwavModel, path: &Path, meta: &[(&str, &str)]) {
    let extra = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    // Exactly these metadata entries besides the configuration (a file may lack its preprocessing).
    let mut state = model_state(m);
    state.metadata = extra;
    state.metadata.insert(META_FORMAT.into(), FORMAT.into());
    state.metadata.insert(META_CONFIG.into(), serde_json::to_string(&m.config).unwrap());
    state.write(path).unwrap();
}

const ALLOWED_OPS: [&str; 12] = [
    "Conv",
    "BatchNormalization",
    "Relu",
    "MaxPool",
    "Add",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
    "MatMul",
    "ReduceL2",
    "Max",
    "Div",
];

#[test]
fn interface_opset_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("m.safetensors");
    let mut m = SwavModel::new(ModelConfig { prototypes: vec![10, 6], ..small(Arch::Resnet50, false) }, 0).unwrap();
    save(
        &mut m,
        &ckpt,
        &[("mean", "[0.4, 0.5, 0.6]"), ("std", "[0.2,0.25,0.3]"), ("input_size", "160"), ("train_data", "/somewhere")],
    );
    let out = dir.path().join("model.onnx");
    let opts = ExportOptions { with_head: true, ..Default::default() };
    let (exported, pre) = export_checkpoint(&ckpt, &out, &Overrides::default(), &opts).unwrap();
    assert_eq!(pre.input_size, 160);
    assert_eq!(std::fs::read(&out).unwrap(), exported.bytes);

    let p = parse(&exported.bytes);
    assert_eq!(p.ir_version, 8);
    assert_eq!(p.producer_name, "swav-rs");
    assert_eq!(p.opset_import.len(), 1);
    assert_eq!((p.opset_import[0].domain.as_str(), p.opset_import[0].version), ("", 17));
    let g = p.graph.as_ref().unwrap();
    assert_eq!(g.input.len(), 1, "initialisers are not graph inputs");
    assert_eq!(g.input[0].name, "images");
    assert_eq!(dims(&g.input[0]), ["batch", "3", "height", "width"]);
    let outs: Vec<(&str, Vec<String>)> = g.output.iter().map(|o| (o.name.as_str(), dims(o))).collect();
    assert_eq!(
        outs,
        [
            ("features", vec!["batch".to_string(), "256".into()]),
            ("embedding", vec!["batch".into(), "8".into()]),
            ("scores", vec!["batch".into(), "10".into()]),
            ("scores_1", vec!["batch".into(), "6".into()]),
        ]
    );
    for n in &g.node {
        assert!(ALLOWED_OPS.contains(&n.op_type.as_str()), "non-standard op {}", n.op_type);
        assert!(n.domain.is_empty(), "{} in domain {}", n.op_type, n.domain);
    }
    assert!(!g.node.iter().any(|n| n.op_type == "BatchNormalization"), "batch norms are folded by default");
    // Initialisers keep the torchvision names.
    let inits: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    for name in [
        "conv1.weight",
        "conv1.bias",
        "layer4.2.conv3.weight",
        "layer1.0.downsample.0.weight",
        "projection_head.0.weight",
        "projection_head.3.bias",
    ] {
        assert!(inits.contains(&name), "{name} missing from {inits:?}");
    }
    assert!(inits.contains(&"prototypes.prototypes1.weight"));

    let meta = metadata(&p);
    assert_eq!(meta["mean"], "[0.4,0.5,0.6]");
    assert_eq!(meta["std"], "[0.2,0.25,0.3]");
    assert_eq!(meta["input_size"], "160");
    assert_eq!(meta["preprocessing_source"], r#"{"mean":"checkpoint","std":"checkpoint","input_size":"checkpoint"}"#);
    assert_eq!(meta["input_layout"], "NCHW");
    assert_eq!(meta["channels"], "RGB");
    assert_eq!(meta["outputs"], "features,embedding,scores,scores_1");
    let config: ModelConfig = serde_json::from_str(&meta["model_config"]).unwrap();
    assert_eq!(config, m.config);
    assert!(!meta.contains_key("train_data"), "only the preprocessing and the config are copied");
    assert_eq!(exported.metadata.len(), meta.len());
}

#[test]
fn backbone_only_and_fixed_batch() {
    let m = SwavModel::new(small(Arch::Resnet18, true), 0).unwrap();
    let pre = Preprocessing::resolve(&m.config, &BTreeMap::new(), &Overrides::default()).unwrap();
    let e = to_onnx(&m, &pre, &ExportOptions { batch: BatchDim::Fixed(4), opset: 13, ..Default::default() }).unwrap();
    let p = parse(&e.bytes);
    assert_eq!(p.ir_version, 7);
    assert_eq!(p.opset_import[0].version, 13);
    let g = p.graph.unwrap();
    assert_eq!(g.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["features"]);
    assert_eq!(dims(&g.input[0]), ["4", "3", "height", "width"]);
    assert_eq!(dims(&g.output[0]), ["4", "64"]);
    assert!(!g.node.iter().any(|n| n.op_type == "MaxPool"), "the small stem has no max-pool");
    assert!(!g.node.iter().any(|n| n.name.starts_with("projection_head") || n.name.starts_with("embedding")));
}

#[test]
fn preprocessing_comes_from_overrides_then_checkpoint_then_defaults() {
    let cfg = small(Arch::Resnet18, false);
    let none = BTreeMap::new();
    let d = Preprocessing::resolve(&cfg, &none, &Overrides::default()).unwrap();
    assert_eq!((d.mean.as_slice(), d.std.as_slice(), d.input_size), (&IMAGENET_MEAN[..], &IMAGENET_STD[..], 224));
    assert_eq!((d.mean_source, d.std_source, d.input_size_source), (Source::Default, Source::Default, Source::Default));
    assert!(d.is_default());
    assert_eq!(
        Preprocessing::resolve(&small(Arch::Resnet18, true), &none, &Overrides::default()).unwrap().input_size,
        32
    );
    let gray = ModelConfig { in_channels: 1, ..cfg.clone() };
    let g = Preprocessing::resolve(&gray, &none, &Overrides::default()).unwrap();
    assert_eq!((g.mean, g.std), (vec![0.5], vec![0.5]));

    let meta: BTreeMap<String, String> = [("mean", "[0.1]"), ("std", "[0.3, 0.3, 0.3]"), ("input_size", "96")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = Preprocessing::resolve(&cfg, &meta, &Overrides::default()).unwrap();
    assert_eq!(r.mean, vec![0.1; 3], "one value applies to every channel");
    assert_eq!((r.input_size, r.mean_source), (96, Source::Checkpoint));
    assert!(!r.is_default());
    let over = Overrides { mean: Some(vec![0.0, 0.1, 0.2]), std: None, input_size: Some(128) };
    let r = Preprocessing::resolve(&cfg, &meta, &over).unwrap();
    assert_eq!((r.mean.as_slice(), r.std.as_slice(), r.input_size), (&[0.0, 0.1, 0.2][..], &[0.3; 3][..], 128));
    assert_eq!(
        (r.mean_source, r.std_source, r.input_size_source),
        (Source::Override, Source::Checkpoint, Source::Override)
    );
    assert_eq!(r.sources_json(), r#"{"mean":"override","std":"checkpoint","input_size":"override"}"#);
}

#[test]
fn bad_preprocessing_is_named() {
    let cfg = small(Arch::Resnet18, false);
    let meta = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    let err = |m: BTreeMap<String, String>, o: Overrides| Preprocessing::resolve(&cfg, &m, &o).unwrap_err().to_string();
    let e = err(meta("mean", "0.5, 0.4"), Overrides::default());
    assert!(e.contains("`mean`") && e.contains("not JSON"), "{e}");
    let e = err(meta("input_size", "large"), Overrides::default());
    assert!(e.contains("`input_size`"), "{e}");
    let e = err(meta("std", "[0.2, 0.2]"), Overrides::default());
    assert!(e.contains("std (checkpoint) has 2 values") && e.contains("3 channels"), "{e}");
    let e = err(BTreeMap::new(), Overrides { std: Some(vec![0.2, 0.0, 0.2]), ..Default::default() });
    assert!(e.contains("std (override) must be positive"), "{e}");
    let e = err(BTreeMap::new(), Overrides { input_size: Some(0), ..Default::default() });
    assert!(e.contains("input size"), "{e}");
    // A bad checkpoint value is no error when the command line replaces it.
    assert!(Preprocessing::resolve(
        &cfg,
        &meta("mean", "junk"),
        &Overrides { mean: Some(vec![0.5]), ..Default::default() }
    )
    .is_ok());
}

#[test]
fn bad_options_are_rejected() {
    let m = SwavModel::new(small(Arch::Resnet18, true), 0).unwrap();
    let pre = Preprocessing::resolve(&m.config, &BTreeMap::new(), &Overrides::default()).unwrap();
    for opts in [
        ExportOptions { opset: 12, ..Default::default() },
        ExportOptions { opset: 22, ..Default::default() },
        ExportOptions { batch: BatchDim::Fixed(0), ..Default::default() },
    ] {
        assert!(matches!(to_onnx(&m, &pre, &opts), Err(ExportError::Options(_))), "{opts:?}");
    }
    // A model assembled by hand with a tensor that does not fit is named, not a panic.
    let mut broken = m.clone();
    broken.backbone.bn1.running_var = swav_tensor::Tensor::zeros(&[5], swav_tensor::Device::Cpu);
    let e = to_onnx(&broken, &pre, &ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bn1.running_var"), "{e}");
}

/// Writes `state` (plus the model's metadata) to `path`.
fn write_state(m: &mut SwavModel, path: &Path, edit: impl FnOnce(&mut NamedTensors)) {
    save(m, path, &[]);
    let mut state = NamedTensors::read(path).unwrap();
    edit(&mut state);
    state.write(path).unwrap();
}

#[test]
fn broken_checkpoints_name_the_tensor_and_leave_the_output_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.onnx");
    std::fs::write(&out, b"previous export").unwrap();
    let mut m = SwavModel::new(small(Arch::Resnet18, false), 0).unwrap();
    let opts = ExportOptions::default();
    let run = |ckpt: &Path| export_checkpoint(ckpt, &out, &Overrides::default(), &opts).unwrap_err().to_string();

    let missing = dir.path().join("missing.safetensors");
    write_state(&mut m, &missing, |s| {
        s.tensors.remove("layer3.1.bn2.running_var");
    });
    let e = run(&missing);
    assert!(e.contains("layer3.1.bn2.running_var") && e.contains("missing"), "{e}");

    let misshaped = dir.path().join("misshaped.safetensors");
    write_state(&mut m, &misshaped, |s| {
        s.tensors.insert("layer2.0.conv1.weight".into(), Value::F32 { shape: vec![16, 8, 1, 3], data: vec![0.0; 384] });
    });
    let e = run(&misshaped);
    assert!(e.contains("layer2.0.conv1.weight") && e.contains("[16, 8, 1, 3]") && e.contains("[16, 8, 3, 3]"), "{e}");

    let bad_config = dir.path().join("bad-config.safetensors");
    write_state(&mut m, &bad_config, |s| {
        s.metadata.insert(META_CONFIG.into(), "{\"arch\": \"resnet9\"}".into());
    });
    let e = run(&bad_config);
    assert!(e.contains("model_config") && e.contains("resnet9"), "{e}");

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    assert!(run(&junk).contains("junk.safetensors"));
    assert!(run(&dir.path().join("absent.safetensors")).contains("absent.safetensors"));

    assert_eq!(std::fs::read(&out).unwrap(), b"previous export", "a failed export leaves the old file");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "no temporary files left: {names:?}");

    // A good checkpoint replaces it; an unwritable destination is a clear error.
    let good = dir.path().join("good.safetensors");
    save(&mut m, &good, &[]);
    export_checkpoint(&good, &out, &Overrides::default(), &opts).unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), b"previous export");
    assert!(ModelFile::read(&good).is_ok());
    let e =
        export_checkpoint(&good, &dir.path().join("no/such/dir/model.onnx"), &Overrides::default(), &opts).unwrap_err();
    assert!(matches!(e, ExportError::Write { .. }) && e.to_string().contains("model.onnx"), "{e}");
}

#[test]
fn foreign_state_dicts_export_with_default_preprocessing() {
    // A safetensors state dict without swav-rs metadata: the network is detected from its shapes and
    // the preprocessing recorded in the ONNX metadata is the defaults, said to be defaults.
    let dir = tempfile::tempdir().unwrap();
    let mut m = SwavModel::new(small(Arch::Resnet18, false), 4).unwrap();
    let foreign = dir.path().join("foreign.safetensors");
    NamedTensors { tensors: model_state(&mut m).tensors, metadata: BTreeMap::new() }.write(&foreign).unwrap();
    let out = dir.path().join("foreign.onnx");
    let (exported, pre) = export_checkpoint(&foreign, &out, &Overrides::default(), &ExportOptions::default()).unwrap();
    assert_eq!((pre.mean, pre.std, pre.input_size), (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec(), 224));
    let meta = metadata(&parse(&exported.bytes));
    assert_eq!(meta["preprocessing_source"], r#"{"mean":"default","std":"default","input_size":"default"}"#);
    let config: ModelConfig = serde_json::from_str(&meta["model_config"]).unwrap();
    assert_eq!(config, m.config.canonical());
    assert!(exported.external.is_none());
    assert!(!dir.path().join("foreign.onnx.data").exists());
}

#[test]
fn external_data_locations_must_be_plain_file_names() {
    let m = SwavModel::new(small(Arch::Resnet18, true), 0).unwrap();
    let pre = Preprocessing::resolve(&m.config, &BTreeMap::new(), &Overrides::default()).unwrap();
    let opts = ExportOptions { external_data: true, ..Default::default() };
    for bad in ["", "../x.data", "sub/x.data", ".."] {
        let e = swav_export::to_onnx_with_location(&m, &pre, &opts, bad).unwrap_err();
        assert!(matches!(e, ExportError::Options(_)), "{bad}: {e}");
    }
    assert_eq!(swav_export::data_file_name(Path::new("out/model.onnx")), "model.onnx.data");
    let e = swav_export::to_onnx(&m, &pre, &opts).unwrap();
    assert_eq!(e.external.unwrap().location, swav_export::export::DEFAULT_DATA_LOCATION);
}

/// The model that motivated external data: ResNet-50w5 with the official head holds 2.4 GB of
/// weights, over protobuf's 2 GiB, so the export switches to external data by itself. Needs about
/// 8 GB of memory and a minute: `cargo test -p swav-export --release -- --ignored`.
#[test]
#[ignore]
fn resnet50w5_with_head_switches_to_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig { arch: Arch::Resnet50w5, width: None, ..ModelConfig::swav_resnet50() };
    let m = SwavModel::new(config, 0).unwrap();
    let pre = Preprocessing::resolve(&m.config, &BTreeMap::new(), &Overrides::default()).unwrap();
    let out = dir.path().join("w5.onnx");
    let opts = ExportOptions { with_head: true, ..Default::default() };
    let exported = swav_export::export_to_file(&m, &pre, &opts, &out).unwrap();
    let data = exported.external.as_ref().expect("over 2 GiB: external data");
    assert!(exported.parameters as u64 * 4 > i32::MAX as u64, "{} parameters", exported.parameters);
    assert!(exported.bytes.len() < 1 << 20, "the .onnx holds the graph only: {} bytes", exported.bytes.len());
    let on_disk = std::fs::metadata(dir.path().join("w5.onnx.data")).unwrap().len();
    assert_eq!(on_disk, data.bytes.len() as u64);
    let p = parse(&std::fs::read(&out).unwrap());
    let mut end = 0;
    for t in &p.graph.as_ref().unwrap().initializer {
        if t.data_location == Some(1) {
            let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).unwrap().value.parse::<u64>().unwrap();
            let (offset, length) = (entry("offset"), entry("length"));
            assert_eq!(offset % 4096, 0, "{}", t.name);
            assert_eq!(length, t.dims.iter().product::<i64>() as u64 * 4, "{}", t.name);
            assert!(offset >= end, "{}: overlaps the previous tensor", t.name);
            end = offset + length;
        }
    }
    assert_eq!(end, on_disk, "the data file ends with the last tensor");
    eprintln!(
        "resnet50w5 + head: {:.2}M parameters, .onnx {} bytes, data {:.2} GB in {} tensors",
        exported.parameters as f64 / 1e6,
        exported.bytes.len(),
        on_disk as f64 / 1e9,
        data.tensors
    );
}
