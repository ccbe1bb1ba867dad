//! The PyTorch world from the command line: `import` turns the PyTorch-made fixtures into model files
//! that give PyTorch's features and hold its weights bit for bit; `export` and `embed` take a `.pth`
//! directly; bad imports are refused with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use swav_core::imagenet;
use swav_model::checkpoint::{model_state, NamedTensors, Value};
use swav_model::torch::read_torch_file;
use swav_model::{FileKind, ModelConfig, ModelFile, Source};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../swav-model/tests/fixtures/torch")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[derive(serde::Deserialize)]
struct Fixture {
    file: String,
    kind: String,
    expect: String,
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
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap();
    m.fixtures.into_iter().filter(|f| f.kind == "model").collect()
}

/// PyTorch's float64 eval-mode features for the fixture's images against the file's, relative L2.
fn features_error(file: &ModelFile, f: &Fixture) -> f64 {
    let e = NamedTensors::read(&fixtures().join(&f.expect)).unwrap();
    let got = file.model.features(&e.tensor("input.images").unwrap()).unwrap().to_vec();
    let (_, want) = e.f32("expect.features").unwrap();
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn bits(v: &Value) -> (Vec<usize>, Vec<u64>) {
    match v {
        Value::F32 { shape, data } => (shape.clone(), data.iter().map(|x| x.to_bits() as u64).collect()),
        Value::I64 { shape, data } => (shape.clone(), data.iter().map(|x| *x as u64).collect()),
    }
}

#[test]
fn imported_fixtures_keep_pytorchs_weights_and_features() {
    let tmp = tempfile::tempdir().unwrap();
    let all = model_fixtures();
    assert_eq!(all.len(), 6);
    for f in &all {
        let input = fixtures().join(&f.file);
        let output = tmp.path().join(format!("{}.safetensors", f.file));
        let (ok, log) = run(&["import", "--input", s(&input), "--output", s(&output)]);
        assert!(ok, "{}: {log}", f.file);
        let made_with = f.model_config.clone().unwrap();
        let w = made_with.width();
        assert!(log.contains(&format!("network: {} (width {w}, standard stem", made_with.arch.name())), "{log}");

        let mut file = ModelFile::read(&output).unwrap();
        assert_eq!(file.origin.kind, FileKind::SwavRs);
        let err = features_error(&file, f);
        assert!(err < 1e-5, "{}: features differ from PyTorch's by {err:.2e}", f.file);
        eprintln!("{}: imported, features relative L2 error {err:.2e}", f.file);

        // Recorded preprocessing: ImageNet's, 224, read back as recorded by the file.
        let p = &file.preprocessing;
        assert_eq!(
            (p.mean.clone(), p.std.clone(), p.input_size),
            (imagenet::MEAN.to_vec(), imagenet::STD.to_vec(), 224)
        );
        assert_eq!([p.mean_source, p.std_source, p.input_size_source], [Source::Checkpoint; 3]);

        // Where it came from, and the epoch of a training checkpoint.
        let from = &file.metadata["imported_from"];
        assert!(from.starts_with(&f.file), "{from}");
        if let Some(key) = f.container.first() {
            assert!(from.contains(&format!("\"{key}\"")), "{from}");
        } else {
            assert!(from.contains("a bare state dict"), "{from}");
        }
        assert_eq!(file.metadata.get("epoch"), f.entries.get("epoch"), "{}", f.file);

        // Every tensor of the input, bit for bit (module. stripped, torchvision's fc left out).
        let written = model_state(&mut file.model).tensors;
        let source = read_torch_file(&input).unwrap().state.tensors;
        let mut compared = 0;
        for (name, value) in &source {
            let name = name.strip_prefix("module.").unwrap_or(name);
            if name.starts_with("fc.") {
                assert!(!f.strict);
                continue;
            }
            assert_eq!(bits(&written[name]), bits(value), "{}: {name}", f.file);
            compared += 1;
        }
        if f.strict {
            assert_eq!(compared, written.len(), "{}: the whole model comes from the file", f.file);
            assert!(!file.metadata.contains_key("head"));
            assert_eq!(file.model.config, made_with.canonical());
        } else {
            assert_eq!(file.metadata["head"], "fresh");
            assert!(log.contains("left out: fc.bias, fc.weight"), "{log}");
            assert!(compared < written.len());
        }
    }
}

#[test]
fn arch_checks_backbone_only_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixtures().join("swav_r50w4.pth");
    let out = tmp.path().join("m.safetensors");
    let import = |extra: &[&str]| {
        let mut args = vec!["import", "--input", s(&input), "--output", s(&out)];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, log) = import(&["--arch", "resnet50"]);
    assert!(ok, "{log}");
    for wrong in ["resnet18", "resnet50w2"] {
        let (ok, log) = import(&["--arch", wrong]);
        assert!(
            !ok && log.contains(&format!("--arch {wrong} does not match")) && log.contains("resnet50 (width 4"),
            "{log}"
        );
    }
    let (ok, log) = import(&["--arch", "resnet9"]);
    assert!(!ok && log.contains("unknown arch `resnet9`"), "{log}");

    // Backbone only: the backbone bit for bit, a fresh default head, marked.
    let (ok, log) = import(&["--backbone-only"]);
    assert!(ok && log.contains("dropped (--backbone-only)"), "{log}");
    let mut file = ModelFile::read(&out).unwrap();
    assert_eq!(file.metadata["head"], "fresh");
    assert!(!file.origin.head);
    assert_eq!((file.model.config.hidden_mlp, file.model.config.feat_dim), (128, 128));
    assert_eq!(file.model.config.prototypes, [3000]);
    let written = model_state(&mut file.model).tensors;
    for (name, value) in read_torch_file(&input).unwrap().state.tensors {
        if swav_model::file::is_backbone_name(&name) {
            assert_eq!(bits(&written[&name]), bits(&value), "{name}");
        }
    }

    // The input is never the output, however it is spelled.
    let copy = tmp.path().join("copy.pth");
    std::fs::copy(&input, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let dotted = tmp.path().join(".").join("copy.pth");
    for output in [&copy, &dotted] {
        let (ok, log) = run(&["import", "--input", s(&copy), "--output", s(output)]);
        assert!(!ok && log.contains("is the input file"), "{log}");
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before);

    // Files that hold no ResNet, and hostile ones, are refused with the reason.
    let (ok, log) = run(&["import", "--input", s(&fixtures().join("views.pth")), "--output", s(&out)]);
    assert!(!ok && log.contains("cannot recognise the network") && log.contains("no `conv1.weight`"), "{log}");
    let (ok, log) = run(&["import", "--input", s(&fixtures().join("hostile_eval.pth")), "--output", s(&out)]);
    assert!(!ok && log.contains("refusing global builtins.eval"), "{log}");
    let (ok, log) = run(&["import", "--input", s(&tmp.path().join("absent.pth")), "--output", s(&out)]);
    assert!(!ok && log.contains("absent.pth"), "{log}");
}

/// A tiny labelled IDX dataset (grayscale; evaluation feeds it to RGB models as three equal channels).
fn write_idx(dir: &Path, n: usize, side: usize) -> PathBuf {
    let mut b = 0x0803u32.to_be_bytes().to_vec();
    for d in [n as u32, side as u32, side as u32] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend((0..n * side * side).map(|i| ((i * 37) % 251) as u8));
    let images = dir.join("toy-images-idx3-ubyte");
    std::fs::write(&images, b).unwrap();
    let mut l = 0x0801u32.to_be_bytes().to_vec();
    l.extend_from_slice(&(n as u32).to_be_bytes());
    l.extend((0..n).map(|i| (i % 3) as u8));
    std::fs::write(dir.join("toy-labels-idx1-ubyte"), l).unwrap();
    images
}

#[test]
fn export_and_embed_take_pytorch_files_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let pth = fixtures().join("torchvision_r18w8.pth");

    let onnx = tmp.path().join("tv.onnx");
    let (ok, log) = run(&["export", "--checkpoint", s(&pth), "--output", s(&onnx)]);
    assert!(ok, "{log}");
    assert!(log.contains("output features [batch, 64]") && log.contains("(default)"), "{log}");
    assert!(onnx.exists() && !tmp.path().join("tv.onnx.data").exists());
    let onnx2 = tmp.path().join("swav.onnx");
    let legacy = fixtures().join("swav_r50w4_legacy.pth.tar");
    let (ok, log) =
        run(&["export", "--checkpoint", s(&legacy), "--output", s(&onnx2), "--with-head", "--external-data"]);
    assert!(ok, "{log}");
    assert!(log.contains("external data:") && log.contains("swav.onnx.data"), "{log}");
    assert!(log.contains("output scores [batch, 30]"), "{log}");
    assert!(std::fs::metadata(tmp.path().join("swav.onnx.data")).unwrap().len() > 4096);

    let images = write_idx(tmp.path(), 12, 20);
    let data = tmp.path().join("data");
    let (ok, log) = run(&["preprocess", "--input", s(&images), "--output", s(&data)]);
    assert!(ok, "{log}");
    let (features, labels) = (tmp.path().join("f.npy"), tmp.path().join("l.npy"));
    let embed = |ckpt: &Path, out: &Path| {
        run(&[
            "embed",
            "--checkpoint",
            s(ckpt),
            "--data",
            s(&data),
            "--output",
            s(out),
            "--labels",
            s(&labels),
            "--input-size",
            "32",
        ])
    };
    let (ok, log) = embed(&pth, &features);
    assert!(ok, "{log}");
    let (shape, values): (Vec<usize>, Vec<f32>) = swav_core::npy::read(&features).unwrap();
    assert_eq!(shape, [12, 64]);
    assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != 0.0));

    // The same weights imported first give the same features, byte for byte.
    let imported = tmp.path().join("tv.safetensors");
    let (ok, log) = run(&["import", "--input", s(&pth), "--output", s(&imported)]);
    assert!(ok, "{log}");
    let again = tmp.path().join("g.npy");
    let (ok, log) = embed(&imported, &again);
    assert!(ok, "{log}");
    assert_eq!(std::fs::read(&features).unwrap(), std::fs::read(&again).unwrap());
}
