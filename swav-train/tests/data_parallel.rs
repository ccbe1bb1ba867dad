//! Data-parallel steps with ranks that are threads ([`ThreadGroup`]): 2 ranks of batch b, with
//! synchronised batch norms and a per-rank queue, give the same weights as 1 rank of batch 2b
//! (relative error < 1e-5 per tensor: the order of the sums is the only difference). Without SyncBN,
//! the weights stay identical on every rank.
//!
//! One step is compared, not three: on this small synthetic network the training itself is
//! ill-conditioned after the first update (in a single process, scaling one weight of `conv1` by
//! 1 + 1e-7 moves the weights after 3 steps by about 1e-2), so any change of summation order grows past
//! 1e-5 by the third step. The comparison uses plain SGD (see `config`).

mod fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use swav_model::param::{Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::collective::ThreadGroup;
use swav_tensor::{Collective, Device, Tensor};
use swav_train::config::{self, Config};
use swav_train::lars::Lars;
use swav_train::queue::Queue;
use swav_train::step::{swav_step, SwavState};

const B: usize = 4;
const STEPS: u64 = 1;
const LR: f64 = 0.05;

/// Batch norms over few values amplify rounding differences step after step (the statistics of a
/// handful of rows are ill-conditioned): the crops are large enough that every batch norm sees at least
/// 2B x 4 x 4 values, which keeps 3 steps well-conditioned.
const TOML: &str = r#"
[model]
arch = "resnet18"
width = 8
small_stem = true
in_channels = 1
hidden_mlp = 32
feat_dim = 16
prototypes = [12]

[[crops.groups]]
count = 2
size = 32
min_scale = 0.3
max_scale = 1.0

[[crops.groups]]
count = 1
size = 32
min_scale = 0.2
max_scale = 0.5

[train]
epochs = 1
batch_size = 4
base_lr = 0.3
final_lr = 0.003
warmup_epochs = 0
crops_for_assign = [0, 1]
freeze_prototypes_niters = 0
seed = 7
workers = 1
"#;

fn config(sync_bn: bool) -> Config {
    let overrides = [
        format!("model.sync_bn={sync_bn}"),
        format!("train.queue_length={}", 2 * B),
        // Plain SGD: LARS divides by the gradient's norm, and the gradient of the bias before a batch
        // norm is pure rounding noise, which LARS would turn into a full-size step in a random direction.
        "train.lars=false".into(),
    ];
    config::load(TOML, &overrides).unwrap()
}

/// Image `i`'s crops for step `s` (one `[size, size, 1]` block per crop): smooth random waves, as
/// natural images are (white noise would make many activations sit next to a ReLU's kink).
fn image_crops(cfg: &Config, s: u64, i: usize) -> Vec<Vec<f32>> {
    let mut x = (s * 1000 + i as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut out = Vec::new();
    for g in &cfg.crops.groups {
        for _ in 0..g.count {
            let (a, b, c, d) = (next() * 0.4, next() * 0.4, next() * 3.0, next());
            let n = g.size;
            out.push((0..n * n).map(|p| ((p / n) as f32 * a + (p % n) as f32 * b + c).sin() + d).collect());
        }
    }
    out
}

/// The groups of a batch of `images` (crop-major within each group, as the loader makes them).
fn groups(cfg: &Config, s: u64, images: &[usize]) -> Vec<Tensor> {
    let per_image: Vec<Vec<Vec<f32>>> = images.iter().map(|&i| image_crops(cfg, s, i)).collect();
    let mut crop = 0;
    let mut out = Vec::new();
    for g in &cfg.crops.groups {
        let mut data = Vec::new();
        for c in crop..crop + g.count {
            for img in &per_image {
                data.extend_from_slice(&img[c]);
            }
        }
        crop += g.count;
        out.push(Tensor::from_vec(&[g.count * images.len(), g.size, g.size, 1], data).unwrap());
    }
    out
}

fn state(cfg: &Config, queue_rows: usize, collective: Arc<dyn Collective>, sync: bool) -> SwavState {
    let t = &cfg.train;
    let mut model = SwavModel::new(cfg.model.clone(), 5).unwrap();
    if sync && collective.world_size() > 1 {
        model.set_sync_batchnorm(Some(collective.clone()));
    }
    let mut s = SwavState::new(model, Lars::new(t.momentum, t.weight_decay, t.trust_coefficient, t.lars));
    s.queue = Some(Queue::new(t.crops_for_assign.len(), queue_rows, cfg.model.feat_dim, swav_tensor::Device::Cpu));
    s.broadcast_buffers = !sync;
    s.collective = collective;
    s
}

fn weights(model: &mut SwavModel) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    model.visit("", &mut |name, slot| match slot {
        Slot::Param(p) => drop(out.insert(name.to_string(), p.value.to_vec())),
        Slot::Buffer(b) => drop(out.insert(name.to_string(), b.to_vec())),
        Slot::Counter(_) => {}
    });
    out
}

fn diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt()
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// Rank `r`'s images of step `s`: the even or odd half of the single rank's `2B` (as the loader's
/// interleaved split of each epoch's order).
fn rank_images(s: u64, r: usize, world: usize) -> Vec<usize> {
    (0..B).map(|j| s as usize * world * B + j * world + r).collect()
}

fn run_two_ranks(sync: bool) -> Vec<BTreeMap<String, Vec<f32>>> {
    run_two_ranks_on(sync, Device::Cpu)
}

/// Two thread ranks training on `device` (both on the same one: a test has one emulated device).
fn run_two_ranks_on(sync: bool, device: Device) -> Vec<BTreeMap<String, Vec<f32>>> {
    run_two_ranks_over(sync, device, |rank| rank)
}

/// [`run_two_ranks_on`] with each rank's collective made by `transport` from its thread rank.
fn run_two_ranks_over(
    sync: bool,
    device: Device,
    transport: fn(Arc<dyn Collective>) -> Arc<dyn Collective>,
) -> Vec<BTreeMap<String, Vec<f32>>> {
    let cfg = config(sync);
    let ranks = ThreadGroup::new(2, Duration::from_secs(120));
    std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let cfg = &cfg;
                let rank = transport(rank);
                scope.spawn(move || {
                    let r = rank.rank();
                    let mut st = state(cfg, B, rank, sync);
                    st.model.to_device(device).unwrap();
                    let q = st.queue.as_mut().unwrap();
                    q.rows = q.rows.iter().map(|rows| rows.to_device(device).unwrap()).collect();
                    for s in 0..STEPS {
                        let g = groups(cfg, s, &rank_images(s, r, 2));
                        let g = g.iter().map(|t| t.to_device(device).unwrap()).collect();
                        swav_step(&mut st, &cfg.train, g, B, s as usize, LR).unwrap();
                    }
                    weights(&mut st.model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_ranks_with_sync_bn_match_one_rank_with_the_double_batch() {
    let cfg = config(true);
    let mut single = state(&cfg, 2 * B, Arc::new(swav_tensor::collective::SingleProcess), true);
    for s in 0..STEPS {
        let mut images = rank_images(s, 0, 2);
        images.extend(rank_images(s, 1, 2));
        swav_step(&mut single, &cfg.train, groups(&cfg, s, &images), 2 * B, s as usize, LR).unwrap();
    }
    let want = weights(&mut single.model);
    let got = run_two_ranks(true);
    let mut worst = (0.0f64, String::new());
    for (name, w) in &want {
        // A batch norm's shift starts at 0 and is the sum of gradients that nearly cancel: it is
        // measured against its layer's scale (gamma), the unit it acts in, and a running mean against
        // the running standard deviation; every other tensor against itself.
        let std_of =
            |layer: &str| -> Vec<f32> { want[&format!("{layer}.running_var")].iter().map(|v| v.sqrt()).collect() };
        let scale = match (name.strip_suffix(".bias"), name.strip_suffix(".running_mean")) {
            (Some(layer), _) if want.contains_key(&format!("{layer}.running_mean")) => {
                want[&format!("{layer}.weight")].clone()
            }
            (_, Some(layer)) => std_of(layer),
            _ => w.clone(),
        };
        for (r, ranks) in got.iter().enumerate() {
            let e = diff(&ranks[name], w) / norm(&scale).max(1e-30);
            if e > worst.0 {
                worst = (e, format!("{name} on rank {r}"));
            }
        }
    }
    eprintln!("worst relative error over {} tensors: {:e} ({})", want.len(), worst.0, worst.1);
    assert!(worst.0 < 1e-5, "{}: relative error {:e}", worst.1, worst.0);
}

#[test]
fn without_sync_bn_every_rank_keeps_the_same_weights_and_buffers() {
    let got = run_two_ranks(false);
    // Parameters only: each rank's forward updates its own running statistics, which are made equal
    // again by the broadcast from rank 0 before the next forward (DDP's semantics).
    let params = got[0].keys().filter(|k| !k.contains("running_"));
    let diverged: Vec<&String> = params.filter(|k| got[0][*k] != got[1][*k]).collect();
    assert!(diverged.is_empty(), "ranks diverged on {diverged:?}");
    // And they differ from what SyncBN gives (the statistics are per rank): the flag does something.
    let synced = run_two_ranks(true);
    assert_ne!(got[0], synced[0]);
}

/// The same two ranks on a CUDA device (the emulated one; both ranks share it), with and without
/// SyncBN, follow the two ranks on the CPU: device codes with Sinkhorn's sums all-reduced, the global loss, device gradients averaged
/// through host memory, rank 0's buffers broadcast into device memory. fp32 against the CPU engine,
/// relative error < 1e-4 per tensor (the device op parity bound), and the ranks agree exactly.
#[test]
fn two_ranks_on_a_cuda_device_follow_two_ranks_on_the_cpu() {
    let Some(device) = fixtures::emulated_device() else { return };
    for sync in [false, true] {
        let want = run_two_ranks(sync);
        let got = run_two_ranks_on(sync, device);
        let params = |m: &BTreeMap<String, Vec<f32>>| -> Vec<String> {
            m.keys().filter(|k| !k.contains("running_")).cloned().collect()
        };
        for name in params(&got[0]) {
            assert_eq!(got[0][&name], got[1][&name], "sync_bn {sync}, {name}: the ranks on the device diverged");
        }
        let mut worst = (0.0f64, String::new());
        for (name, w) in &want[0] {
            let e = diff(&got[0][name], w) / norm(w).max(1e-30);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        eprintln!(
            "sync_bn {sync}: worst relative error against the CPU over {} tensors: {:e} ({})",
            want[0].len(),
            worst.0,
            worst.1
        );
        assert!(worst.0 < 1e-4, "sync_bn {sync}, {}: relative error {:e}", worst.1, worst.0);
    }
}

/// Drives the ranks the way NCCL is driven (the gradients reduced in device memory, all at once after
/// the backward, the mean taken on the device); the reduction itself goes through the host rank here,
/// as no GPU is needed to check which path the trainer takes and what it does with the result.
#[derive(Debug)]
struct DeviceTransport(Arc<dyn Collective>, Arc<std::sync::atomic::AtomicUsize>);

static DEVICE_REDUCTIONS: std::sync::LazyLock<Arc<std::sync::atomic::AtomicUsize>> =
    std::sync::LazyLock::new(Default::default);

impl Collective for DeviceTransport {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, v: &mut [f32]) -> Result<(), swav_tensor::CollectiveError> {
        self.0.all_reduce_sum(v)
    }
    fn all_reduce_sum_f64(&self, v: &mut [f64]) -> Result<(), swav_tensor::CollectiveError> {
        self.0.all_reduce_sum_f64(v)
    }
    fn all_reduce_max(&self, v: &mut [f32]) -> Result<(), swav_tensor::CollectiveError> {
        self.0.all_reduce_max(v)
    }
    fn broadcast(&self, v: &mut [f32], root: usize) -> Result<(), swav_tensor::CollectiveError> {
        self.0.broadcast(v, root)
    }
    fn barrier(&self) -> Result<(), swav_tensor::CollectiveError> {
        self.0.barrier()
    }
    fn abort(&self, reason: &str) {
        self.0.abort(reason)
    }
    fn subgroup(&self, g: usize) -> Result<Arc<dyn Collective>, swav_tensor::CollectiveError> {
        self.0.subgroup(g)
    }
    fn duplicate(&self) -> Result<Arc<dyn Collective>, swav_tensor::CollectiveError> {
        self.0.duplicate()
    }
    fn reduces_device_memory(&self) -> bool {
        true
    }
    fn all_reduce_sum_device(&self, tensors: &mut [&mut Tensor]) -> Result<(), swav_tensor::CollectiveError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut flat: Vec<f32> = tensors.iter().flat_map(|t| t.to_vec()).collect();
        self.0.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for t in tensors.iter_mut() {
            assert!(t.device().is_cuda(), "only device tensors reach the device transport");
            let n = t.len();
            **t = Tensor::from_slice(t.shape(), &flat[at..at + n]).unwrap().to_device(t.device()).unwrap();
            at += n;
        }
        Ok(())
    }
}

/// With a transport that reduces device memory (NCCL's path), the gradients are reduced once per
/// step after the backward, and the weights are exactly those of the host-staged buckets.
#[test]
fn gradients_reduced_in_device_memory_equal_the_host_staged_ones() {
    let Some(device) = fixtures::emulated_device() else { return };
    let want = run_two_ranks_on(false, device);
    let got = run_two_ranks_over(false, device, |rank| Arc::new(DeviceTransport(rank, DEVICE_REDUCTIONS.clone())));
    assert_eq!(
        DEVICE_REDUCTIONS.load(std::sync::atomic::Ordering::SeqCst),
        2 * STEPS as usize,
        "one device reduction per rank and step"
    );
    for (name, w) in &want[0] {
        assert_eq!(&got[0][name], w, "{name}");
    }
}

/// The gradients averaged while the backward runs (small buckets, so that most start before the
/// backward ends) equal those of a backward followed by the plain bucketed average, on every rank.
#[test]
fn overlapped_gradient_averaging_equals_averaging_after_the_backward() {
    use swav_train::distributed::{average_gradients, GradientAverager};
    let cfg = config(true);
    let grads = |model: &mut SwavModel| {
        let mut out = BTreeMap::new();
        model.visit("", &mut |name, slot| {
            if let Slot::Param(p) = slot {
                out.insert(name.to_string(), p.grad.to_vec());
            }
        });
        out
    };
    let ranks = ThreadGroup::new(2, Duration::from_secs(120));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let cfg = &cfg;
                scope.spawn(move || {
                    let world: Arc<dyn Collective> = rank;
                    let r = world.rank();
                    let mut model = SwavModel::new(cfg.model.clone(), 5).unwrap();
                    model.set_sync_batchnorm(Some(world.clone()));
                    let images = rank_images(0, r, 2);
                    let backward = |model: &mut SwavModel, averager: Option<&mut GradientAverager>| {
                        model.zero_grad();
                        let (out, acts) = model.forward_train(groups(cfg, 0, &images)).unwrap();
                        // Any score gradient will do; it differs per rank, as a real one would.
                        let ds: Vec<Tensor> = (out.scores.iter())
                            .map(|s| {
                                let v = s.to_vec().iter().map(|x| x * (1.0 + r as f32)).collect();
                                Tensor::from_vec(s.shape(), v).unwrap()
                            })
                            .collect();
                        match averager {
                            Some(a) => {
                                model.backward_with(acts, &out, &ds, Some(&mut |p, part| a.ready(p, part))).unwrap();
                                a.finish(model).unwrap()
                            }
                            None => {
                                model.backward(acts, &out, &ds).unwrap();
                                average_gradients(model, world.as_ref()).unwrap();
                                0
                            }
                        }
                    };
                    backward(&mut model, None);
                    let plain = grads(&mut model);
                    let mut averager = GradientAverager::new(&world, 16 << 10).unwrap();
                    let early = backward(&mut model, Some(&mut averager));
                    (plain, grads(&mut model), early)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (plain, overlapped, early) in &results {
        assert_eq!(plain, overlapped);
        assert!(*early > 3, "only {early} buckets started before the backward ended");
    }
    assert_eq!(results[0].0, results[1].0, "the ranks hold the same averaged gradients");
}
