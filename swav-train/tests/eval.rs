//! k-NN against an independent brute-force implementation, planted clusters, the linear probe on
//! separable and on shuffled labels, the .npy format and the run report.

use swav_train::embed::{npy_bytes, parse_npy, read_npy, write_npy};
use swav_train::eval::{
    knn_predict, knn_top1, linear_probe_top1, train_linear_probe, Features, KnnConfig, ProbeConfig,
};
use swav_train::report::{read_metrics, write_report};
use swav_train::TrainError;

/// Deterministic generator for the test data (SplitMix64 + Box-Muller).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

fn random_features(rng: &mut Rng, n: usize, dim: usize, classes: u32) -> Features {
    let data = (0..n * dim).map(|_| rng.normal()).collect();
    let labels = (0..n).map(|_| rng.below(classes)).collect();
    Features::new(data, dim, Some(labels)).unwrap()
}

/// The k-NN of the module docs, written out plainly in f64: full sort by (similarity desc, index asc).
fn brute_force_knn(train: &Features, test: &Features, k: usize, t: f64) -> Vec<u32> {
    let norm = |r: &[f32]| -> Vec<f64> {
        let n = r
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        r.iter().map(|&v| v as f64 / n).collect()
    };
    let tr: Vec<Vec<f64>> = (0..train.n).map(|i| norm(train.row(i))).collect();
    let labels = train.labels.as_ref().unwrap();
    (0..test.n)
        .map(|q| {
            let x = norm(test.row(q));
            let mut sims: Vec<(f64, usize)> = tr
                .iter()
                .enumerate()
                .map(|(j, r)| (r.iter().zip(&x).map(|(a, b)| a * b).sum(), j))
                .collect();
            sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let mut votes = vec![0.0f64; train.classes];
            for &(s, j) in sims.iter().take(k) {
                votes[labels[j] as usize] += (s / t).exp();
            }
            let mut best = 0;
            for c in 1..votes.len() {
                if votes[c] > votes[best] {
                    best = c;
                }
            }
            best as u32
        })
        .collect()
}

#[test]
fn knn_matches_brute_force() {
    let mut rng = Rng(7);
    // 300 test rows: more than one GEMM block of test rows.
    let train = random_features(&mut rng, 400, 24, 5);
    let test = random_features(&mut rng, 300, 24, 5);
    for (k, t) in [
        (1, 0.1),
        (7, 0.1),
        (20, 0.5),
        (200, 0.1),
        (400, 0.07),
        (1000, 0.1),
    ] {
        let got = knn_predict(
            &train,
            &test,
            &KnnConfig {
                k,
                temperature: t as f32,
            },
        )
        .unwrap();
        let want = brute_force_knn(&train, &test, k, t);
        assert_eq!(got, want, "k = {k}, temperature = {t}");
        let acc = knn_top1(
            &train,
            &test,
            &KnnConfig {
                k,
                temperature: t as f32,
            },
        )
        .unwrap();
        let want_acc = want
            .iter()
            .zip(test.labels.as_ref().unwrap())
            .filter(|(p, l)| p == l)
            .count() as f64
            / test.n as f64;
        assert_eq!(acc, want_acc);
    }
}

#[test]
fn knn_ties_go_to_the_lower_index_and_scale_does_not_matter() {
    // Two identical training rows with different labels: k = 1 takes the first one.
    let a = Features::new(vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 2, Some(vec![0, 1, 1])).unwrap();
    let b = Features::new(vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 2, Some(vec![1, 0, 1])).unwrap();
    // The query is a scaled copy of the first rows: cosine similarity ignores the scale.
    let q = Features::new(vec![5.0, 0.0], 2, Some(vec![0])).unwrap();
    let cfg = KnnConfig {
        k: 1,
        temperature: 0.1,
    };
    assert_eq!(knn_predict(&a, &q, &cfg).unwrap(), vec![0]);
    assert_eq!(knn_predict(&b, &q, &cfg).unwrap(), vec![1]);
}

/// `classes` well separated clusters in `dim` dimensions.
fn clustered(rng: &mut Rng, centres: &[Vec<f32>], n: usize, noise: f32) -> Features {
    let dim = centres[0].len();
    let mut data = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(centres.len() as u32);
        labels.push(c);
        data.extend(
            centres[c as usize]
                .iter()
                .map(|&v| v + noise * rng.normal()),
        );
    }
    Features::new(data, dim, Some(labels)).unwrap()
}

#[test]
fn knn_finds_planted_clusters() {
    let mut rng = Rng(11);
    let centres: Vec<Vec<f32>> = (0..10)
        .map(|_| (0..64).map(|_| rng.normal()).collect())
        .collect();
    let train = clustered(&mut rng, &centres, 2000, 0.3);
    let test = clustered(&mut rng, &centres, 500, 0.3);
    let acc = knn_top1(&train, &test, &KnnConfig::default()).unwrap();
    assert!(acc >= 0.99, "k-NN accuracy on planted clusters: {acc}");
}

#[test]
fn knn_rejects_bad_input() {
    let mut rng = Rng(3);
    let train = random_features(&mut rng, 10, 4, 2);
    let other_dim = random_features(&mut rng, 10, 5, 2);
    let unlabelled = Features::new(vec![0.5; 40], 4, None).unwrap();
    let cfg = KnnConfig::default();
    assert!(matches!(
        knn_top1(&train, &other_dim, &cfg),
        Err(TrainError::Eval(_))
    ));
    let err = knn_top1(&unlabelled, &train, &cfg).unwrap_err().to_string();
    assert!(err.contains("labels"), "{err}");
    assert!(knn_top1(
        &train,
        &train,
        &KnnConfig {
            k: 0,
            temperature: 0.1
        }
    )
    .is_err());
    assert!(knn_top1(
        &train,
        &train,
        &KnnConfig {
            k: 5,
            temperature: 0.0
        }
    )
    .is_err());
    assert!(Features::new(vec![1.0, f32::NAN], 2, None).is_err());
    assert!(Features::new(vec![1.0; 6], 2, Some(vec![0, 1])).is_err());
    assert!(Features::new(vec![1.0; 5], 2, None).is_err());
}

/// Labels from a random linear map (argmax of `W x`, unchanged by the probe's L2 normalisation), so
/// a linear classifier can fit them exactly.
fn linearly_labelled(rng: &mut Rng, w: &[Vec<f32>], n: usize) -> Features {
    let dim = w[0].len();
    let mut data = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        // Dimensions of unequal scales: the probe standardises them.
        let x: Vec<f32> = (0..dim).map(|j| (1.0 + j as f32) * rng.normal()).collect();
        let scores: Vec<f32> = w
            .iter()
            .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum())
            .collect();
        let best = (0..scores.len()).fold(0, |b, c| if scores[c] > scores[b] { c } else { b });
        labels.push(best as u32);
        data.extend(x);
    }
    Features::new(data, dim, Some(labels)).unwrap()
}

#[test]
fn linear_probe_fits_separable_data() {
    let mut rng = Rng(5);
    let w: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..20).map(|j| rng.normal() / (1.0 + j as f32)).collect())
        .collect();
    let train = linearly_labelled(&mut rng, &w, 3000);
    let test = linearly_labelled(&mut rng, &w, 1000);
    let cfg = ProbeConfig {
        epochs: 30,
        ..ProbeConfig::default()
    };
    let acc = linear_probe_top1(&train, &test, &cfg).unwrap();
    assert!(acc >= 0.95, "linear probe on separable data: {acc}");
    // Deterministic: the same classifier bit for bit.
    assert_eq!(
        train_linear_probe(&train, &cfg).unwrap(),
        train_linear_probe(&train, &cfg).unwrap()
    );
}

#[test]
fn linear_probe_is_at_chance_on_shuffled_labels() {
    let mut rng = Rng(9);
    let train = random_features(&mut rng, 3000, 32, 4);
    let test = random_features(&mut rng, 2000, 32, 4);
    let acc = linear_probe_top1(&train, &test, &ProbeConfig::default()).unwrap();
    assert!(
        (0.20..=0.30).contains(&acc),
        "linear probe on random labels: {acc} (chance 0.25)"
    );
}

#[test]
fn linear_probe_rejects_bad_settings() {
    let mut rng = Rng(1);
    let f = random_features(&mut rng, 20, 3, 2);
    for cfg in [
        ProbeConfig {
            epochs: 0,
            ..ProbeConfig::default()
        },
        ProbeConfig {
            lr: -1.0,
            ..ProbeConfig::default()
        },
        ProbeConfig {
            momentum: 1.0,
            ..ProbeConfig::default()
        },
        ProbeConfig {
            batch_size: 0,
            ..ProbeConfig::default()
        },
    ] {
        assert!(
            matches!(linear_probe_top1(&f, &f, &cfg), Err(TrainError::Eval(_))),
            "{cfg:?}"
        );
    }
}

#[test]
fn npy_header_is_numpys() {
    let bytes = npy_bytes(&[2, 3], &[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    // What `np.save` writes for `np.arange(6, dtype="<f4").reshape(2, 3)`: a 128-byte header.
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let mut want = b"\x93NUMPY\x01\x00v\x00".to_vec();
    want.extend_from_slice(dict.as_bytes());
    want.resize(127, b' ');
    want.push(b'\n');
    assert_eq!(&bytes[..128], &want[..]);
    assert_eq!(bytes.len(), 128 + 6 * 4);
    assert_eq!(&bytes[128 + 4..128 + 8], &1.0f32.to_le_bytes());
}

#[test]
fn npy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.npy");
    let data: Vec<f32> = (0..3 * 70).map(|i| i as f32 * 0.5 - 7.0).collect();
    write_npy(&f, &[3, 70], &data).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "data is 64-byte aligned");
    assert_eq!(bytes[10 + header_len - 1], b'\n');
    assert_eq!(read_npy::<f32>(&f).unwrap(), (vec![3, 70], data));

    let l = dir.path().join("l.npy");
    let labels: Vec<i64> = vec![0, 9, 3, -1, i64::MAX, 2, 2];
    write_npy(&l, &[7], &labels).unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&l).unwrap()[..64]).into_owned();
    assert!(
        text.contains("'descr': '<i8'") && text.contains("'shape': (7,)"),
        "{text}"
    );
    assert_eq!(read_npy::<i64>(&l).unwrap(), (vec![7], labels));

    // Wrong dtype, bad magic, truncated data and a shape that does not fit are errors.
    assert!(read_npy::<i64>(&f).is_err());
    assert!(parse_npy::<f32>(b"not numpy at all").is_err());
    let bytes = std::fs::read(&f).unwrap();
    assert!(parse_npy::<f32>(&bytes[..bytes.len() - 4]).is_err());
    assert!(write_npy(&f, &[4, 70], &[0.0f32; 10]).is_err());
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

fn metrics_line(step: u64, loss: &str) -> String {
    format!(
        r#"{{"step": {step}, "epoch": {}, "loss": {loss}, "lr": {}, "images_per_s": {}, "data_wait": 0.25, "cluster_entropy": {}, "clusters_used": {}, "elapsed_s": {}, "future_key": [1, 2]}}"#,
        step / 20,
        0.6 * (1.0 - step as f64 / 100.0),
        100.0 + (step % 7) as f64,
        4.0 + (step as f64 / 50.0),
        20 + step,
        step as f64 * 0.5
    )
}

#[test]
fn report_writes_a_plot_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for step in 1..=60u64 {
        let loss = if step == 30 {
            "null".to_string()
        } else {
            format!("{}", 8.0 - step as f64 * 0.05)
        };
        text += &metrics_line(step, &loss);
        text.push('\n');
    }
    // A line cut short by a crash.
    text += r#"{"step": 61, "epoch": 3, "loss": 4.9"#;
    std::fs::write(dir.path().join("metrics.jsonl"), &text).unwrap();

    let m = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!((m.rows.len(), m.skipped_lines), (60, 1));
    assert_eq!(m.rows[29].loss, None);

    let files = write_report(dir.path()).unwrap();
    let s = &files.summary;
    assert_eq!(
        (s.steps, s.first_step, s.last_step, s.epochs),
        (60, 1, 60, 4)
    );
    assert!((s.final_loss.unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(s.min_loss.unwrap().1, 60);
    assert!((s.mean_data_wait.unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(s.bad_losses, 1);

    let png = std::fs::read(&files.png).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), swav_train::report::PNG_SIZE);
    // The loss curve is drawn in red, and there is text and axes in black.
    let red = img
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    let dark = img
        .pixels()
        .filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60)
        .count();
    assert!(red > 200, "{red} red pixels");
    assert!(dark > 1000, "{dark} dark pixels");

    let txt = std::fs::read_to_string(&files.txt).unwrap();
    assert!(txt.contains("60 (step 1 to 60)"), "{txt}");
    assert!(txt.contains("unreadable line"), "{txt}");
    assert!(!txt.contains("k-NN"), "no eval.json yet: {txt}");
}

#[test]
fn report_needs_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_report(dir.path()).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl"), "{err}");
    std::fs::write(dir.path().join("metrics.jsonl"), "garbage\n").unwrap();
    assert!(write_report(dir.path()).is_err());
}

#[test]
fn report_curves_stay_inside_their_panels() {
    // One-step spikes, down in the loss (top panel) and up in the throughput (bottom panel): the
    // sharpest turns a curve can take, where thick polylines overshoot into the neighbouring panel.
    let mut rng = Rng(17);
    let rows: Vec<swav_train::report::MetricsRow> = (0..1250u64)
        .map(|step| swav_train::report::MetricsRow {
            step,
            loss: Some(if step % 41 == 20 {
                1.0
            } else {
                9.0 + 0.2 * rng.normal() as f64
            }),
            images_per_s: Some(if step % 37 == 18 {
                1500.0
            } else {
                500.0 + 20.0 * rng.normal() as f64
            }),
            ..Default::default()
        })
        .collect();
    let png = swav_train::report::plot_png(&rows).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let (mut red, mut magenta) = (0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        let is_red = p[0] > 200 && p[1] < 60 && p[2] < 60;
        let is_magenta = p[0] > 200 && p[1] < 60 && p[2] > 200;
        if is_red {
            red += 1;
            assert!(
                x < w / 2 && y < h / 2,
                "loss pixel at ({x}, {y}) outside its panel"
            );
        }
        if is_magenta {
            magenta += 1;
            assert!(
                x >= w / 2 && y >= h / 2,
                "throughput pixel at ({x}, {y}) outside its panel"
            );
        }
    }
    assert!(
        red > 1000 && magenta > 1000,
        "{red} red, {magenta} magenta pixels"
    );
}
