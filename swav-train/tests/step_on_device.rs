//! The device half of the training step, op by op, against its CPU half through the engine's runtime
//! (not the bare kernels, which `cuda_kernels.rs` checks on the emulator): codes (Sinkhorn with and
//! without the queue), the swapped-prediction loss and its gradient with the skip flag, the mean over
//! heads, a LARS/SGD step over a whole model (momentum, frozen prototypes, a skipped step), prototype
//! normalisation and the cluster statistics. fp32 throughout, relative error < 1e-4 (the issue's
//! bound). Runs on the emulated device everywhere, and on the real device 0 where there is one
//! (elsewhere that half prints SKIPPED; `SWAV_REQUIRE_CUDA=1` makes it a failure).

mod fixtures;

use swav_core::rng::SplitMix64;
use swav_model::config::{Arch, ModelConfig};
use swav_model::param::{Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::cuda::runtime::DeviceBuffer;
use swav_tensor::{Device, Tensor};
use swav_train::lars::Lars;
use swav_train::{assign, device, loss};

fn devices() -> Vec<Device> {
    fixtures::emulated_device().into_iter().chain(fixtures::real_device()).collect()
}

fn single_process() -> swav_train::distributed::CollectiveReducer<'static> {
    swav_train::distributed::CollectiveReducer(&swav_tensor::collective::SingleProcess)
}

fn random(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(-scale, scale) as f32).collect()
}

/// Rows of `k` positive values summing to one (what Sinkhorn hands the loss).
fn codes(rng: &mut SplitMix64, rows: usize, k: usize) -> Vec<f32> {
    let mut q: Vec<f32> = (0..rows * k).map(|_| rng.uniform(0.01, 1.0) as f32).collect();
    for row in q.chunks_exact_mut(k) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    q
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let e = fixtures::rel_err(got, want);
    assert!(e < 1e-4, "{what}: relative error {e:.2e}");
}

fn flag(buf: &DeviceBuffer) -> u32 {
    let mut b = [0u8; 4];
    buf.runtime().backend().download(buf.ptr(), &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn on(shape: &[usize], v: &[f32], dev: Device) -> Tensor {
    Tensor::from_slice(shape, v).unwrap().to_device(dev).unwrap()
}

#[test]
fn codes_loss_and_loss_mean_match_the_cpu() {
    let params = swav_sinkhorn::Params { epsilon: 0.05, iterations: 3, threads: 1 };
    for dev in devices() {
        let mut rng = SplitMix64::new(1);
        let mut sinkhorn = device::DeviceSinkhorn::default();
        // (crops, batch, k, crops_for_assign, queue rows)
        for (crops, batch, k, assign_crops, queue) in
            [(2, 4, 10, vec![0, 1], 0), (5, 3, 33, vec![0, 2], 12), (3, 16, 300, vec![1], 32)]
        {
            let what = format!("{crops} crops x {batch}, k {k}, assign {assign_crops:?}, queue {queue} on {dev}");
            let scores = random(&mut rng, crops * batch * k, 0.9);
            let queue_scores = random(&mut rng, queue * k, 0.9);
            let scores_d = on(&[crops * batch, k], &scores, dev);
            let queue_d = (queue > 0).then(|| on(&[queue, k], &queue_scores, dev));
            let mut cpu_codes = Vec::new();
            let mut dev_codes = Vec::new();
            for &c in &assign_crops {
                let crop = &scores[c * batch * k..(c + 1) * batch * k];
                let want =
                    assign::codes_for_crop(crop, (queue > 0).then_some(&queue_scores[..]), batch, k, &params).unwrap();
                let crop_d = scores_d.narrow(c * batch, batch).unwrap();
                let got = device::codes_for_crop(&mut sinkhorn, &crop_d, queue_d.as_ref(), &params, single_process())
                    .unwrap();
                close(&format!("{what}: codes of crop {c}"), &got.to_vec(), &want);
                cpu_codes.push(want);
                dev_codes.push(got);
            }
            let want = loss::swapped_prediction_loss(&scores, k, batch, crops, &assign_crops, &cpu_codes, 0.1).unwrap();
            let got = device::swapped_prediction_loss(&scores_d, &dev_codes, batch, &assign_crops, 0.1).unwrap();
            close(&format!("{what}: loss"), &got.loss.to_vec(), &[want.loss as f32]);
            close(&format!("{what}: dscores"), &got.dscores.to_vec(), &want.dscores);
            assert_eq!(flag(&got.skip), 0, "{what}: finite loss, no skip");

            // The mean over heads: this loss and a second one.
            let other = on(&[1], &[2.5], dev);
            let (mean, skip) = device::mean_loss(&[&got.loss, &other]).unwrap();
            close(&format!("{what}: mean"), &mean.to_vec(), &[((want.loss + 2.5) / 2.0) as f32]);
            assert_eq!(flag(&skip), 0);
        }
        // A non-finite score raises the flag, and a non-finite head raises the mean's.
        let (batch, k) = (3, 10);
        let mut scores = random(&mut rng, 2 * batch * k, 0.9);
        scores[7] = f32::NAN;
        let scores_d = on(&[2 * batch, k], &scores, dev);
        let q = on(&[batch, k], &codes(&mut rng, batch, k), dev);
        let bad = device::swapped_prediction_loss(&scores_d, &[q], batch, &[0], 0.1).unwrap();
        assert_eq!(flag(&bad.skip), 1, "{dev}: NaN score raises the skip flag");
        let fine = on(&[1], &[1.0], dev);
        let (_, skip) = device::mean_loss(&[&fine, &bad.loss]).unwrap();
        assert_eq!(flag(&skip), 1, "{dev}: a non-finite head raises the mean's flag");
    }
}

fn tiny_model() -> SwavModel {
    let cfg = ModelConfig {
        arch: Arch::parse("resnet18").unwrap(),
        width: Some(4),
        small_stem: true,
        in_channels: 1,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes: vec![10, 7],
        sync_bn: false,
        sync_bn_group: 0,
    };
    SwavModel::new(cfg, 3).unwrap()
}

/// Every parameter of `model` by name, on the host.
fn params(model: &mut SwavModel) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.push((name.to_string(), p.value.to_vec()));
        }
    });
    out
}

/// Gives every parameter a random gradient (a few exactly zero: LARC leaves those unscaled).
/// Returns the names of the zero ones.
fn set_gradients(model: &mut SwavModel, seed: u64) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    let mut i = 0;
    let mut zero = Vec::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            if i % 7 == 3 {
                zero.push(name.to_string());
            }
            let g = if i % 7 == 3 { vec![0.0; p.value.len()] } else { random(&mut rng, p.value.len(), 0.05) };
            p.grad = Tensor::from_vec(p.value.shape(), g).unwrap().to_device(p.value.device()).unwrap();
            i += 1;
        }
    });
    zero
}

#[test]
fn a_lars_step_over_a_whole_model_matches_the_cpu_optimizer() {
    for dev in devices() {
        for lars in [true, false] {
            let frozen = |name: &str| name.starts_with("prototypes");
            let mut cpu_model = tiny_model();
            let mut dev_model = tiny_model();
            dev_model.to_device(dev).unwrap();
            let mut cpu_opt = Lars::new(0.9, 1e-2, 0.001, lars);
            let mut dev_opt = Lars::new(0.9, 1e-2, 0.001, lars);
            let start = params(&mut cpu_model);
            // A finite loss's flag: the update runs.
            let ok = on(&[1], &[1.0], dev);
            let (_, go) = device::mean_loss(&[&ok]).unwrap();
            let mut zero_grad = Vec::new();
            for step in 0..2 {
                zero_grad = set_gradients(&mut cpu_model, 10 + step);
                set_gradients(&mut dev_model, 10 + step);
                cpu_opt.step(&mut cpu_model, 0.5, frozen);
                device::lars_step(&mut dev_opt, &mut dev_model, 0.5, frozen, &go).unwrap();
            }
            let (want, got) = (params(&mut cpu_model), params(&mut dev_model));
            for (((name, w), (_, g)), (_, s)) in want.iter().zip(&got).zip(&start) {
                close(&format!("lars {lars} on {dev}: {name}"), g, w);
                if frozen(name) {
                    assert_eq!(g, s, "{name} is frozen");
                } else if !zero_grad.contains(name) {
                    assert_ne!(g, s, "{name} moved");
                }
            }
            for (name, buf) in &cpu_opt.buffers {
                close(
                    &format!("lars {lars} on {dev}: momentum of {name}"),
                    &dev_opt.buffers[name].to_vec(),
                    &buf.to_vec(),
                );
            }
            assert!(!dev_opt.buffers.keys().any(|n| frozen(n)), "no momentum for frozen prototypes");

            // A raised flag: nothing moves, momentum included.
            let bad = on(&[1], &[f32::INFINITY], dev);
            let (_, stop) = device::mean_loss(&[&bad]).unwrap();
            let before = params(&mut dev_model);
            let momentum: Vec<Vec<f32>> = dev_opt.buffers.values().map(Tensor::to_vec).collect();
            let _ = set_gradients(&mut dev_model, 99);
            device::lars_step(&mut dev_opt, &mut dev_model, 0.5, frozen, &stop).unwrap();
            assert_eq!(params(&mut dev_model), before, "lars {lars} on {dev}: a skipped step moved a weight");
            let after: Vec<Vec<f32>> = dev_opt.buffers.values().map(Tensor::to_vec).collect();
            assert_eq!(after, momentum, "lars {lars} on {dev}: a skipped step moved a momentum");
        }
    }
}

#[test]
fn prototype_normalisation_and_cluster_statistics_match_the_cpu() {
    for dev in devices() {
        let mut cpu = tiny_model();
        let mut gpu = tiny_model();
        gpu.to_device(dev).unwrap();
        cpu.normalize_prototypes().unwrap();
        gpu.normalize_prototypes().unwrap();
        for (c, g) in cpu.prototypes.heads.iter().zip(&gpu.prototypes.heads) {
            close(&format!("normalised prototypes on {dev}"), &g.weight.value.to_vec(), &c.weight.value.to_vec());
        }

        let mut rng = SplitMix64::new(5);
        for (batch, k) in [(1, 1), (7, 10), (64, 300), (5, 3000)] {
            let q = codes(&mut rng, batch, k);
            let stats = device::cluster_stats(&on(&[batch, k], &q, dev)).unwrap().to_vec();
            // Independently, in f64: entropy of the mean code, prototypes that are some row's (first) argmax.
            let mut mean = vec![0.0f64; k];
            let mut used = vec![false; k];
            for row in q.chunks_exact(k) {
                let mut best = 0;
                for (j, &v) in row.iter().enumerate() {
                    mean[j] += v as f64 / batch as f64;
                    if v > row[best] {
                        best = j;
                    }
                }
                used[best] = true;
            }
            let entropy: f64 = mean.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
            let e = (stats[0] as f64 - entropy).abs() / entropy.max(1e-3);
            assert!(e < 1e-4, "{batch} x {k} on {dev}: entropy {} vs {entropy}", stats[0]);
            assert_eq!(stats[1] as usize, used.iter().filter(|&&u| u).count(), "{batch} x {k} on {dev}: clusters used");
        }
    }
}
