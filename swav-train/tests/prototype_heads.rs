//! Several prototype heads (`model.prototypes = [k1, k2]`): the step's loss is the mean of the heads'
//! losses and every gradient the mean of the heads' gradients. Checked against single-head models that
//! share the same weights, whose step is itself checked against PyTorch by the reference cases; and the
//! device step (emulated CUDA device) against the CPU step.

use std::collections::HashMap;

use swav_model::param::{Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::{Device, Tensor};
use swav_train::config::{self, Config};
use swav_train::lars::Lars;
use swav_train::queue::Queue;
use swav_train::step::{swav_step, StepStats, SwavState};

const BATCH: usize = 4;

fn config(prototypes: &str) -> Config {
    let overrides = [format!("model.prototypes={prototypes}"), "train.freeze_prototypes_niters=0".into()];
    config::load(config::preset("cpu-tiny").unwrap().toml, &overrides).unwrap()
}

/// Crops `[count * batch, size, size, 1]` of every group, from a fixed stream.
fn crops(cfg: &Config, seed: u64) -> Vec<Tensor> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    cfg.crops
        .groups
        .iter()
        .map(|g| {
            let shape = [g.count * BATCH, g.size, g.size, 1];
            Tensor::from_vec(&shape, (0..shape.iter().product()).map(|_| next()).collect()).unwrap()
        })
        .collect()
}

fn values(model: &mut SwavModel, grads: bool) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.insert(name.to_string(), if grads { p.grad.to_vec() } else { p.value.to_vec() });
        }
    });
    out
}

/// A one-head model with the weights of `multi` and the prototypes of its head `h`.
fn single_head(multi: &mut SwavModel, h: usize, k: usize) -> SwavModel {
    let weights = values(multi, false);
    let mut single = SwavModel::new(config(&format!("[{k}]")).model, 0).unwrap();
    single.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            let from = name.replace("prototypes.weight", &format!("prototypes.prototypes{h}.weight"));
            let v = &weights[&from];
            p.value = Tensor::from_vec(p.value.shape(), v.clone()).unwrap();
        }
    });
    single
}

fn state(model: SwavModel, cfg: &Config) -> SwavState {
    let t = &cfg.train;
    let mut s = SwavState::new(model, Lars::new(t.momentum, t.weight_decay, t.trust_coefficient, t.lars));
    // A full queue of fixed rows, so that each head's codes also depend on its product with the queue.
    let rows: Vec<Tensor> = (0..t.crops_for_assign.len())
        .map(|j| {
            let d = cfg.model.feat_dim;
            let v: Vec<f32> = (0..8 * d).map(|i| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5).collect();
            Tensor::from_vec(&[8, d], v).unwrap()
        })
        .collect();
    s.queue = Some(Queue::from_rows(rows));
    s
}

fn step(state: &mut SwavState, cfg: &Config, seed: u64) -> StepStats {
    swav_step(state, &cfg.train, crops(cfg, seed), BATCH, 10, 0.0).unwrap()
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()
}

/// A gradient whose true value is zero (a bias followed by batch norm) is rounding noise: such tensors
/// are judged by absolute error against the largest gradient (the rule of the reference cases).
fn is_zero(want: &[f32], scale: f64) -> bool {
    norm(want) < 1e-5 * scale
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

#[test]
fn two_heads_average_the_loss_and_the_gradients_of_each_head() {
    let cfg = config("[5, 7]");
    let mut multi = SwavModel::new(cfg.model.clone(), 3).unwrap();
    let singles = [single_head(&mut multi, 0, 5), single_head(&mut multi, 1, 7)];

    let mut multi_state = state(multi, &cfg);
    let multi_stats = step(&mut multi_state, &cfg, 11);
    let multi_grads = values(&mut multi_state.model, true);

    let mut losses = Vec::new();
    let mut grads = Vec::new();
    for (h, single) in singles.into_iter().enumerate() {
        let single_cfg = config(&format!("[{}]", [5, 7][h]));
        let mut s = state(single, &single_cfg);
        losses.push(step(&mut s, &single_cfg, 11).loss);
        grads.push(values(&mut s.model, true));
    }
    let want = (losses[0] + losses[1]) / 2.0;
    assert!(((multi_stats.loss - want) / want).abs() < 1e-6, "loss {} vs mean of heads {want}", multi_stats.loss);
    assert!((losses[0] - losses[1]).abs() > 1e-3, "the heads must differ for the test to mean anything");

    let mut checked = 0;
    let scale = multi_grads.values().map(|g| norm(g)).fold(0.0, f64::max);
    for (name, got) in &multi_grads {
        let want: Vec<f32> = if let Some(h) =
            ["prototypes.prototypes0.weight", "prototypes.prototypes1.weight"].iter().position(|p| p == name)
        {
            grads[h]["prototypes.weight"].iter().map(|g| g / 2.0).collect()
        } else {
            grads[0][name].iter().zip(&grads[1][name]).map(|(a, b)| (a + b) / 2.0).collect()
        };
        if is_zero(&want, scale) {
            let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            assert!(norm(&diff) < 1e-5 * scale, "{name}: {got:?} vs {want:?}");
            continue;
        }
        let e = rel(got, &want);
        assert!(e < 1e-4, "{name}: gradient off the mean of the heads' by {e:.2e}");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} tensors compared");
}

#[test]
fn two_heads_on_a_cuda_device_follow_the_cpu() {
    let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
    if swav_cuda_emu::Emulator::new_or_skip(&[probe]).is_none() {
        return;
    }
    let device = Device::Cuda(98);
    swav_tensor::cuda::runtime::register(98, Box::new(swav_tensor::cuda::emulated::EmulatedBackend::new()))
        .expect("registered once");
    let mut cfg = config("[5, 7]");
    cfg.train.precision = Some(swav_train::config::Precision::Fp32);
    let mut cpu = state(SwavModel::new(cfg.model.clone(), 3).unwrap(), &cfg);
    let mut dev = state(SwavModel::new(cfg.model.clone(), 3).unwrap(), &cfg);
    dev.model.to_device(device).unwrap();
    let rows = cpu.queue.as_ref().unwrap().rows.iter().map(|r| r.to_device(device).unwrap()).collect();
    dev.queue = Some(Queue::from_rows(rows));
    let a = step(&mut cpu, &cfg, 5);
    let groups = crops(&cfg, 5).into_iter().map(|g| g.to_device(device).unwrap()).collect();
    let b = swav_step(&mut dev, &cfg.train, groups, BATCH, 10, 0.0).unwrap();
    assert!(((a.loss - b.loss) / a.loss).abs() < 1e-5, "device loss {} vs CPU {}", b.loss, a.loss);
    let (ga, gb) = (values(&mut cpu.model, true), values(&mut dev.model, true));
    let scale = ga.values().map(|g| norm(g)).fold(0.0, f64::max);
    for (name, want) in &ga {
        if !is_zero(want, scale) {
            let e = rel(&gb[name], want);
            assert!(e < 1e-3, "{name}: device gradient off the CPU's by {e:.2e}");
        }
    }
}

/// The caching allocator's promise: a step allocates the same sizes in the same order every time, so
/// after the first steps (which fill the cache and create the momentum buffers) a step asks the device
/// for no memory at all, and memory in use returns to the same level after each step. In bf16 with
/// the queue in use, as a CUDA run trains by default.
#[test]
fn training_steps_on_a_cuda_device_reach_a_steady_state_of_memory() {
    let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
    if swav_cuda_emu::Emulator::new_or_skip(&[probe]).is_none() {
        return;
    }
    let device = Device::Cuda(97);
    let rt = swav_tensor::cuda::runtime::register(97, Box::new(swav_tensor::cuda::emulated::EmulatedBackend::new()))
        .expect("registered once");
    let cfg = config("[5, 7]");
    let mut dev = state(SwavModel::new(cfg.model.clone(), 3).unwrap(), &cfg);
    dev.model.to_device(device).unwrap();
    dev.model.set_linear_compute(swav_tensor::DType::Bf16);
    let rows = dev.queue.as_ref().unwrap().rows.iter().map(|r| r.to_device(device).unwrap()).collect();
    dev.queue = Some(Queue::from_rows(rows));
    let mut after = Vec::new();
    for i in 0..5 {
        let groups = crops(&cfg, 5 + i)
            .into_iter()
            .map(|g| g.to_device(device).unwrap().to_dtype(swav_tensor::DType::Bf16).unwrap())
            .collect();
        let stats = swav_step(&mut dev, &cfg.train, groups, BATCH, 10 + i as usize, 0.1).unwrap();
        assert!(stats.loss.is_finite());
        after.push(rt.stats());
    }
    let (warm, last) = (after[2], after[4]);
    assert!(warm.hits > 0, "{warm:?}");
    assert_eq!(last.misses, warm.misses, "steps after the warm-up allocated device memory: {after:#?}");
    assert_eq!(last.reserved, warm.reserved, "{after:#?}");
    assert_eq!(last.in_use, warm.in_use, "memory in use grows from step to step: {after:#?}");
    // The step's memory is its own pool; the weights stay in the persistent one.
    assert!(last.step_reserved > 0 && last.step_reserved < last.reserved, "{last:?}");
    assert_eq!(last.step_reserved, warm.step_reserved, "{after:#?}");
    let mut pools = Vec::new();
    dev.model.visit("", &mut |_, slot| {
        if let swav_model::param::Slot::Param(p) = slot {
            pools.push(p.value.device_pool());
        }
    });
    assert!(pools.iter().all(|&p| p == Some(swav_tensor::cuda::runtime::Pool::Persistent)), "{pools:?}");
}
