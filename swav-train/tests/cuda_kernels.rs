//! The training crate's CUDA kernels (loss, LARS, prototypes), run on the CPU emulator, against the CPU
//! code on random inputs of awkward shapes; every plan runs under both schedules and must give the same
//! bits. The loss gradient is also checked against finite differences of the emulated loss. Without a
//! C++ compiler every test prints SKIPPED and passes.

mod fixtures;

use std::sync::OnceLock;

use swav_model::head::Prototypes;
use swav_model::layers::Linear;
use swav_model::param::{Layout, Param, Slot, Visit, Visitor};
use swav_tensor::cuda::emulate::{
    self, check_signatures, kernel_names, run_both_schedules, Buffer, Emulator, Memory, Schedule,
};
use swav_tensor::cuda::plan::BufId;
use swav_tensor::Tensor;
use swav_train::lars::Lars;
use swav_train::lars_cuda::{self, LarsSettings, LarsTensor};
use swav_train::loss::swapped_prediction_loss;
use swav_train::{cuda_sources, loss_cuda, prototypes_cuda as proto};

use fixtures::rel_err;

fn emu() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    EMU.get_or_init(|| emulate::emulator(&cuda_sources())).as_ref()
}

fn run(emu: &Emulator, plan: &swav_tensor::cuda::plan::Plan, inputs: &[(BufId, Buffer)]) -> Memory {
    run_both_schedules(emu, plan, inputs).unwrap_or_else(|e| panic!("{e}"))
}

/// SplitMix64, uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, offset: f32, scale: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

/// Rows of positive values summing to one, like Sinkhorn's codes.
fn codes(rows: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = Rng(seed).vec(rows * k, 1.0, 0.99);
    for row in v.chunks_mut(k) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
    v
}

// ---------- loss ----------

/// Runs the emulated loss: (loss, dscores, skip).
fn emulated_loss(
    emu: &Emulator,
    shape: (usize, usize, usize),
    assign: &[usize],
    t: f32,
    scores: &[f32],
    q: &[f32],
) -> (f32, Vec<f32>, u32) {
    let (crops, batch, k) = shape;
    let plan = loss_cuda::plan(crops, batch, k, assign, t).unwrap();
    let m = run(emu, &plan, &[(loss_cuda::SCORES, Buffer::from_f32(scores)), (loss_cuda::CODES, Buffer::from_f32(q))]);
    (m.get(loss_cuda::LOSS).as_f32()[0], m.f32(loss_cuda::DSCORES), m.get(loss_cuda::SKIP).as_u32()[0])
}

#[test]
fn loss_and_gradient_match_the_cpu() {
    let Some(emu) = emu() else { return };
    let cases: [(usize, usize, usize, &[usize], f32); 5] = [
        (2, 1, 1, &[0], 0.1),
        (3, 4, 5, &[0, 1], 0.1),
        (8, 3, 300, &[0, 1], 0.1),
        (2, 2, 3000, &[1], 0.05),
        (4, 5, 37, &[2, 0, 3], 0.2),
    ];
    for (i, (crops, batch, k, assign, t)) in cases.into_iter().enumerate() {
        let scores = Rng(i as u64).vec(crops * batch * k, 0.0, 1.0);
        let per_crop: Vec<Vec<f32>> = (0..assign.len()).map(|a| codes(batch, k, 100 * i as u64 + a as u64)).collect();
        let cpu = swapped_prediction_loss(&scores, k, batch, crops, assign, &per_crop, t).unwrap();
        let (loss, dscores, skip) = emulated_loss(emu, (crops, batch, k), assign, t, &scores, &per_crop.concat());
        let what = format!("{crops} crops x {batch} x {k}, assign {assign:?}");
        assert!(
            ((loss as f64 - cpu.loss) / cpu.loss.abs().max(1e-30)).abs() < 1e-5,
            "{what}: loss {loss} vs {}",
            cpu.loss
        );
        let e = rel_err(&dscores, &cpu.dscores);
        assert!(
            e < 1e-5 || cpu.dscores.iter().all(|&d| d == 0.0) && e < 1e-6,
            "{what}: dscores relative error {e:.3e}"
        );
        assert_eq!(skip, 0, "{what}: finite loss, no skip");
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let Some(emu) = emu() else { return };
    let (crops, batch, k, assign) = (3, 2, 4, [0usize, 1]);
    let mut scores = Rng(9).vec(crops * batch * k, 0.0, 1.0);
    let q = [codes(batch, k, 1), codes(batch, k, 2)].concat();
    let (_, grad, _) = emulated_loss(emu, (crops, batch, k), &assign, 0.1, &scores, &q);
    for i in [0, 5, 9, 14, 23] {
        let (s0, h) = (scores[i], 1e-2f32);
        scores[i] = s0 + h;
        let lp = emulated_loss(emu, (crops, batch, k), &assign, 0.1, &scores, &q).0 as f64;
        scores[i] = s0 - h;
        let lm = emulated_loss(emu, (crops, batch, k), &assign, 0.1, &scores, &q).0 as f64;
        scores[i] = s0;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!((fd - grad[i] as f64).abs() < 1e-3, "score {i}: fd {fd} vs {}", grad[i]);
    }
}

#[test]
fn a_non_finite_loss_raises_the_skip_flag() {
    let Some(emu) = emu() else { return };
    // In a row of the loss (crop 1), and in crop 0, whose scores only feed its codes.
    for (bad, at) in [(f32::NAN, 33), (f32::INFINITY, 40), (f32::NAN, 13), (f32::NEG_INFINITY, 0)] {
        let mut scores = Rng(3).vec(2 * 3 * 10, 0.0, 1.0);
        scores[at] = bad;
        let (loss, _, skip) = emulated_loss(emu, (2, 3, 10), &[0], 0.1, &scores, &codes(3, 10, 4));
        assert!(!loss.is_finite(), "{bad}: loss {loss}");
        assert_eq!(skip, 1, "{bad}: skip flag");
    }
}

// ---------- LARS ----------

struct Many(Vec<Param>);
impl Visit for Many {
    fn visit(&mut self, prefix: &str, f: &mut Visitor<'_>) {
        for (i, p) in self.0.iter_mut().enumerate() {
            f(&format!("{prefix}p{i}"), Slot::Param(p));
        }
    }
}

/// The emulated optimizer state: per tensor (weights, gradient, momentum).
struct DeviceParams(Vec<[Buffer; 3]>);

impl DeviceParams {
    fn new(values: &[Vec<f32>], grads: &[Vec<f32>]) -> DeviceParams {
        DeviceParams(
            values
                .iter()
                .zip(grads)
                .map(|(w, g)| [Buffer::from_f32(w), Buffer::from_f32(g), Buffer::from_f32(&vec![0.0; w.len()])])
                .collect(),
        )
    }
    fn table(&self) -> Buffer {
        let rows: Vec<u64> = self
            .0
            .iter()
            .flat_map(|[w, g, m]| {
                lars_cuda::table_row(w.device_address(), g.device_address(), m.device_address(), w.len())
            })
            .collect();
        Buffer::from_u64(&rows)
    }
    fn step(&self, emu: &Emulator, plan: &swav_tensor::cuda::plan::Plan, skip: u32, schedule: Schedule) {
        let mut mem =
            Memory::new(plan, vec![(lars_cuda::TABLE, self.table()), (lars_cuda::SKIP, Buffer::from_u32(&[skip]))])
                .unwrap();
        emulate::run(emu, plan, &mut mem, schedule).unwrap();
    }
}

#[test]
fn lars_matches_the_cpu_optimizer_over_two_steps() {
    let Some(emu) = emu() else { return };
    // Lengths around the chunk size; tensor 0 has a zero gradient (LARC leaves it undecayed), tensor 3 is frozen.
    let lens = [7usize, 5000, 4097, 3, 10_000, 1];
    for lars in [true, false] {
        let values: Vec<Vec<f32>> = lens.iter().enumerate().map(|(i, &n)| Rng(i as u64).vec(n, 0.0, 1.0)).collect();
        let grads: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| if i == 0 { vec![0.0; n] } else { Rng(50 + i as u64).vec(n, 0.0, 0.1) })
            .collect();
        let settings = LarsSettings { momentum: 0.9, weight_decay: 1e-2, trust_coefficient: 0.001, lars };
        let tensors: Vec<LarsTensor> =
            lens.iter().enumerate().map(|(i, &len)| LarsTensor { len, frozen: i == 3 }).collect();
        let plan = lars_cuda::plan(&tensors, &settings, 0.5).unwrap();
        let mut model = Many(
            values
                .iter()
                .zip(&grads)
                .map(|(w, g)| {
                    let mut p = Param::new(Tensor::from_slice(&[w.len()], w).unwrap(), Layout::Plain);
                    p.grad = Tensor::from_slice(&[g.len()], g).unwrap();
                    p
                })
                .collect(),
        );
        let mut cpu = Lars::new(0.9, 1e-2, 0.001, lars);
        let runs = [Schedule::Forward, Schedule::Reverse].map(|schedule| {
            let dev = DeviceParams::new(&values, &grads);
            dev.step(emu, &plan, 0, schedule);
            dev.step(emu, &plan, 0, schedule);
            dev
        });
        for _ in 0..2 {
            cpu.step(&mut model, 0.5, |name| name == "p3");
        }
        for (i, p) in model.0.iter().enumerate() {
            let [w, _, m] = &runs[0].0[i];
            let e = rel_err(w.as_f32(), p.value.as_slice());
            assert!(e < 1e-6, "lars {lars}, tensor {i}: weights relative error {e:.3e}");
            if let Some(buf) = cpu.buffers.get(&format!("p{i}")) {
                let e = rel_err(m.as_f32(), buf.as_slice());
                assert!(e < 1e-5, "lars {lars}, tensor {i}: momentum relative error {e:.3e}");
            }
            assert_eq!(w.bytes(), runs[1].0[i][0].bytes(), "tensor {i}: schedules differ");
        }
        assert_eq!(runs[0].0[3][0].as_f32(), &values[3][..], "frozen tensor untouched");
        assert!(runs[0].0[3][2].as_f32().iter().all(|&m| m == 0.0), "frozen tensor has no momentum");
        // A raised skip flag: nothing moves.
        let dev = DeviceParams::new(&values, &grads);
        dev.step(emu, &plan, 1, Schedule::Forward);
        for (i, [w, _, m]) in dev.0.iter().enumerate() {
            assert_eq!(w.as_f32(), &values[i][..], "skip: tensor {i} changed");
            assert!(m.as_f32().iter().all(|&v| v == 0.0));
        }
    }
}

// ---------- prototypes ----------

#[test]
fn prototype_normalisation_matches_the_model() {
    let Some(emu) = emu() else { return };
    for (i, &(k, d)) in [(1, 1), (300, 128), (7, 1000), (5, 3)].iter().enumerate() {
        let mut w = Rng(30 + i as u64).vec(k * d, 0.0, 2.0);
        if k > 1 {
            w[d..2 * d].fill(0.0); // a zero row stays zero
        }
        let mut protos = Prototypes {
            heads: vec![Linear {
                weight: Param::new(Tensor::from_slice(&[k, d], &w).unwrap(), Layout::Plain),
                bias: None,
                compute: swav_tensor::DType::F32,
            }],
        };
        protos.normalize().unwrap();
        let m = run(emu, &proto::normalize(k, d).unwrap(), &[(proto::PROTOTYPES, Buffer::from_f32(&w))]);
        let e = rel_err(&m.f32(proto::PROTOTYPES), protos.heads[0].weight.value.as_slice());
        assert!(e < 1e-6, "{k} x {d}: relative error {e:.3e}");
    }
}

/// The cluster statistics of step.rs, restated in f64: argmax (first maximum) per row, prototypes used,
/// entropy of the mean code.
fn reference_cluster_stats(codes: &[f32], k: usize) -> (Vec<u32>, f64) {
    let mut hist = vec![0u32; k];
    let mut mean = vec![0.0f64; k];
    for row in codes.chunks_exact(k) {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            mean[i] += v as f64;
            if v > row[best] {
                best = i;
            }
        }
        hist[best] += 1;
    }
    let total: f64 = mean.iter().sum();
    let entropy = mean.iter().map(|&m| m / total).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum();
    (hist, entropy)
}

#[test]
fn cluster_statistics_match_the_step_metrics() {
    let Some(emu) = emu() else { return };
    for (i, &(batch, k)) in [(1, 1), (37, 300), (256, 3000), (9, 2)].iter().enumerate() {
        let mut q = codes(batch, k, 70 + i as u64);
        // Ties: the first maximum wins.
        if k > 5 {
            q[3] = 2.0;
            q[k - 1] = 2.0;
        }
        let (hist, entropy) = reference_cluster_stats(&q, k);
        let m = run(emu, &proto::cluster_stats(batch, k).unwrap(), &[(proto::CODES, Buffer::from_f32(&q))]);
        assert_eq!(m.get(proto::HIST).as_u32(), &hist[..], "{batch} x {k}: histogram");
        let stats = m.f32(proto::STATS);
        assert_eq!(stats[1] as usize, hist.iter().filter(|&&h| h > 0).count(), "{batch} x {k}: prototypes used");
        assert!(
            (stats[0] as f64 - entropy).abs() <= 1e-5 * entropy.max(1e-3),
            "{batch} x {k}: entropy {} vs {entropy}",
            stats[0]
        );
    }
}

// ---------- plans against the sources ----------

#[test]
fn every_launch_fits_its_kernel_signature_and_every_kernel_is_planned() {
    let mut used = std::collections::HashSet::new();
    let settings = LarsSettings { momentum: 0.9, weight_decay: 1e-6, trust_coefficient: 0.001, lars: true };
    let plans = [
        loss_cuda::plan(8, 256, 3000, &[0, 1], 0.1).unwrap(),
        lars_cuda::plan(
            &[LarsTensor { len: 9408, frozen: false }, LarsTensor { len: 384_000, frozen: true }],
            &settings,
            4.8,
        )
        .unwrap(),
        proto::normalize(3000, 128).unwrap(),
        proto::cluster_stats(4096, 3000).unwrap(),
    ];
    for plan in &plans {
        used.extend(check_signatures(plan, &cuda_sources()).unwrap_or_else(|e| panic!("{e}")));
    }
    for name in kernel_names(&cuda_sources()).unwrap() {
        assert!(used.contains(name.as_str()), "kernel {name} is in no plan");
    }
    // Everything frozen: a plan without launches.
    assert!(lars_cuda::plan(&[LarsTensor { len: 5, frozen: true }], &settings, 1.0).unwrap().launches.is_empty());
}
