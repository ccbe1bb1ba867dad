//! Training on a CUDA device: the whole step (forward, Sinkhorn, loss, backward, LARS, queue, metrics)
//! on the emulated device follows the CPU run step for step in fp32, and runs in bf16. The same test runs
//! on the real device 0 where this machine has one (elsewhere that half prints SKIPPED).

mod fixtures;

use std::path::Path;

use swav_model::checkpoint::NamedTensors;
use swav_tensor::Device;
use swav_train::config::{self, Config};
use swav_train::trainer::{train, TrainOptions};

fn tiny(overrides: &[&str]) -> Config {
    let mut o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    o.push("train.workers=1".into());
    config::load(config::preset("cpu-tiny").unwrap().toml, &o).unwrap()
}

fn run(dir: &Path, data: &Path, cfg: &Config, device: Device, steps: usize) -> (Vec<f64>, NamedTensors) {
    let opts = TrainOptions { max_steps: Some(steps), device, ..TrainOptions::new(dir, data) };
    train(cfg, &opts).unwrap();
    let metrics = swav_train::metrics::read(&dir.join(swav_train::metrics::METRICS_FILE)).unwrap();
    let losses = metrics.rows.iter().map(|m| m.loss.unwrap()).collect();
    let found = swav_train::checkpoint::latest(dir).unwrap().unwrap();
    (losses, NamedTensors::read(&found.model_path()).unwrap())
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

#[test]
fn training_on_a_cuda_device_follows_the_cpu() {
    let devices: Vec<Device> = fixtures::emulated_device().into_iter().chain(fixtures::real_device()).collect();
    if devices.is_empty() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    // The queue switches on in the second epoch (4 steps per epoch), prototypes frozen for 2 steps.
    let cfg = tiny(&[
        "train.epochs=3",
        "train.queue_length=16",
        "train.epoch_queue_starts=1",
        "train.freeze_prototypes_niters=2",
        "train.precision=fp32",
    ]);
    let (cpu_losses, cpu_state) = run(&tmp.path().join("cpu"), &data, &cfg, Device::Cpu, 6);
    for device in devices {
        let dir = tmp.path().join(format!("dev{device}"));
        let (losses, state) = run(&dir, &data, &cfg, device, 6);
        for (i, (a, b)) in losses.iter().zip(&cpu_losses).enumerate() {
            // The first step starts from the same weights: only float rounding differs. Later steps
            // carry the (fp32 vs the CPU's f64 statistics) rounding of the earlier ones, amplified by
            // Sinkhorn's 1/epsilon and the softmax's 1/temperature; a wrong step (queue, freezing, lr,
            // LARC) is off by percents.
            let tol = if i == 0 { 1e-5 } else { 2e-3 };
            assert!(((a - b) / b).abs() < tol, "{device} step {i}: loss {a} vs CPU {b}");
        }
        let mut worst = 0.0f64;
        for (name, value) in &cpu_state.tensors {
            let (
                swav_model::checkpoint::Value::F32 { data: want, .. },
                Some(swav_model::checkpoint::Value::F32 { data: got, .. }),
            ) = (value, state.tensors.get(name))
            else {
                continue;
            };
            let e = rel(got, want);
            worst = worst.max(e);
            assert!(e < 1e-2, "{device}: {name} differs from the CPU run by {e:.2e}");
        }
        eprintln!("{device}: largest relative difference of a tensor after 6 steps: {worst:.2e}");
        // bf16 activations: the same run trains. The first loss comes from the same weights, so it
        // differs from fp32 by the rounding of the forward only; later ones carry bf16's noisier
        // gradients (cosine ~0.9 with fp32's on this narrow network, measured), so they only have
        // to stay finite.
        let cfg16 = Config {
            train: swav_train::config::TrainConfig {
                precision: Some(swav_train::config::Precision::Bf16),
                ..cfg.train.clone()
            },
            ..cfg.clone()
        };
        let (l16, _) = run(&tmp.path().join(format!("bf16{device}")), &data, &cfg16, device, 3);
        assert_eq!(l16.len(), 3);
        assert!(
            ((l16[0] - cpu_losses[0]) / cpu_losses[0]).abs() < 2e-2,
            "{device} bf16 first loss {} vs fp32 {}",
            l16[0],
            cpu_losses[0]
        );
        assert!(l16.iter().all(|l| l.is_finite()), "{l16:?}");
    }
}

#[test]
fn bf16_on_the_cpu_runs_where_the_cpu_multiplies_bf16_and_is_refused_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg16 = tiny(&["train.precision=bf16"]);
    if !swav_tensor::matmul::bf16_hardware() {
        let err = train(&cfg16, &TrainOptions::new(&tmp.path().join("x"), &data)).unwrap_err();
        assert!(err.to_string().contains("train.precision") && err.to_string().contains("AVX512_BF16"), "{err}");
        return;
    }
    // bf16 products, fp32 everything else: the first loss (same weights) differs from fp32's by the
    // rounding of the convolutions' factors only.
    let (l32, _) = run(&tmp.path().join("fp32"), &data, &tiny(&["train.precision=fp32"]), Device::Cpu, 3);
    let (l16, _) = run(&tmp.path().join("bf16"), &data, &cfg16, Device::Cpu, 3);
    assert_eq!(l16.len(), 3);
    let first = ((l16[0] - l32[0]) / l32[0]).abs();
    assert!(first > 0.0 && first < 1e-2, "bf16 first loss {} vs fp32 {}", l16[0], l32[0]);
    assert!(l16.iter().all(|l| l.is_finite()), "{l16:?}");
}

#[test]
fn a_diverging_run_on_a_cuda_device_stops_with_the_step_named_and_saves_nothing() {
    let Some(device) = fixtures::emulated_device().or_else(fixtures::real_device) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&["train.epochs=2", "train.lars=false", "train.base_lr=1e30", "train.final_lr=1e30"]);
    // The reports come back one step late on a device: the error still names the step whose loss was
    // not finite, and the state after it is not saved.
    let run = tmp.path().join("run");
    let err = train(&cfg, &TrainOptions { device, ..TrainOptions::new(&run, &data) }).unwrap_err();
    match &err {
        swav_train::TrainError::NonFinite { step, loss, .. } => assert!(*step < 8 && !loss.is_finite(), "{err}"),
        other => panic!("expected a non-finite loss error, got {other}"),
    }
    assert!(swav_train::checkpoint::latest(&run).unwrap().is_none(), "nothing may be saved from a diverged state");
    let metrics = swav_train::metrics::read(&run.join(swav_train::metrics::METRICS_FILE)).unwrap();
    assert!(metrics.rows.iter().all(|m| m.loss.unwrap().is_finite()), "only finite steps are logged");
}

/// Trains `cfg` for `steps` steps with two ranks that are threads, every rank on `device`; returns
/// each rank's result and (from rank 0's metrics) the losses.
fn run_two_ranks(
    dir: &Path,
    data: &Path,
    cfg: &Config,
    device: Device,
    steps: usize,
) -> Vec<Result<swav_train::trainer::TrainOutcome, swav_train::TrainError>> {
    let ranks = swav_tensor::collective::ThreadGroup::new(2, std::time::Duration::from_secs(300));
    std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                scope.spawn(move || {
                    let opts = TrainOptions {
                        max_steps: Some(steps),
                        device,
                        collective: rank,
                        ..TrainOptions::new(dir, data)
                    };
                    train(cfg, &opts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The whole trainer with two ranks on a CUDA device (the emulated one, shared by both ranks):
/// the losses rank 0 logs follow those of the same two ranks on the CPU, with synchronised batch
/// norms (`model.sync_bn`).
#[test]
fn two_ranks_train_on_a_cuda_device_as_on_the_cpu() {
    let Some(device) = fixtures::emulated_device() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&[
        "train.precision=fp32",
        "train.queue_length=16",
        "train.freeze_prototypes_niters=1",
        "model.sync_bn=true",
    ]);
    let losses = |dir: &Path| -> Vec<f64> {
        let metrics = swav_train::metrics::read(&dir.join(swav_train::metrics::METRICS_FILE)).unwrap();
        metrics.rows.iter().map(|m| m.loss.unwrap()).collect()
    };
    let (cpu_dir, dev_dir) = (tmp.path().join("cpu"), tmp.path().join("dev"));
    for r in run_two_ranks(&cpu_dir, &data, &cfg, Device::Cpu, 2) {
        r.unwrap();
    }
    for r in run_two_ranks(&dev_dir, &data, &cfg, device, 2) {
        r.unwrap();
    }
    let (want, got) = (losses(&cpu_dir), losses(&dev_dir));
    assert_eq!(got.len(), 2, "two steps logged: {got:?}");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        // As in the one-rank comparison: the first step differs by rounding only.
        let tol = if i == 0 { 1e-5 } else { 2e-3 };
        assert!(((a - b) / b).abs() < tol, "step {i}: loss {a} on {device} vs {b} on the CPU");
    }
    assert!(swav_train::checkpoint::latest(&dev_dir).unwrap().is_some(), "rank 0 saved the run");
}
