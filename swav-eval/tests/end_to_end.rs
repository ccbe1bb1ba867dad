//! Evaluation and embedding end to end: small PNG folders -> preprocess -> tiny model file -> evaluate
//! (with the random baseline) -> eval.json; embed -> .npy read back; the errors a user meets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use swav_core::npy::read as read_npy;
use swav_data::{preprocess, Dataset, PreprocessOptions};
use swav_eval::embed::embed;
use swav_eval::features::{extract_features, input_transform, ExtractOptions};
use swav_eval::frozen::{evaluate, Baseline, EvalOptions, EvalReport};
use swav_eval::probe::ProbeConfig;
use swav_model::{Arch, ModelConfig, ModelFile, Overrides, Preprocessing, SwavModel};
use swav_tensor::Device;

fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Resnet18,
        width: Some(8),
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

/// A 14 x 14 grayscale image of class `c`: dark, bright, or stripes, with some noise.
fn image(c: usize, seed: usize) -> image::GrayImage {
    image::GrayImage::from_fn(14, 14, |x, y| {
        let noise = ((x as usize * 31 + y as usize * 17 + seed * 101) % 23) as u8;
        image::Luma([match c {
            0 => 20 + noise,
            1 => 200 + noise,
            _ => {
                if (x / 2) % 2 == 0 {
                    230 - noise
                } else {
                    10 + noise
                }
            }
        }])
    })
}

/// A labelled folder (`class0/`, `class1/`, ...) or, with `labelled = false`, images directly inside.
fn folder(root: &Path, name: &str, classes: usize, per_class: usize, labelled: bool) -> PathBuf {
    let dir = root.join(name);
    for c in 0..classes {
        let d = if labelled { dir.join(format!("class{c}")) } else { dir.clone() };
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            image(c, i + 1000 * c).save(d.join(format!("c{c}-{i:03}.png"))).unwrap();
        }
    }
    dir
}

fn dataset(root: &Path, name: &str, classes: usize, per_class: usize, labelled: bool) -> Dataset {
    let input = folder(root, &format!("{name}-images"), classes, per_class, labelled);
    let output = root.join(name);
    let opts = PreprocessOptions { input, output: output.clone(), workers: 1, ..PreprocessOptions::default() };
    preprocess(&opts, &|_| {}).unwrap();
    Dataset::open(&output).unwrap()
}

fn model_file(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    let mut model = SwavModel::new(tiny_config(), 3).unwrap();
    let pre = Preprocessing::recorded(&model.config, vec![0.45], vec![0.35], 14).unwrap();
    ModelFile::write(&mut model, &pre, &BTreeMap::new(), &path).unwrap();
    path
}

fn options() -> EvalOptions {
    EvalOptions {
        probe: ProbeConfig { epochs: 20, batch_size: 16, ..ProbeConfig::default() },
        extract: ExtractOptions { batch_size: 16, workers: 2, device: Device::Cpu },
        baseline: Some(Baseline::Random { seed: 5 }),
        ..EvalOptions::default()
    }
}

#[test]
fn evaluate_writes_a_report_with_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let train = dataset(dir.path(), "train", 3, 20, true);
    let test = dataset(dir.path(), "test", 3, 10, true);
    let ckpt = model_file(dir.path());

    let report = evaluate(&ckpt, &train, &test, &options(), &|_| {}).unwrap();
    assert_eq!((report.train_images, report.test_images, report.classes, report.feature_dim), (60, 30, 3, 64));
    assert_eq!((report.input.crop, report.input.resize, report.input.channels), (14, 14, 1));
    assert_eq!((report.input.mean.clone(), report.input.std.clone()), (vec![0.45], vec![0.35]));
    // The classes differ in brightness and texture: even random features separate them.
    assert!(report.knn_top1 >= 0.9 && report.linear_top1 >= 0.9, "{report:?}");
    let b = report.baseline.as_ref().unwrap();
    assert_eq!(b.baseline, Baseline::Random { seed: 5 });
    assert!((0.0..=1.0).contains(&b.scores.knn_top1) && (0.0..=1.0).contains(&b.scores.linear_top1));

    // Deterministic: the same numbers again.
    let again = evaluate(&ckpt, &train, &test, &options(), &|_| {}).unwrap();
    assert_eq!((again.knn_top1, again.linear_top1), (report.knn_top1, report.linear_top1));
    assert_eq!(again.baseline.unwrap().scores.linear_top1, b.scores.linear_top1);

    // eval.json: the documented keys, read back unchanged.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    report.write(&run.join("eval.json")).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("eval.json")).unwrap()).unwrap();
    for key in ["checkpoint", "knn_top1", "linear_top1", "baseline", "train_images", "test_images", "feature_dim"] {
        assert!(json.get(key).is_some(), "eval.json lacks {key}: {json}");
    }
    assert_eq!(json["baseline"]["kind"], "random");
    // The probe's number is named for what it is: a proxy, not the paper's linear evaluation.
    assert_eq!(json["linear_protocol"], "linear probe (proxy: cached centre-crop features)");
    assert!(json["baseline"]["knn_top1"].is_number());
    assert_eq!(EvalReport::read(&run.join("eval.json")).unwrap(), report);
}

#[test]
fn features_come_in_index_order_with_the_models_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "data", 2, 9, true);
    let model = SwavModel::new(tiny_config(), 1).unwrap();
    let none = BTreeMap::new();
    let resolve = |input_size| {
        Preprocessing::resolve(&model.config, &none, &Overrides { input_size, ..Overrides::default() }).unwrap()
    };
    // No metadata: swav-model's one set of defaults (small stem: 32 px; one channel: 0.5 / 0.5).
    let d = input_transform(&resolve(None)).unwrap();
    assert_eq!((d.crop, d.resize, d.mean.clone().unwrap(), d.std.clone().unwrap()), (32, 32, vec![0.5], vec![0.5]));
    // An override of a large size follows the ImageNet ratio 256 / 224.
    let big = input_transform(&resolve(Some(224))).unwrap();
    assert_eq!((big.crop, big.resize), (224, 256));
    // Small images at their own size are used whole.
    let t = input_transform(&resolve(Some(14))).unwrap();
    assert_eq!((t.crop, t.resize), (14, 14));

    // Batch size does not change the features (batch 4 leaves a last batch of 2).
    let f4 = extract_features(
        &model,
        &data,
        &t,
        &ExtractOptions { batch_size: 4, workers: 2, device: Device::Cpu },
        &|_, _| {},
    )
    .unwrap();
    let f18 = extract_features(
        &model,
        &data,
        &t,
        &ExtractOptions { batch_size: 18, workers: 0, device: Device::Cpu },
        &|_, _| {},
    )
    .unwrap();
    assert_eq!((f4.n, f4.dim, f4.classes), (18, 64, 2));
    let labels: Vec<u32> = (0..18).map(|i| data.label(i).unwrap()).collect();
    assert_eq!(f4.labels.as_ref().unwrap(), &labels);
    for (a, b) in f4.data.iter().zip(&f18.data) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // Row i is image i: the features of image 3 alone equal row 3.
    let one = model.features(&swav_tensor::Tensor::from_vec(&[1, 14, 14, 1], image3(&data, &t)).unwrap()).unwrap();
    for (a, b) in one.as_slice().iter().zip(f4.row(3)) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

fn image3(data: &Dataset, t: &swav_data::EvalConfig) -> Vec<f32> {
    let m = data.manifest();
    let transform = swav_data::EvalTransform::new(t, 1, swav_data::Layout::Nhwc, &m.pixel_mean, &m.pixel_std).unwrap();
    transform.apply(&data.image(3).unwrap())
}

#[test]
fn embed_writes_features_and_labels_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "data", 3, 5, true);
    let ckpt = model_file(dir.path());
    let (out, labels_out) = (dir.path().join("f.npy"), dir.path().join("l.npy"));
    let opts = ExtractOptions { batch_size: 8, workers: 1, device: Device::Cpu };
    let s = embed(&ckpt, &data, &out, Some(&labels_out), None, &opts, &|_, _| {}).unwrap();
    assert_eq!((s.images, s.feature_dim, s.labels), (15, 64, true));

    let loaded = ModelFile::read(&ckpt).unwrap();
    let t = input_transform(&loaded.preprocessing).unwrap();
    assert_eq!((t.crop, t.mean.clone().unwrap(), t.std.clone().unwrap()), (14, vec![0.45], vec![0.35]));
    let want = extract_features(&loaded.model, &data, &t, &opts, &|_, _| {}).unwrap();
    assert_eq!(read_npy::<f32>(&out).unwrap(), (vec![15, 64], want.data));
    let labels: Vec<i64> = (0..15).map(|i| data.label(i).unwrap() as i64).collect();
    assert_eq!(read_npy::<i64>(&labels_out).unwrap(), (vec![15], labels));
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let labelled = dataset(dir.path(), "labelled", 3, 3, true);
    let two_classes = dataset(dir.path(), "two", 2, 3, true);
    let unlabelled = dataset(dir.path(), "unlabelled", 2, 3, false);
    let ckpt = model_file(dir.path());
    let opts = EvalOptions { baseline: None, ..options() };
    let err = |r: Result<EvalReport, swav_eval::EvalError>| r.unwrap_err().to_string();

    let e = err(evaluate(&ckpt, &unlabelled, &labelled, &opts, &|_| {}));
    assert!(e.contains("no labels"), "{e}");
    let e = err(evaluate(&ckpt, &labelled, &two_classes, &opts, &|_| {}));
    assert!(e.contains("different classes"), "{e}");

    // Not a model file: random bytes, a safetensors file whose network cannot be recognised from its
    // shapes (a file without the swav-rs configuration is detected), a directory.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let e = err(evaluate(&junk, &labelled, &labelled, &opts, &|_| {}));
    assert!(e.contains("junk.safetensors") && e.contains("not a valid safetensors"), "{e}");
    let foreign = dir.path().join("foreign.safetensors");
    let mut state = swav_model::checkpoint::NamedTensors::default();
    state.tensors.insert("conv1.weight".into(), swav_model::checkpoint::Value::F32 { shape: vec![1], data: vec![0.0] });
    state.write(&foreign).unwrap();
    let e = err(evaluate(&foreign, &labelled, &labelled, &opts, &|_| {}));
    assert!(e.contains("foreign.safetensors") && e.contains("cannot recognise the network"), "{e}");
    let e = err(evaluate(dir.path(), &labelled, &labelled, &opts, &|_| {}));
    assert!(e.contains("is a directory"), "{e}");

    // Embedding unlabelled data works; asking for its labels does not.
    let out = dir.path().join("u.npy");
    let opts = ExtractOptions { batch_size: 4, workers: 1, device: Device::Cpu };
    embed(&ckpt, &unlabelled, &out, None, None, &opts, &|_, _| {}).unwrap();
    assert_eq!(read_npy::<f32>(&out).unwrap().0, vec![6, 64]);
    let e = embed(&ckpt, &unlabelled, &out, Some(&dir.path().join("l.npy")), None, &opts, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no labels"), "{e}");
}

/// The CUDA devices to compare with the CPU: the emulated one (kernels run on the CPU through the
/// emulation of the CUDA built-ins, library calls by the CPU ops), and device 0 where there is one.
fn cuda_devices() -> Vec<Device> {
    static EMULATED: std::sync::OnceLock<Option<Device>> = std::sync::OnceLock::new();
    let emulated = *EMULATED.get_or_init(|| {
        let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
        swav_cuda_emu::Emulator::new_or_skip(&[probe])?;
        let backend = swav_tensor::cuda::emulated::EmulatedBackend::new();
        swav_tensor::cuda::runtime::register(99, Box::new(backend)).expect("registered once");
        Some(Device::Cuda(99))
    });
    let real = match swav_tensor::cuda::runtime::runtime(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => {
            if std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SWAV_REQUIRE_CUDA=1 but there is no usable CUDA device: {e}");
            }
            eprintln!("SKIPPED on a GPU: {e}");
            None
        }
    };
    emulated.into_iter().chain(real).collect()
}

#[test]
fn embed_and_evaluate_on_a_cuda_device_give_the_cpu_features() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "data", 3, 4, true);
    let ckpt = model_file(dir.path());
    let cpu_out = dir.path().join("cpu.npy");
    let cpu = ExtractOptions { batch_size: 5, workers: 1, device: Device::Cpu };
    embed(&ckpt, &data, &cpu_out, None, None, &cpu, &|_, _| {}).unwrap();
    let (shape, want) = read_npy::<f32>(&cpu_out).unwrap();
    let cpu_eval = evaluate(&ckpt, &data, &data, &EvalOptions { baseline: None, ..options() }, &|_| {}).unwrap();
    for device in cuda_devices() {
        let out = dir.path().join(format!("{device}.npy").replace(':', "-"));
        let opts = ExtractOptions { device, ..cpu.clone() };
        embed(&ckpt, &data, &out, None, None, &opts, &|_, _| {}).unwrap();
        let (got_shape, got) = read_npy::<f32>(&out).unwrap();
        assert_eq!(got_shape, shape);
        let num: f64 = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        assert!(rel < 1e-4, "{device}: features differ from the CPU's by {rel:.2e}");

        let mut eval_opts = EvalOptions { baseline: None, ..options() };
        eval_opts.extract.device = device;
        let r = evaluate(&ckpt, &data, &data, &eval_opts, &|_| {}).unwrap();
        assert_eq!(r.feature_dim, cpu_eval.feature_dim);
        assert!((r.knn_top1 - cpu_eval.knn_top1).abs() <= 1.0 / 12.0 + 1e-9, "{device}: {r:?}");
    }
}
