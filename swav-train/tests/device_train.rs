//! Training on a CUDA device: the whole step (forward, Sinkhorn, loss, backward, LARS, queue, metrics)
//! on the emulated device follows the CPU run step for step in fp32, and runs in bf16. The same test runs
//! on the real device 0 where this machine has one (elsewhere that half prints SKIPPED).

mod fixtures;

use std::path::Path;
use std::sync::OnceLock;

use swav_model::checkpoint::NamedTensors;
use swav_tensor::Device;
use swav_train::config::{self, Config};
use swav_train::trainer::{train, TrainOptions};

fn emulated() -> Option<Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    *DEVICE.get_or_init(|| {
        let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
        swav_cuda_emu::Emulator::new_or_skip(&[probe])?;
        let backend = swav_tensor::cuda::emulated::EmulatedBackend::new();
        swav_tensor::cuda::runtime::register(99, Box::new(backend)).expect("registered once");
        Some(Device::Cuda(99))
    })
}

fn real() -> Option<Device> {
    match swav_tensor::cuda::runtime::runtime(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => {
            if std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SWAV_REQUIRE_CUDA=1 but there is no usable CUDA device: {e}");
            }
            eprintln!("SKIPPED on a GPU: {e}");
            None
        }
    }
}

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
    let devices: Vec<Device> = emulated().into_iter().chain(real()).collect();
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
    // The CPU refuses bf16 with a message naming the setting.
    let err = train(&tiny(&["train.precision=bf16"]), &TrainOptions::new(&tmp.path().join("x"), &data)).unwrap_err();
    assert!(err.to_string().contains("train.precision"), "{err}");
}

#[test]
fn a_diverging_run_on_a_cuda_device_stops_with_the_step_named_and_saves_nothing() {
    let Some(device) = emulated().or_else(real) else { return };
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
