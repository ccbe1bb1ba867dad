//! k-NN against an independent brute-force implementation, planted clusters, the linear probe on
//! separable and on shuffled labels.

use swav_eval::features::Features;
use swav_eval::knn::{knn_predict, knn_top1, KnnConfig};
use swav_eval::probe::{linear_probe_top1, train_linear_probe, ProbeConfig};
use swav_eval::EvalError;

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
        let n = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
        r.iter().map(|&v| v as f64 / n).collect()
    };
    let tr: Vec<Vec<f64>> = (0..train.n).map(|i| norm(train.row(i))).collect();
    let labels = train.labels.as_ref().unwrap();
    (0..test.n)
        .map(|q| {
            let x = norm(test.row(q));
            let mut sims: Vec<(f64, usize)> =
                tr.iter().enumerate().map(|(j, r)| (r.iter().zip(&x).map(|(a, b)| a * b).sum(), j)).collect();
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
    for (k, t) in [(1, 0.1), (7, 0.1), (20, 0.5), (200, 0.1), (400, 0.07), (1000, 0.1)] {
        let got = knn_predict(&train, &test, &KnnConfig { k, temperature: t as f32 }).unwrap();
        let want = brute_force_knn(&train, &test, k, t);
        assert_eq!(got, want, "k = {k}, temperature = {t}");
        let acc = knn_top1(&train, &test, &KnnConfig { k, temperature: t as f32 }).unwrap();
        let want_acc =
            want.iter().zip(test.labels.as_ref().unwrap()).filter(|(p, l)| p == l).count() as f64 / test.n as f64;
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
    let cfg = KnnConfig { k: 1, temperature: 0.1 };
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
        data.extend(centres[c as usize].iter().map(|&v| v + noise * rng.normal()));
    }
    Features::new(data, dim, Some(labels)).unwrap()
}

#[test]
fn knn_finds_planted_clusters() {
    let mut rng = Rng(11);
    let centres: Vec<Vec<f32>> = (0..10).map(|_| (0..64).map(|_| rng.normal()).collect()).collect();
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
    assert!(matches!(knn_top1(&train, &other_dim, &cfg), Err(EvalError::Invalid(_))));
    let err = knn_top1(&unlabelled, &train, &cfg).unwrap_err().to_string();
    assert!(err.contains("labels"), "{err}");
    assert!(knn_top1(&train, &train, &KnnConfig { k: 0, temperature: 0.1 }).is_err());
    assert!(knn_top1(&train, &train, &KnnConfig { k: 5, temperature: 0.0 }).is_err());
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
        let scores: Vec<f32> = w.iter().map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
        let best = (0..scores.len()).fold(0, |b, c| if scores[c] > scores[b] { c } else { b });
        labels.push(best as u32);
        data.extend(x);
    }
    Features::new(data, dim, Some(labels)).unwrap()
}

#[test]
fn linear_probe_fits_separable_data() {
    let mut rng = Rng(5);
    let w: Vec<Vec<f32>> = (0..4).map(|_| (0..20).map(|j| rng.normal() / (1.0 + j as f32)).collect()).collect();
    let train = linearly_labelled(&mut rng, &w, 3000);
    let test = linearly_labelled(&mut rng, &w, 1000);
    let cfg = ProbeConfig { epochs: 30, ..ProbeConfig::default() };
    let acc = linear_probe_top1(&train, &test, &cfg).unwrap();
    assert!(acc >= 0.95, "linear probe on separable data: {acc}");
    // Deterministic: the same classifier bit for bit.
    assert_eq!(train_linear_probe(&train, &cfg).unwrap(), train_linear_probe(&train, &cfg).unwrap());
}

#[test]
fn linear_probe_is_at_chance_on_shuffled_labels() {
    let mut rng = Rng(9);
    let train = random_features(&mut rng, 3000, 32, 4);
    let test = random_features(&mut rng, 2000, 32, 4);
    let acc = linear_probe_top1(&train, &test, &ProbeConfig::default()).unwrap();
    assert!((0.20..=0.30).contains(&acc), "linear probe on random labels: {acc} (chance 0.25)");
}

#[test]
fn linear_probe_rejects_bad_settings() {
    let mut rng = Rng(1);
    let f = random_features(&mut rng, 20, 3, 2);
    for cfg in [
        ProbeConfig { epochs: 0, ..ProbeConfig::default() },
        ProbeConfig { lr: -1.0, ..ProbeConfig::default() },
        ProbeConfig { momentum: 1.0, ..ProbeConfig::default() },
        ProbeConfig { batch_size: 0, ..ProbeConfig::default() },
    ] {
        assert!(matches!(linear_probe_top1(&f, &f, &cfg), Err(EvalError::Invalid(_))), "{cfg:?}");
    }
}
