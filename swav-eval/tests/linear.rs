//! The official linear evaluation: one SGD step against an independent float64 computation, the
//! schedule against its formula, separable labels learned and shuffled labels not.

mod common;

use swav_eval::linear::{init_classifier, linear_eval, sgd_step, LinearConfig, LinearOptions, LinearReport};
use swav_model::param::Visit;
use swav_tensor::Tensor;
use swav_train::lars::Lars;

/// PyTorch's `CrossEntropyLoss` gradient and `SGD(momentum, weight_decay)` step, written out in f64.
struct Reference {
    w: Vec<f64>,
    b: Vec<f64>,
    buf_w: Vec<f64>,
    buf_b: Vec<f64>,
    momentum: f64,
    weight_decay: f64,
}

impl Reference {
    fn step(&mut self, x: &[f64], labels: &[u32], lr: f64) {
        let (rows, classes) = (labels.len(), self.b.len());
        let dim = self.w.len() / classes;
        let (mom, wd) = (self.momentum, self.weight_decay);
        let (mut gw, mut gb) = (vec![0.0; classes * dim], vec![0.0; classes]);
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let z: Vec<f64> =
                (0..classes).map(|k| self.b[k] + (0..dim).map(|j| self.w[k * dim + j] * xr[j]).sum::<f64>()).collect();
            let total: f64 = z.iter().map(|v| v.exp()).sum();
            for k in 0..classes {
                let d = (z[k].exp() / total - if k == labels[r] as usize { 1.0 } else { 0.0 }) / rows as f64;
                gb[k] += d;
                for j in 0..dim {
                    gw[k * dim + j] += d * xr[j];
                }
            }
        }
        for ((w, buf), g) in self.w.iter_mut().zip(&mut self.buf_w).zip(&gw) {
            *buf = mom * *buf + g + wd * *w;
            *w -= lr * *buf;
        }
        for ((w, buf), g) in self.b.iter_mut().zip(&mut self.buf_b).zip(&gb) {
            *buf = mom * *buf + g + wd * *w;
            *w -= lr * *buf;
        }
    }
}

#[test]
fn sgd_steps_match_an_independent_float64_computation() {
    let (dim, classes, rows) = (7, 4, 5);
    let mut layer = init_classifier(dim, classes, 9).unwrap();
    let w0 = layer.weight.value.to_vec();
    // The official initialisation: N(0, 0.01) weights, zero bias.
    let std = (w0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w0.len() as f64).sqrt();
    assert!((0.004..0.02).contains(&std) && layer.bias.as_ref().unwrap().value.to_vec() == vec![0.0; classes]);
    let x: Vec<f32> = (0..rows * dim).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
    let labels = [0u32, 3, 1, 1, 2];
    let (mom, wd) = (0.9, 1e-2);
    let mut reference = Reference {
        w: w0.iter().map(|&v| v as f64).collect(),
        b: vec![0.0; classes],
        buf_w: vec![0.0; classes * dim],
        buf_b: vec![0.0; classes],
        momentum: mom,
        weight_decay: wd,
    };
    let mut opt = Lars::new(mom, wd, 0.0, false);
    let xt = Tensor::from_slice(&[rows, dim], &x).unwrap();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (step, lr) in [0.3, 0.1, 0.05].into_iter().enumerate() {
        sgd_step(&mut layer, &mut opt, &xt, &labels, lr).unwrap();
        reference.step(&x64, &labels, lr);
        let got = layer.weight.value.to_vec().into_iter().chain(layer.bias.as_ref().unwrap().value.to_vec());
        for (i, (g, want)) in got.zip(reference.w.iter().chain(&reference.b)).enumerate() {
            assert!((g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "step {step}, value {i}: {g} vs {want}");
        }
    }
    assert_eq!(layer.num_params(), classes * dim + classes);
}

fn options(epochs: usize) -> LinearOptions {
    LinearOptions {
        config: LinearConfig { epochs, batch_size: 16, ..LinearConfig::default() },
        input_size: None,
        workers: 2,
    }
}

fn check_schedule(r: &LinearReport) {
    let t = r.config.epochs as f64;
    for (e, epoch) in r.epochs.iter().enumerate() {
        let want = 0.5 * r.config.lr * (1.0 + (std::f64::consts::PI * e as f64 / t).cos());
        assert!((epoch.lr - want).abs() < 1e-12, "epoch {e}: lr {} vs {want}", epoch.lr);
        assert_eq!(epoch.epoch, e + 1);
    }
}

#[test]
fn separable_labels_are_learned_and_shuffled_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_file(tmp.path());
    let train = common::dataset(tmp.path(), "train", 20, false, 1);
    let val = common::dataset(tmp.path(), "val", 10, false, 2);
    let r = linear_eval(&model, &train, &val, &options(8), &|_| {}).unwrap();
    check_schedule(&r);
    assert_eq!((r.train_images, r.val_images, r.classes, r.feature_dim), (60, 30, 3, 32));
    assert_eq!((r.train_input.crop, r.train_input.scale, r.val_input.crop), (12, [0.08, 1.0], 12));
    assert!(r.best.top1 >= 0.9 && r.last.top1 >= 0.8, "{:?}", r.epochs);
    assert!(r.best.top1 >= r.last.top1 && r.best.top1 == r.epochs[r.best.epoch - 1].val_top1);
    assert_eq!(r.last.top5, 1.0, "3 classes: top-5 is always right");
    assert!(r.protocol.contains("official eval_linear"));
    // Deterministic.
    let again = linear_eval(&model, &train, &val, &options(8), &|_| {}).unwrap();
    assert_eq!((again.best, again.last), (r.best, r.last));
    // eval.json-style write and read back.
    let path = tmp.path().join("linear.json");
    r.write(&path).unwrap();
    assert_eq!(LinearReport::read(&path).unwrap(), r);

    // Labels independent of the images: the validation accuracy stays at chance (1/3).
    let train = common::dataset(tmp.path(), "train-shuffled", 40, true, 3);
    let val = common::dataset(tmp.path(), "val-shuffled", 60, true, 4);
    let r = linear_eval(&model, &train, &val, &options(6), &|_| {}).unwrap();
    assert!((0.15..=0.5).contains(&r.last.top1), "shuffled labels: {:?}", r.epochs);
}

#[test]
fn bad_settings_are_refused_before_any_image_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_file(tmp.path());
    let train = common::dataset(tmp.path(), "train", 2, false, 1);
    for config in [
        LinearConfig { epochs: 0, ..LinearConfig::default() },
        LinearConfig { lr: 0.0, ..LinearConfig::default() },
        LinearConfig { final_lr: 1.0, ..LinearConfig::default() },
        LinearConfig { momentum: 1.0, ..LinearConfig::default() },
        LinearConfig { batch_size: 0, ..LinearConfig::default() },
    ] {
        let opts = LinearOptions { config, ..options(1) };
        let err = linear_eval(&model, &train, &train, &opts, &|_| panic!("no work")).unwrap_err().to_string();
        assert!(err.contains("linear evaluation settings"), "{err}");
    }
}
