//! The CUDA kernels, run on the CPU emulator, against the CPU ops on random inputs of awkward shapes
//! (one row, one channel, channel counts that are not multiples of a warp, large rows), bf16 storage
//! against the CPU op on bf16-rounded inputs, every run repeated under the reverse schedule and compared
//! bit for bit (common::run), and the backward kernels against finite differences of the forward ones.
//! Without a C++ compiler every test prints SKIPPED and passes.

mod common;

use std::sync::OnceLock;

use common::{assert_close, bf16_rounded, run, Rng};
use swav_tensor::cuda::emulate::{check_signatures, kernel_names, Buffer, Emulator};
use swav_tensor::cuda::plan::{Plan, Storage};
use swav_tensor::cuda::sources;
use swav_tensor::ops::batchnorm::{
    batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward, BnParams, Fused,
};
use swav_tensor::ops::batchnorm_cuda::{self as bn, buf, BnShape};
use swav_tensor::ops::normalize::{l2_normalize_backward, l2_normalize_forward};
use swav_tensor::ops::pool::{global_avg_pool_backward, global_avg_pool_forward, max_pool_backward, max_pool_forward};
use swav_tensor::ops::{elementwise_cuda as ew, normalize_cuda as l2, pool_cuda as pool};
use swav_tensor::Tensor;

fn emu() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    common::emulator(&EMU, sources)
}

/// An activation buffer in `storage` holding `v` (rounded for bf16).
fn act(v: &[f32], storage: Storage) -> Buffer {
    match storage {
        Storage::F32 => Buffer::from_f32(v),
        Storage::Bf16 => Buffer::from_f32_as_bf16(v),
    }
}

/// The values the CPU op should see: `v` as `storage` stores it.
fn as_stored(v: &[f32], storage: Storage) -> Vec<f32> {
    match storage {
        Storage::F32 => v.to_vec(),
        Storage::Bf16 => bf16_rounded(v),
    }
}

fn tensor(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_slice(shape, v).unwrap()
}

fn tol(storage: Storage) -> f64 {
    match storage {
        Storage::F32 => 1e-5,
        Storage::Bf16 => 1e-2,
    }
}

const FUSIONS: [Fused; 4] = [Fused::NONE, Fused::RELU, Fused::RESIDUAL_RELU, Fused { residual: true, relu: false }];

// ---------- batch norm ----------

struct BnCase {
    rows: usize,
    c: usize,
    x: Vec<f32>,
    res: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

impl BnCase {
    fn new(rows: usize, c: usize, seed: u64) -> BnCase {
        let mut r = Rng(seed);
        // An offset larger than the spread: the variance must survive the mean.
        BnCase {
            rows,
            c,
            x: r.vec(rows * c, 3.0, 1.5),
            res: r.vec(rows * c, 0.0, 1.0),
            gamma: r.vec(c, 1.0, 0.5),
            beta: r.vec(c, 0.0, 0.5),
            rm: r.vec(c, 0.0, 0.2),
            rv: r.vec(c, 1.0, 0.3),
        }
    }
}

const BN_SHAPES: [(usize, usize); 6] = [(2, 1), (37, 3), (300, 70), (9, 2048), (5000, 5), (64, 32)];

#[test]
fn batchnorm_training_forward_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (i, &(rows, c)) in BN_SHAPES.iter().enumerate() {
        for storage in [Storage::F32, Storage::Bf16] {
            let fused = FUSIONS[i % FUSIONS.len()];
            let k = BnCase::new(rows, c, 10 + i as u64);
            let (x, res) = (as_stored(&k.x, storage), as_stored(&k.res, storage));
            let (gamma, beta) = (tensor(&[c], &k.gamma), tensor(&[c], &k.beta));
            let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
            let (mut rm, mut rv) = (tensor(&[c], &k.rm), tensor(&[c], &k.rv));
            let residual = tensor(&[rows, c], &res);
            let (y, cache) = batchnorm_train_forward(
                &tensor(&[rows, c], &x),
                &p,
                &mut rm,
                &mut rv,
                0.1,
                fused.residual.then_some(&residual),
                fused.relu,
            )
            .unwrap();
            let plan = bn::train_forward(BnShape { rows, channels: c }, storage, fused, 0.1, 1e-5).unwrap();
            let mut inputs = vec![
                (buf::X, act(&k.x, storage)),
                (buf::GAMMA, Buffer::from_f32(&k.gamma)),
                (buf::BETA, Buffer::from_f32(&k.beta)),
                (buf::RUNNING_MEAN, Buffer::from_f32(&k.rm)),
                (buf::RUNNING_VAR, Buffer::from_f32(&k.rv)),
            ];
            if fused.residual {
                inputs.push((buf::RESIDUAL, act(&k.res, storage)));
            }
            let m = run(emu, &plan, &inputs);
            let what = |b: &str| format!("{rows}x{c} {storage:?} {fused:?}: {b}");
            assert_close(&what("y"), &m.f32(buf::Y), y.as_slice(), tol(storage));
            // Statistics are fp32 whatever the storage: compare them on the same (stored) inputs tightly.
            assert_close(&what("mean"), &m.f32(buf::MEAN), cache.mean.as_slice(), 1e-5);
            assert_close(&what("rstd"), &m.f32(buf::RSTD), cache.rstd.as_slice(), 1e-5);
            assert_close(&what("running mean"), &m.f32(buf::RUNNING_MEAN), rm.as_slice(), 1e-5);
            assert_close(&what("running var"), &m.f32(buf::RUNNING_VAR), rv.as_slice(), 1e-5);
        }
    }
}

#[test]
fn batchnorm_eval_forward_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (i, &(rows, c)) in [(1, 1), (33, 7), (200, 100)].iter().enumerate() {
        for storage in [Storage::F32, Storage::Bf16] {
            let fused = FUSIONS[(i + 2) % FUSIONS.len()];
            let k = BnCase::new(rows, c, 50 + i as u64);
            let (gamma, beta) = (tensor(&[c], &k.gamma), tensor(&[c], &k.beta));
            let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
            let residual = tensor(&[rows, c], &as_stored(&k.res, storage));
            let y = batchnorm_eval_forward(
                &tensor(&[rows, c], &as_stored(&k.x, storage)),
                &p,
                &tensor(&[c], &k.rm),
                &tensor(&[c], &k.rv),
                fused.residual.then_some(&residual),
                fused.relu,
            )
            .unwrap();
            let plan = bn::eval_forward(BnShape { rows, channels: c }, storage, fused, 1e-5).unwrap();
            let mut inputs = vec![
                (buf::X, act(&k.x, storage)),
                (buf::GAMMA, Buffer::from_f32(&k.gamma)),
                (buf::BETA, Buffer::from_f32(&k.beta)),
                (buf::RUNNING_MEAN, Buffer::from_f32(&k.rm)),
                (buf::RUNNING_VAR, Buffer::from_f32(&k.rv)),
            ];
            if fused.residual {
                inputs.push((buf::RESIDUAL, act(&k.res, storage)));
            }
            let m = run(emu, &plan, &inputs);
            assert_close(&format!("{rows}x{c} {storage:?} eval y"), &m.f32(buf::Y), y.as_slice(), tol(storage));
        }
    }
}

/// Runs the emulated training forward and returns (y, mean, rstd).
fn emulated_bn_forward(emu: &Emulator, k: &BnCase, storage: Storage, fused: Fused) -> (Buffer, Buffer, Buffer) {
    let plan = bn::train_forward(BnShape { rows: k.rows, channels: k.c }, storage, fused, 0.1, 1e-5).unwrap();
    let mut inputs = vec![
        (buf::X, act(&k.x, storage)),
        (buf::GAMMA, Buffer::from_f32(&k.gamma)),
        (buf::BETA, Buffer::from_f32(&k.beta)),
        (buf::RUNNING_MEAN, Buffer::from_f32(&k.rm)),
        (buf::RUNNING_VAR, Buffer::from_f32(&k.rv)),
    ];
    if fused.residual {
        inputs.push((buf::RESIDUAL, act(&k.res, storage)));
    }
    let m = run(emu, &plan, &inputs);
    (m.get(buf::Y).clone(), m.get(buf::MEAN).clone(), m.get(buf::RSTD).clone())
}

/// The emulated backward; returns (dx, dresidual if fused, dgamma, dbeta).
fn emulated_bn_backward(
    emu: &Emulator,
    k: &BnCase,
    storage: Storage,
    fused: Fused,
    dy: &[f32],
    dgamma0: &[f32],
) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (y, mean, rstd) = emulated_bn_forward(emu, k, storage, fused);
    let plan = bn::backward(BnShape { rows: k.rows, channels: k.c }, storage, fused).unwrap();
    let m = run(
        emu,
        &plan,
        &[
            (buf::X, act(&k.x, storage)),
            (buf::Y, y),
            (buf::DY, act(dy, storage)),
            (buf::MEAN, mean),
            (buf::RSTD, rstd),
            (buf::GAMMA, Buffer::from_f32(&k.gamma)),
            (buf::DGAMMA, Buffer::from_f32(dgamma0)),
            (buf::DBETA, Buffer::from_f32(dgamma0)),
        ],
    );
    (m.f32(buf::DX), fused.residual.then(|| m.f32(buf::DRESIDUAL)), m.f32(buf::DGAMMA), m.f32(buf::DBETA))
}

#[test]
fn batchnorm_backward_matches_the_cpu_and_accumulates_parameter_gradients() {
    let Some(emu) = emu() else { return };
    for (i, &(rows, c)) in BN_SHAPES.iter().enumerate() {
        for storage in [Storage::F32, Storage::Bf16] {
            let fused = FUSIONS[(i + 1) % FUSIONS.len()];
            let k = BnCase::new(rows, c, 100 + i as u64);
            let dy = Rng(7 + i as u64).vec(rows * c, 0.0, 1.0);
            let acc0 = vec![0.25f32; c];
            let (dx, dres, dgamma, dbeta) = emulated_bn_backward(emu, &k, storage, fused, &dy, &acc0);
            // The CPU op on the same stored values, with its own forward.
            let x = tensor(&[rows, c], &as_stored(&k.x, storage));
            let residual = tensor(&[rows, c], &as_stored(&k.res, storage));
            let (gamma, beta) = (tensor(&[c], &k.gamma), tensor(&[c], &k.beta));
            let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
            let (mut rm, mut rv) = (tensor(&[c], &k.rm), tensor(&[c], &k.rv));
            let (y, cache) =
                batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, fused.residual.then_some(&residual), fused.relu)
                    .unwrap();
            let (mut dg, mut db) = (tensor(&[c], &acc0), tensor(&[c], &acc0));
            let (cdx, cdres) = batchnorm_backward(
                &x,
                &y,
                &tensor(&[rows, c], &as_stored(&dy, storage)),
                &p,
                &cache,
                fused,
                &mut dg,
                &mut db,
            )
            .unwrap();
            let what = |b: &str| format!("{rows}x{c} {storage:?} {fused:?}: {b}");
            // dx = gamma rstd (g - mean g - xhat mean(g xhat)) cancels (to nothing with two rows): measure
            // its error against the size of the first term, gamma rstd g.
            let scale: Vec<f32> = cdx_terms(&as_stored(&dy, storage), &k.gamma, cache.rstd.as_slice());
            common::assert_close_scaled(&what("dx"), &dx, cdx.as_slice(), &scale, tol(storage));
            assert_close(&what("dgamma"), &dgamma, dg.as_slice(), tol(storage));
            assert_close(&what("dbeta"), &dbeta, db.as_slice(), tol(storage));
            if let (Some(got), Some(want)) = (dres, cdres) {
                assert_close(&what("dresidual"), &got, want.as_slice(), tol(storage));
            }
        }
    }
}

/// `gamma rstd dy`, the size of dx before the cancellation of its three terms.
fn cdx_terms(dy: &[f32], gamma: &[f32], rstd: &[f32]) -> Vec<f32> {
    let c = gamma.len();
    dy.iter().enumerate().map(|(i, &g)| g * gamma[i % c] * rstd[i % c]).collect()
}

#[test]
fn batchnorm_backward_matches_finite_differences_of_the_emulated_forward() {
    let Some(emu) = emu() else { return };
    for fused in [Fused::NONE, Fused::RESIDUAL_RELU] {
        let mut k = BnCase::new(6, 3, 3);
        let w = Rng(4).vec(18, 0.0, 1.0);
        let loss = |k: &BnCase| -> f64 {
            let (y, _, _) = emulated_bn_forward(emu, k, Storage::F32, fused);
            y.as_f32().iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let (dx, dres, dgamma, _) = emulated_bn_backward(emu, &k, Storage::F32, fused, &w, &[0.0; 3]);
        let h = 1e-2f32;
        for i in [0, 4, 7, 11, 17] {
            let x0 = k.x[i];
            k.x[i] = x0 + h;
            let lp = loss(&k);
            k.x[i] = x0 - h;
            let lm = loss(&k);
            k.x[i] = x0;
            let fd = (lp - lm) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3, "{fused:?} dx[{i}]: fd {fd} vs {}", dx[i]);
            if let Some(dres) = &dres {
                let r0 = k.res[i];
                k.res[i] = r0 + h;
                let lp = loss(&k);
                k.res[i] = r0 - h;
                let lm = loss(&k);
                k.res[i] = r0;
                let fd = (lp - lm) / (2.0 * h as f64);
                assert!((fd - dres[i] as f64).abs() < 2e-3, "dresidual[{i}]: fd {fd} vs {}", dres[i]);
            }
        }
        for (ch, &want) in dgamma.iter().enumerate() {
            let g0 = k.gamma[ch];
            k.gamma[ch] = g0 + h;
            let lp = loss(&k);
            k.gamma[ch] = g0 - h;
            let lm = loss(&k);
            k.gamma[ch] = g0;
            let fd = (lp - lm) / (2.0 * h as f64);
            assert!((fd - want as f64).abs() < 2e-3, "dgamma[{ch}]: fd {fd} vs {want}");
        }
    }
}

// ---------- pooling ----------

#[test]
fn max_pool_matches_the_cpu_bit_for_bit() {
    let Some(emu) = emu() else { return };
    // (shape, k, stride, pad): ResNet's 3x3/2/1 on odd and even sizes, a 1x1 image, C not a warp multiple.
    let cases: [([usize; 4], usize, usize, usize); 5] = [
        ([2, 7, 9, 5], 3, 2, 1),
        ([1, 1, 1, 1], 3, 2, 1),
        ([3, 8, 8, 33], 3, 2, 1),
        ([1, 6, 5, 2], 2, 2, 0),
        ([2, 5, 5, 3], 3, 1, 1),
    ];
    for (i, (shape, k, s, p)) in cases.into_iter().enumerate() {
        for storage in [Storage::F32, Storage::Bf16] {
            let n: usize = shape.iter().product();
            // Quantised values: ties, so the first-maximum rule is exercised.
            let x: Vec<f32> = Rng(i as u64).vec(n, 0.0, 4.0).iter().map(|v| v.round()).collect();
            let (y, idx) = max_pool_forward(&tensor(&shape, &x), k, s, p).unwrap();
            let fwd = pool::max_pool_forward(&shape, k, s, p, storage).unwrap();
            let m = run(emu, &fwd, &[(pool::X, act(&x, storage))]);
            assert_eq!(m.f32(pool::Y), y.as_slice(), "{shape:?} {storage:?} y");
            let idx_cpu = idx.as_cpu().unwrap();
            assert_eq!(m.get(pool::IDX).as_u32(), idx_cpu, "{shape:?} {storage:?} argmax");
            let dy = as_stored(&Rng(40 + i as u64).vec(y.len(), 0.0, 1.0), storage);
            let dx = max_pool_backward(&shape, &idx, &tensor(y.shape(), &dy)).unwrap();
            let bwd = pool::max_pool_backward(&shape, k, s, p, storage).unwrap();
            let m = run(emu, &bwd, &[(pool::DY, act(&dy, storage)), (pool::IDX, Buffer::from_u32(idx_cpu))]);
            let want = as_stored(dx.as_slice(), storage);
            assert_eq!(m.f32(pool::DX), want, "{shape:?} {storage:?} dx (gather vs scatter)");
        }
    }
}

#[test]
fn global_average_pool_matches_the_cpu() {
    let Some(emu) = emu() else { return };
    for (i, shape) in [[1, 1, 1, 1], [2, 7, 7, 70], [3, 4, 5, 2048], [5, 3, 1, 3]].into_iter().enumerate() {
        for storage in [Storage::F32, Storage::Bf16] {
            let n: usize = shape.iter().product();
            let x = Rng(60 + i as u64).vec(n, 0.5, 1.0);
            let y = global_avg_pool_forward(&tensor(&shape, &as_stored(&x, storage))).unwrap();
            let m = run(emu, &pool::global_avg_pool_forward(&shape, storage).unwrap(), &[(pool::X, act(&x, storage))]);
            assert_close(&format!("{shape:?} {storage:?} y"), &m.f32(pool::Y), y.as_slice(), 1e-5);
            let dy = Rng(70 + i as u64).vec(shape[0] * shape[3], 0.0, 1.0);
            let dx = global_avg_pool_backward(
                &tensor(&shape, &vec![0.0; shape.iter().product()]),
                &tensor(&[shape[0], shape[3]], &dy),
            )
            .unwrap();
            let m = run(
                emu,
                &pool::global_avg_pool_backward(&shape, storage).unwrap(),
                &[(pool::DY, Buffer::from_f32(&dy))],
            );
            assert_eq!(m.f32(pool::DX), as_stored(dx.as_slice(), storage), "{shape:?} {storage:?} dx");
        }
    }
}

// ---------- L2 normalisation ----------

#[test]
fn l2_normalize_matches_the_cpu_and_finite_differences() {
    let Some(emu) = emu() else { return };
    for (i, &(rows, d)) in [(1, 1), (5, 128), (3, 1000), (40, 33)].iter().enumerate() {
        let mut x = Rng(80 + i as u64).vec(rows * d, 0.0, 1.0);
        if rows > 1 {
            x[d..2 * d].fill(0.0); // a zero row stays finite
        }
        let (y, norms) = l2_normalize_forward(&tensor(&[rows, d], &x)).unwrap();
        let m = run(emu, &l2::forward(rows, d).unwrap(), &[(l2::X, Buffer::from_f32(&x))]);
        assert_close(&format!("{rows}x{d} y"), &m.f32(l2::Y), y.as_slice(), 1e-5);
        assert_close(&format!("{rows}x{d} norms"), &m.f32(l2::NORMS), norms.as_slice(), 1e-5);
        let dy = Rng(90 + i as u64).vec(rows * d, 0.0, 1.0);
        let dx = l2_normalize_backward(&y, &norms, &tensor(&[rows, d], &dy)).unwrap();
        let bwd = l2::backward(rows, d).unwrap();
        let got = run(
            emu,
            &bwd,
            &[
                (l2::Y, Buffer::from_f32(y.as_slice())),
                (l2::NORMS, Buffer::from_f32(norms.as_slice())),
                (l2::DY, Buffer::from_f32(&dy)),
            ],
        )
        .f32(l2::DX);
        assert_close(&format!("{rows}x{d} dx"), &got, dx.as_slice(), 1e-5);
    }
    // Finite differences of the emulated forward (a 4 x 6 block; loss = sum y . w).
    let (rows, d) = (4, 6);
    let mut x = Rng(5).vec(rows * d, 0.0, 1.0);
    let w = Rng(6).vec(rows * d, 0.0, 1.0);
    let loss = |x: &[f32]| -> f64 {
        let m = run(emu, &l2::forward(rows, d).unwrap(), &[(l2::X, Buffer::from_f32(x))]);
        m.f32(l2::Y).iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let fwd = run(emu, &l2::forward(rows, d).unwrap(), &[(l2::X, Buffer::from_f32(&x))]);
    let dx = run(
        emu,
        &l2::backward(rows, d).unwrap(),
        &[(l2::Y, fwd.get(l2::Y).clone()), (l2::NORMS, fwd.get(l2::NORMS).clone()), (l2::DY, Buffer::from_f32(&w))],
    )
    .f32(l2::DX);
    for i in [0, 5, 13, 23] {
        let (x0, h) = (x[i], 1e-3f32);
        x[i] = x0 + h;
        let lp = loss(&x);
        x[i] = x0 - h;
        let lm = loss(&x);
        x[i] = x0;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!((fd - dx[i] as f64).abs() < 1e-3, "dx[{i}]: fd {fd} vs {}", dx[i]);
    }
}

// ---------- elementwise ----------

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(emu) = emu() else { return };
    for n in [1usize, 255, 257, 10_000] {
        let mut x = Rng(n as u64).vec(n, 0.0, 3.0);
        x[0] = f32::from_bits(0x3f80_8000); // a tie: rounds to even
        let m = run(emu, &ew::cast(n, Storage::F32, Storage::Bf16).unwrap(), &[(ew::X, Buffer::from_f32(&x))]);
        assert_eq!(m.get(ew::Y).bytes(), Buffer::from_f32_as_bf16(&x).bytes(), "cast to bf16, n {n}");
        let back = run(emu, &ew::cast(n, Storage::Bf16, Storage::F32).unwrap(), &[(ew::X, m.get(ew::Y).clone())]);
        assert_eq!(back.f32(ew::Y), bf16_rounded(&x), "cast to f32, n {n}");

        let y0 = Rng(n as u64 + 1).vec(n, 0.0, 3.0);
        let mut want = tensor(&[n], &y0);
        want.add_assign(&tensor(&[n], &x)).unwrap();
        let m = run(
            emu,
            &ew::add(n, Storage::F32).unwrap(),
            &[(ew::Y, Buffer::from_f32(&y0)), (ew::X, Buffer::from_f32(&x))],
        );
        assert_eq!(m.f32(ew::Y), want.as_slice(), "add, n {n}");
        let m = run(
            emu,
            &ew::add(n, Storage::Bf16).unwrap(),
            &[(ew::Y, act(&y0, Storage::Bf16)), (ew::X, act(&x, Storage::Bf16))],
        );
        let sum: Vec<f32> = bf16_rounded(&y0).iter().zip(bf16_rounded(&x)).map(|(a, b)| a + b).collect();
        assert_eq!(m.f32(ew::Y), bf16_rounded(&sum), "add bf16, n {n}");

        let mut want = tensor(&[n], &x);
        want.scale(-0.37);
        let m = run(emu, &ew::scale(n, -0.37).unwrap(), &[(ew::X, Buffer::from_f32(&x))]);
        assert_eq!(m.f32(ew::X), want.as_slice(), "scale, n {n}");
        for storage in [Storage::F32, Storage::Bf16] {
            let m = run(emu, &ew::fill(n, storage, 1.3).unwrap(), &[]);
            assert_eq!(m.f32(ew::X), as_stored(&vec![1.3; n], storage), "fill {storage:?}, n {n}");
        }
    }
}

// ---------- plans against the sources (no compiler needed) ----------

/// Every plan of every op at a few shapes.
fn all_plans() -> Vec<Plan> {
    let mut plans = Vec::new();
    for storage in [Storage::F32, Storage::Bf16] {
        for fused in FUSIONS {
            for s in [
                BnShape { rows: 2, channels: 1 },
                BnShape { rows: 802_816, channels: 64 },
                BnShape { rows: 256, channels: 2048 },
            ] {
                plans.push(bn::train_forward(s, storage, fused, 0.1, 1e-5).unwrap());
                plans.push(bn::eval_forward(s, storage, fused, 1e-5).unwrap());
                plans.push(bn::backward(s, storage, fused).unwrap());
            }
        }
        plans.push(pool::max_pool_forward(&[256, 112, 112, 64], 3, 2, 1, storage).unwrap());
        plans.push(pool::max_pool_backward(&[256, 112, 112, 64], 3, 2, 1, storage).unwrap());
        plans.push(pool::global_avg_pool_forward(&[256, 7, 7, 2048], storage).unwrap());
        plans.push(pool::global_avg_pool_backward(&[256, 7, 7, 2048], storage).unwrap());
        plans.push(ew::add(1 << 30, storage).unwrap());
        plans.push(ew::fill(7, storage, 0.0).unwrap());
    }
    plans.push(ew::cast(100, Storage::F32, Storage::Bf16).unwrap());
    plans.push(ew::cast(100, Storage::Bf16, Storage::F32).unwrap());
    plans.push(ew::scale(100, 2.0).unwrap());
    plans.push(ew::add_rows(256, 2048).unwrap());
    plans.push(ew::col_sum_add(256, 2048).unwrap());
    plans.push(ew::relu(1 << 20).unwrap());
    plans.push(ew::relu_backward(1 << 20).unwrap());
    plans.push(l2::forward(4096, 128).unwrap());
    plans.push(l2::backward(4096, 128).unwrap());
    plans
}

#[test]
fn every_launch_fits_its_kernel_signature_and_every_kernel_is_planned() {
    let mut used = std::collections::HashSet::new();
    for plan in all_plans() {
        used.extend(check_signatures(&plan, &sources()).unwrap_or_else(|e| panic!("{e}")));
    }
    for name in kernel_names(&sources()).unwrap() {
        assert!(used.contains(name.as_str()), "kernel {name} is in no plan");
    }
}
