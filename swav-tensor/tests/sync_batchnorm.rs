//! Synchronised batch norm on a CUDA device against the CPU op: two ranks (threads) each normalise
//! their own rows with the statistics of both, forward and backward, with the residual and the ReLU
//! fused. fp32 activations (relative error < 1e-4) and bf16 ones (< 1e-2 against the CPU op on the
//! bf16-rounded inputs). The emulated device runs everywhere; device 0 too where there is one.
//!
//! The CPU op itself is checked against one rank with the whole batch, so that both halves are tied
//! to the plain batch norm.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bf16_rounded, emulated_device, real_device, rel_err, Rng};
use swav_tensor::collective::ThreadGroup;
use swav_tensor::ops::batchnorm::{
    batchnorm_backward, batchnorm_train_forward, sync_batchnorm_backward, sync_batchnorm_train_forward, BnParams, Fused,
};
use swav_tensor::{Collective, DType, Device, Tensor};

const C: usize = 37;
const SHAPE: [usize; 4] = [3, 4, 5, C];
const MOMENTUM: f32 = 0.1;

/// One rank's inputs: its rows (mean far from zero, as after a ReLU stack), residual and gradient,
/// and the shared parameters, running statistics and accumulated parameter gradients.
struct Inputs {
    x: Vec<f32>,
    residual: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running: (Vec<f32>, Vec<f32>),
    dparams: (Vec<f32>, Vec<f32>),
}

fn inputs(rank: usize) -> Inputs {
    let n: usize = SHAPE.iter().product();
    let mut shared = Rng(100);
    let mut own = Rng(7 + rank as u64);
    Inputs {
        x: own.vec(n, 3.0, 2.0),
        residual: own.vec(n, 0.0, 1.0),
        dy: own.vec(n, 0.0, 1.0),
        gamma: shared.vec(C, 1.0, 0.5),
        beta: shared.vec(C, 0.0, 0.5),
        running: (shared.vec(C, 0.0, 1.0), shared.vec(C, 2.0, 1.0)),
        dparams: (shared.vec(C, 0.0, 0.1), shared.vec(C, 0.0, 0.1)),
    }
}

/// Every output of one rank's forward and backward, on the host.
#[derive(Debug)]
struct Outputs {
    y: Vec<f32>,
    running: (Vec<f32>, Vec<f32>),
    dx: Vec<f32>,
    dresidual: Vec<f32>,
    dparams: (Vec<f32>, Vec<f32>),
}

fn t(shape: &[usize], v: &[f32], dev: Device, dtype: DType) -> Tensor {
    Tensor::from_slice(shape, v).unwrap().to_device(dev).unwrap().to_dtype(dtype).unwrap()
}

/// Forward and backward of one rank on `dev` (`group` None: the plain op).
fn run(inp: &Inputs, shape: &[usize], dev: Device, dtype: DType, group: Option<&dyn Collective>) -> Outputs {
    let f32s = |v: &[f32]| t(&[v.len()], v, dev, DType::F32);
    let (x, res, dy) =
        (t(shape, &inp.x, dev, dtype), t(shape, &inp.residual, dev, dtype), t(shape, &inp.dy, dev, dtype));
    let (gamma, beta) = (f32s(&inp.gamma), f32s(&inp.beta));
    let (mut rm, mut rv) = (f32s(&inp.running.0), f32s(&inp.running.1));
    let (mut dgamma, mut dbeta) = (f32s(&inp.dparams.0), f32s(&inp.dparams.1));
    let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
    let fused = Fused { residual: true, relu: true };
    let (y, cache) = match group {
        Some(g) => sync_batchnorm_train_forward(&x, &p, &mut rm, &mut rv, MOMENTUM, Some(&res), true, g),
        None => batchnorm_train_forward(&x, &p, &mut rm, &mut rv, MOMENTUM, Some(&res), true),
    }
    .unwrap();
    let (dx, dres) = match group {
        Some(g) => sync_batchnorm_backward(&x, &y, &dy, &p, &cache, fused, &mut dgamma, &mut dbeta, g),
        None => batchnorm_backward(&x, &y, &dy, &p, &cache, fused, &mut dgamma, &mut dbeta),
    }
    .unwrap();
    Outputs {
        y: y.to_vec(),
        running: (rm.to_vec(), rv.to_vec()),
        dx: dx.to_vec(),
        dresidual: dres.unwrap().to_vec(),
        dparams: (dgamma.to_vec(), dbeta.to_vec()),
    }
}

/// Both ranks' outputs, each rank a thread of one group, on `dev`.
fn two_ranks(inputs: &[Inputs; 2], dev: Device, dtype: DType) -> Vec<Outputs> {
    let ranks = ThreadGroup::new(2, Duration::from_secs(60));
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let inp = &inputs[rank.rank()];
                s.spawn(move || {
                    let group: Arc<dyn Collective> = rank;
                    run(inp, &SHAPE, dev, dtype, Some(group.as_ref()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.2e} (tolerance {tol:.0e})");
}

fn compare(what: &str, got: &Outputs, want: &Outputs, tol: f64) {
    close(&format!("{what}: y"), &got.y, &want.y, tol);
    close(&format!("{what}: running mean"), &got.running.0, &want.running.0, tol);
    close(&format!("{what}: running var"), &got.running.1, &want.running.1, tol);
    close(&format!("{what}: dx"), &got.dx, &want.dx, tol);
    close(&format!("{what}: dresidual"), &got.dresidual, &want.dresidual, tol);
    close(&format!("{what}: dgamma"), &got.dparams.0, &want.dparams.0, tol);
    close(&format!("{what}: dbeta"), &got.dparams.1, &want.dparams.1, tol);
}

#[test]
fn the_cpu_op_over_two_ranks_is_the_plain_op_over_their_whole_batch() {
    let ins = [inputs(0), inputs(1)];
    let ranks = two_ranks(&ins, Device::Cpu, DType::F32);
    // One rank with both batches, rows of rank 0 first.
    let mut whole = inputs(0);
    for (a, b) in [(&mut whole.x, &ins[1].x), (&mut whole.residual, &ins[1].residual), (&mut whole.dy, &ins[1].dy)] {
        a.extend_from_slice(b);
    }
    let mut shape = SHAPE;
    shape[0] *= 2;
    let one = run(&whole, &shape, Device::Cpu, DType::F32, None);
    let half = one.y.len() / 2;
    for (r, out) in ranks.iter().enumerate() {
        let rows = r * half..(r + 1) * half;
        close(&format!("rank {r}: y"), &out.y, &one.y[rows.clone()], 1e-5);
        close(&format!("rank {r}: dx"), &out.dx, &one.dx[rows.clone()], 1e-4);
        close(&format!("rank {r}: running mean"), &out.running.0, &one.running.0, 1e-5);
        close(&format!("rank {r}: running var"), &out.running.1, &one.running.1, 1e-5);
    }
    // Each rank holds 1/2 of the group's parameter gradients: their mean over the ranks (what the
    // gradient averaging gives) plus the starting values is the whole batch's.
    for (i, name) in ["dgamma", "dbeta"].iter().enumerate() {
        let start = if i == 0 { &whole.dparams.0 } else { &whole.dparams.1 };
        let pick = |o: &Outputs| if i == 0 { o.dparams.0.clone() } else { o.dparams.1.clone() };
        let (a, b, want) = (pick(&ranks[0]), pick(&ranks[1]), pick(&one));
        let summed: Vec<f32> = (0..C).map(|c| a[c] + b[c] - start[c]).collect();
        close(name, &summed, &want, 1e-4);
    }
}

#[test]
fn sync_batchnorm_on_a_cuda_device_matches_the_cpu() {
    let ins = [inputs(0), inputs(1)];
    for dev in emulated_device().into_iter().chain(real_device()) {
        let want = two_ranks(&ins, Device::Cpu, DType::F32);
        let got = two_ranks(&ins, dev, DType::F32);
        for r in 0..2 {
            compare(&format!("f32 on {dev}, rank {r}"), &got[r], &want[r], 1e-4);
        }
        // bf16 activations: against the CPU op on the rounded activations.
        let rounded = ins.each_ref().map(|i| Inputs {
            x: bf16_rounded(&i.x),
            residual: bf16_rounded(&i.residual),
            dy: bf16_rounded(&i.dy),
            gamma: i.gamma.clone(),
            beta: i.beta.clone(),
            running: i.running.clone(),
            dparams: i.dparams.clone(),
        });
        let want = two_ranks(&rounded, Device::Cpu, DType::F32);
        let got = two_ranks(&ins, dev, DType::Bf16);
        for r in 0..2 {
            compare(&format!("bf16 on {dev}, rank {r}"), &got[r], &want[r], 1e-2);
        }
    }
}
