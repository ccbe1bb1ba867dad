//! Exported models run in tract (a pure-Rust ONNX runtime) and agree with swav-model's evaluation-mode
//! forward: ResNet-18, ResNet-50 and the small-image stem, with and without the head, batch norms
//! folded or not, every supported opset form, several batch sizes from one file; and a model written
//! with ONNX external data, which tract loads from its path.

mod common;
use common::small;

use std::collections::BTreeMap;

use swav_core::layout::nchw_to_nhwc;
use swav_export::check::{random_images, read_npy, write_check_data, NamedArray};
use swav_export::{export_to_file, to_onnx, BatchDim, Dim, ExportOptions};
use swav_model::param::{Slot, Visit};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_model::{Overrides, Preprocessing};
use swav_tensor::Tensor;
use tract_onnx::prelude::*;

const TOLERANCE: f32 = 1e-4;

/// A model whose batch norms are far from the identity, so folding them is really exercised.
fn model(cfg: ModelConfig, seed: u64) -> SwavModel {
    let mut m = SwavModel::new(cfg, seed).unwrap();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32) / (1u64 << 24) as f32
    };
    m.visit("", &mut |name, slot| {
        let is_bn = name.contains("bn") || name.contains("downsample.1") || name.starts_with("projection_head.1");
        match slot {
            Slot::Buffer(t) if name.ends_with("running_var") => {
                t.as_mut_slice().iter_mut().for_each(|v| *v = 0.3 + 1.5 * next())
            }
            Slot::Buffer(t) if name.ends_with("running_mean") => {
                t.as_mut_slice().iter_mut().for_each(|v| *v = next() - 0.5)
            }
            Slot::Param(p) if is_bn && name.ends_with("weight") => {
                p.value.as_mut_slice().iter_mut().for_each(|v| *v = 0.5 + next())
            }
            Slot::Param(p) if is_bn && name.ends_with("bias") => {
                p.value.as_mut_slice().iter_mut().for_each(|v| *v = 0.2 * (next() - 0.5))
            }
            _ => {}
        }
    });
    m.normalize_prototypes().unwrap();
    m
}

fn preprocessing(m: &SwavModel) -> Preprocessing {
    Preprocessing::resolve(&m.config, &BTreeMap::new(), &Overrides::default()).unwrap()
}

/// Runs an ONNX model in tract on NCHW images; returns every output with its shape.
fn run_tract(bytes: &[u8], images: &NamedArray) -> Vec<NamedArray> {
    let proto = tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]).expect("tract parses the protobuf");
    let model = tract_onnx::onnx().model_for_proto_model(&proto).expect("tract loads the model");
    run_loaded(&proto, model, images)
}

/// Runs an ONNX model file in tract (which resolves external data relative to the file).
fn run_tract_file(path: &std::path::Path, images: &NamedArray) -> Vec<NamedArray> {
    let proto = tract_onnx::onnx().proto_model_for_path(path).expect("tract parses the protobuf");
    let model = tract_onnx::onnx().model_for_path(path).expect("tract loads the model and its external data");
    run_loaded(&proto, model, images)
}

fn run_loaded(proto: &tract_onnx::pb::ModelProto, model: InferenceModel, images: &NamedArray) -> Vec<NamedArray> {
    let names: Vec<String> = proto.graph.as_ref().unwrap().output.iter().map(|o| o.name.clone()).collect();
    let shape: Vec<usize> = images.shape.clone();
    let plan = model
        .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), &shape))
        .unwrap()
        .into_optimized()
        .expect("tract optimises the model")
        .into_runnable()
        .unwrap();
    let input = tract_onnx::prelude::Tensor::from_shape(&shape, &images.data).unwrap();
    let outputs = plan.run(tvec!(input.into_tvalue())).expect("tract runs the model");
    outputs
        .iter()
        .zip(names)
        .map(|(t, name)| NamedArray {
            name,
            shape: t.shape().to_vec(),
            data: t.to_plain_array_view::<f32>().unwrap().iter().copied().collect(),
        })
        .collect()
}

/// swav-model's evaluation-mode outputs, computed here directly (not through swav-export's helper).
fn reference(m: &SwavModel, images: &NamedArray, with_head: bool) -> Vec<(String, Tensor)> {
    let [n, c, h, w] = images.shape[..] else { panic!() };
    let x = Tensor::from_vec(&[n, h, w, c], nchw_to_nhwc([n, c, h, w], &images.data)).unwrap();
    let (features, out) = m.forward_eval(&x).unwrap();
    assert_eq!(features.as_slice(), m.features(&x).unwrap().as_slice());
    let mut all = vec![("features".to_string(), features)];
    if with_head {
        all.push(("embedding".into(), out.embedding));
        for (i, s) in out.scores.into_iter().enumerate() {
            all.push((if i == 0 { "scores".into() } else { format!("scores_{i}") }, s));
        }
    }
    all
}

/// max |a - b| / max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "reference output is all zeros");
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Exports, runs tract at each batch size from the same file, compares every output; returns the
/// largest relative error.
fn check(label: &str, m: &SwavModel, opts: &ExportOptions, batches: &[usize], size: usize) -> f32 {
    let exported = to_onnx(m, &preprocessing(m), opts).unwrap();
    let mut worst = 0f32;
    for (i, &n) in batches.iter().enumerate() {
        let images = random_images(n, m.config.in_channels, size, 100 + i as u64);
        let got = run_tract(&exported.bytes, &images);
        let want = reference(m, &images, opts.with_head);
        assert_eq!(got.len(), want.len(), "{label}: outputs {:?}", got.iter().map(|g| &g.name).collect::<Vec<_>>());
        for (g, (name, w)) in got.iter().zip(&want) {
            assert_eq!(&g.name, name, "{label}");
            assert_eq!(g.shape, w.shape(), "{label}: {name}");
            let e = rel_err(&g.data, w.as_slice());
            assert!(e < TOLERANCE, "{label}: {name} (batch {n}) relative error {e:e}");
            worst = worst.max(e);
        }
    }
    eprintln!("{label}: max relative error {worst:.2e} ({} nodes, ops {:?})", exported.nodes, exported.op_types);
    worst
}

#[test]
fn resnet18_matches_with_and_without_head() {
    let m = model(small(Arch::Resnet18, false), 1);
    check("resnet18 backbone", &m, &ExportOptions::default(), &[1, 3], 48);
    check("resnet18 + head", &m, &ExportOptions { with_head: true, ..Default::default() }, &[2], 40);
}

#[test]
fn resnet50_matches_with_and_without_head() {
    let m = model(small(Arch::Resnet50, false), 2);
    check("resnet50 backbone", &m, &ExportOptions::default(), &[2], 40);
    check("resnet50 + head", &m, &ExportOptions { with_head: true, ..Default::default() }, &[1, 2], 33);
}

#[test]
fn small_stem_matches_with_and_without_head() {
    let m = model(ModelConfig { prototypes: vec![10, 7], ..small(Arch::Resnet18, true) }, 3);
    check("resnet18 small stem", &m, &ExportOptions::default(), &[2], 16);
    let with_head = ExportOptions { with_head: true, ..Default::default() };
    check("resnet18 small stem + head (two prototype heads)", &m, &with_head, &[1, 4], 16);
    let m50 = model(small(Arch::Resnet50, true), 4);
    check("resnet50 small stem + head", &m50, &with_head, &[2], 12);
}

#[test]
fn explicit_batch_norms_match() {
    let opts = ExportOptions { with_head: true, fold_batchnorm: false, ..Default::default() };
    check("resnet50 + head, BatchNormalization nodes", &model(small(Arch::Resnet50, false), 5), &opts, &[2], 32);
    let exported =
        to_onnx(&model(small(Arch::Resnet18, true), 5), &preprocessing(&model(small(Arch::Resnet18, true), 5)), &opts)
            .unwrap();
    assert!(exported.op_types.contains("BatchNormalization"));
}

#[test]
fn head_variants_match() {
    // Single linear head; MLP head without its batch norm.
    let linear = model(ModelConfig { hidden_mlp: 0, ..small(Arch::Resnet18, true) }, 6);
    let no_bn = model(ModelConfig { head_bn: false, ..small(Arch::Resnet18, true) }, 7);
    for fold in [true, false] {
        let opts = ExportOptions { with_head: true, fold_batchnorm: fold, ..Default::default() };
        check(&format!("linear head (fold {fold})"), &linear, &opts, &[2], 16);
        check(&format!("mlp head without bn (fold {fold})"), &no_bn, &opts, &[2], 16);
    }
}

#[test]
fn every_supported_opset_runs() {
    let m = model(small(Arch::Resnet18, true), 8);
    for opset in [13, 17, 18, 21] {
        let opts = ExportOptions { with_head: true, opset, ..Default::default() };
        check(&format!("opset {opset}"), &m, &opts, &[2], 16);
    }
}

#[test]
fn fixed_batch_and_static_size_are_declared_and_run() {
    let m = model(small(Arch::Resnet18, true), 9);
    let pre = preprocessing(&m);
    let opts =
        ExportOptions { with_head: true, batch: BatchDim::Fixed(3), static_input_size: true, ..Default::default() };
    let exported = to_onnx(&m, &pre, &opts).unwrap();
    assert_eq!(exported.input.dims, vec![Dim::Fixed(3), Dim::Fixed(3), Dim::Fixed(32), Dim::Fixed(32)]);
    assert!(exported.outputs.iter().all(|o| o.dims[0] == Dim::Fixed(3)));
    check("fixed batch 3, static 32x32", &m, &opts, &[3], 32);
}

#[test]
fn check_data_agrees_with_tract() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(ModelConfig { prototypes: vec![10, 5], ..small(Arch::Resnet18, true) }, 10);
    let exported = to_onnx(&m, &preprocessing(&m), &ExportOptions { with_head: true, ..Default::default() }).unwrap();
    let paths = write_check_data(dir.path(), &m, true, 3, 16, 7).unwrap();
    let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["images.npy", "features.npy", "embedding.npy", "scores.npy", "scores_1.npy"]);
    for p in &paths {
        let bytes = std::fs::read(p).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0, "npy header is 64-byte aligned");
    }
    let images = read_npy(&paths[0]).unwrap();
    assert_eq!(images.shape, [3, 3, 16, 16]);
    let got = run_tract(&exported.bytes, &images);
    for (g, p) in got.iter().zip(&paths[1..]) {
        let want = read_npy(p).unwrap();
        assert_eq!(g.name, want.name);
        assert_eq!(g.shape, want.shape);
        assert!(rel_err(&g.data, &want.data) < TOLERANCE, "{}", g.name);
    }
}

#[test]
fn external_data_is_aligned_complete_and_runs_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(ModelConfig { prototypes: vec![10, 5], ..small(Arch::Resnet50, false) }, 11);
    let pre = preprocessing(&m);
    let inline = to_onnx(&m, &pre, &ExportOptions { with_head: true, ..Default::default() }).unwrap();
    assert!(inline.external.is_none(), "a small model stays in one file unless asked");
    let opts = ExportOptions { with_head: true, external_data: true, ..Default::default() };
    let out = dir.path().join("swav.onnx");
    let exported = export_to_file(&m, &pre, &opts, &out).unwrap();
    let data = exported.external.as_ref().expect("external data was forced");
    assert_eq!(data.location, "swav.onnx.data");
    assert_eq!(std::fs::read(&out).unwrap(), exported.bytes);
    let on_disk = std::fs::read(dir.path().join("swav.onnx.data")).unwrap();
    assert_eq!(on_disk, data.bytes);
    assert!(exported.bytes.len() * 10 < inline.bytes.len(), "{} vs {}", exported.bytes.len(), inline.bytes.len());

    // Every tensor's bytes are where its entries say, aligned, and equal to the inline export's.
    let parse = |b: &[u8]| tract_onnx::onnx().proto_model_for_read(&mut &b[..]).unwrap();
    let (ext, inl) = (parse(&exported.bytes), parse(&inline.bytes));
    let inline_raw: BTreeMap<&str, &[u8]> =
        inl.graph.as_ref().unwrap().initializer.iter().map(|t| (t.name.as_str(), t.raw_data.as_slice())).collect();
    let inits = &ext.graph.as_ref().unwrap().initializer;
    assert_eq!(inits.len(), inline_raw.len());
    let mut external = 0;
    for t in inits {
        let want = inline_raw[t.name.as_str()];
        if t.data_location == Some(1) {
            let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone()).unwrap();
            assert_eq!(entry("location"), "swav.onnx.data", "{}", t.name);
            let (offset, length): (usize, usize) = (entry("offset").parse().unwrap(), entry("length").parse().unwrap());
            assert_eq!(offset % 4096, 0, "{}: offset {offset}", t.name);
            assert!(t.raw_data.is_empty() && length >= 1024, "{}", t.name);
            assert_eq!(&on_disk[offset..offset + length], want, "{}", t.name);
            external += 1;
        } else {
            assert!(t.external_data.is_empty() && t.raw_data.len() < 1024, "{}", t.name);
            assert_eq!(t.raw_data, want, "{}", t.name);
        }
    }
    assert_eq!(external, data.tensors);
    assert!(external > 50, "{external} tensors in the data file");

    // tract resolves the data file beside the model, wherever the pair is moved.
    let moved = dir.path().join("elsewhere");
    std::fs::create_dir(&moved).unwrap();
    for name in ["swav.onnx", "swav.onnx.data"] {
        std::fs::rename(dir.path().join(name), moved.join(name)).unwrap();
    }
    let images = random_images(2, 3, 40, 200);
    let got = run_tract_file(&moved.join("swav.onnx"), &images);
    let want = reference(&m, &images, true);
    assert_eq!(got.len(), want.len());
    for (g, (name, w)) in got.iter().zip(&want) {
        assert_eq!(&g.name, name);
        let e = rel_err(&g.data, w.as_slice());
        assert!(e < TOLERANCE, "{name}: relative error {e:e}");
    }
    // Without its data file the model does not load.
    std::fs::remove_file(moved.join("swav.onnx.data")).unwrap();
    assert!(tract_onnx::onnx().model_for_path(moved.join("swav.onnx")).is_err());
}
