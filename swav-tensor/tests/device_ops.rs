//! Every op on a CUDA device against the CPU op, on random inputs of awkward shapes: forward and
//! backward, f32 (relative error < 1e-4) and bf16 activations (< 1e-2 against the CPU op on the
//! bf16-rounded inputs). Runs on the emulated device everywhere, and on the real device 0 where this
//! machine has one (elsewhere that half prints SKIPPED; `SWAV_REQUIRE_CUDA=1` makes it a failure).

mod common;

use common::{emulated_device, real_device, rel_err, Rng};
use swav_tensor::cuda::calls::swav_round_bf16;
use swav_tensor::ops::batchnorm::{
    batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward, BnParams, Fused,
};
use swav_tensor::ops::conv::{conv2d_backward, conv2d_forward, ConvParams};
use swav_tensor::ops::elementwise::{relu_backward, relu_forward};
use swav_tensor::ops::linear::{linear_backward, linear_forward};
use swav_tensor::ops::normalize::{l2_normalize_backward, l2_normalize_forward};
use swav_tensor::ops::pool::{global_avg_pool_backward, global_avg_pool_forward, max_pool_backward, max_pool_forward};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::{DType, Device, Tensor};

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape, v).unwrap()
}

fn on(x: &Tensor, dev: Device, dtype: DType) -> Tensor {
    x.to_device(dev).unwrap().to_dtype(dtype).unwrap()
}

fn rounded(x: &Tensor, dtype: DType) -> Tensor {
    match dtype {
        DType::F32 => x.clone(),
        DType::Bf16 => t(x.shape(), x.as_slice().iter().map(|&v| swav_round_bf16(v)).collect()),
    }
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let e = rel_err(&got.to_vec(), &want.to_vec());
    assert!(e < tol, "{what}: relative error {e:.2e} (tolerance {tol:.0e})");
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 1e-2,
    }
}

fn devices() -> Vec<Device> {
    emulated_device().into_iter().chain(real_device()).collect()
}

fn conv_ops(dev: Device, dtype: DType) {
    let mut rng = Rng(1);
    // (n, h, w, cin, cout, k, stride, pad): stems, 3x3 s1/s2, 1x1 s1/s2.
    for (n, h, w, cin, cout, k, s, p) in [
        (2, 9, 7, 3, 8, 3, 1, 1),
        (2, 8, 8, 8, 16, 3, 2, 1),
        (3, 5, 5, 16, 8, 1, 1, 0),
        (2, 7, 7, 8, 16, 1, 2, 0),
        (1, 13, 11, 3, 8, 7, 2, 3),
    ] {
        let name = format!("conv {n}x{h}x{w}x{cin}->{cout} k{k} s{s} p{p} {dtype:?} on {dev}");
        let params = ConvParams { algo: ConvAlgorithm::Direct, ..ConvParams::new(s, p) };
        let x = rounded(&t(&[n, h, w, cin], rng.vec(n * h * w * cin, 0.0, 1.0)), dtype);
        let wt = rounded(&t(&[cout, k, k, cin], rng.vec(cout * k * k * cin, 0.0, 0.5)), dtype);
        let y = conv2d_forward(&x, &wt, params).unwrap();
        let dy = rounded(&t(y.shape(), rng.vec(y.len(), 0.0, 1.0)), dtype);
        let mut dw = Tensor::full(wt.shape(), 0.25, Device::Cpu);
        let dx = conv2d_backward(&x, &wt, &dy, params, &mut dw, true).unwrap().unwrap();

        let (dxx, dwt, ddy) = (on(&x, dev, dtype), on(&wt, dev, dtype), on(&dy, dev, dtype));
        let dy_dev = conv2d_forward(&dxx, &dwt, params).unwrap();
        assert_eq!(dy_dev.dtype(), dtype);
        close(&format!("{name} y"), &dy_dev, &y, tol(dtype));
        let mut ddw = Tensor::full(wt.shape(), 0.25, dev);
        let ddx = conv2d_backward(&dxx, &dwt, &ddy, params, &mut ddw, true).unwrap().unwrap();
        close(&format!("{name} dx"), &ddx, &dx, tol(dtype));
        close(&format!("{name} dw (accumulated onto 0.25)"), &ddw, &dw, tol(dtype));
    }
}

fn batchnorm_ops(dev: Device, dtype: DType) {
    let mut rng = Rng(2);
    // (Two rows make dx nearly cancel to zero: its relative error means nothing; 8 rows is small.)
    for (rows, c) in [(8, 3), (37, 16), (130, 64)] {
        for fused in [Fused::NONE, Fused::RELU, Fused::RESIDUAL_RELU] {
            let name = format!("bn {rows}x{c} {fused:?} {dtype:?} on {dev}");
            let x = rounded(&t(&[rows, c], rng.vec(rows * c, 0.5, 2.0)), dtype);
            let res = rounded(&t(&[rows, c], rng.vec(rows * c, 0.0, 1.0)), dtype);
            let dy = rounded(&t(&[rows, c], rng.vec(rows * c, 0.0, 1.0)), dtype);
            let gamma = t(&[c], rng.vec(c, 1.0, 0.5));
            let beta = t(&[c], rng.vec(c, 0.0, 0.5));
            let (rm0, rv0) = (t(&[c], rng.vec(c, 0.0, 0.1)), t(&[c], rng.vec(c, 1.0, 0.1)));
            let residual = fused.residual.then_some(&res);

            let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
            let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
            let (y, cache) = batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, residual, fused.relu).unwrap();
            let (mut dg, mut db) = (Tensor::full(&[c], 0.5, Device::Cpu), Tensor::zeros(&[c], Device::Cpu));
            let (dx, dres) = batchnorm_backward(&x, &y, &dy, &p, &cache, fused, &mut dg, &mut db).unwrap();
            let ye = batchnorm_eval_forward(&x, &p, &rm, &rv, residual, fused.relu).unwrap();

            let (gd, bd) = (gamma.to_device(dev).unwrap(), beta.to_device(dev).unwrap());
            let pd = BnParams { gamma: &gd, beta: &bd, eps: 1e-5 };
            let (xd, resd, dyd) = (on(&x, dev, dtype), on(&res, dev, dtype), on(&dy, dev, dtype));
            let residual_d = fused.residual.then_some(&resd);
            let (mut rmd, mut rvd) = (rm0.to_device(dev).unwrap(), rv0.to_device(dev).unwrap());
            let (yd, cached) =
                batchnorm_train_forward(&xd, &pd, &mut rmd, &mut rvd, 0.1, residual_d, fused.relu).unwrap();
            close(&format!("{name} y"), &yd, &y, tol(dtype));
            close(&format!("{name} running mean"), &rmd, &rm, 1e-4);
            close(&format!("{name} running var"), &rvd, &rv, 1e-4);
            close(&format!("{name} saved mean"), &cached.mean, &cache.mean, 1e-4);
            close(&format!("{name} saved rstd"), &cached.rstd, &cache.rstd, 1e-4);
            let (mut dgd, mut dbd) = (Tensor::full(&[c], 0.5, dev), Tensor::zeros(&[c], dev));
            let (dxd, dresd) = batchnorm_backward(&xd, &yd, &dyd, &pd, &cached, fused, &mut dgd, &mut dbd).unwrap();
            close(&format!("{name} dx"), &dxd, &dx, tol(dtype));
            close(&format!("{name} dgamma"), &dgd, &dg, tol(dtype));
            close(&format!("{name} dbeta"), &dbd, &db, tol(dtype));
            if let (Some(a), Some(b)) = (dresd, dres) {
                close(&format!("{name} dresidual"), &a, &b, tol(dtype));
            }
            let yed = batchnorm_eval_forward(
                &xd,
                &pd,
                &rm.to_device(dev).unwrap(),
                &rv.to_device(dev).unwrap(),
                residual_d,
                fused.relu,
            )
            .unwrap();
            close(&format!("{name} eval y"), &yed, &ye, tol(dtype));
        }
    }
}

fn pool_ops(dev: Device, dtype: DType) {
    let mut rng = Rng(3);
    for shape in [[2usize, 9, 7, 5], [1, 4, 4, 1], [3, 16, 16, 8]] {
        let name = format!("pool {shape:?} {dtype:?} on {dev}");
        let n: usize = shape.iter().product();
        let x = rounded(&t(&shape, rng.vec(n, 0.0, 3.0)), dtype);
        let (y, idx) = max_pool_forward(&x, 3, 2, 1).unwrap();
        let dy = rounded(&t(y.shape(), rng.vec(y.len(), 0.0, 1.0)), dtype);
        let dx = max_pool_backward(&shape, &idx, &dy).unwrap();
        let dxx = on(&x, dev, dtype);
        let (dyv, didx) = max_pool_forward(&dxx, 3, 2, 1).unwrap();
        close(&format!("{name} max y"), &dyv, &y, tol(dtype));
        let ddx = max_pool_backward(&shape, &didx, &on(&dy, dev, dtype)).unwrap();
        close(&format!("{name} max dx"), &ddx, &dx, tol(dtype));
        let a = global_avg_pool_forward(&x).unwrap();
        let da = global_avg_pool_forward(&dxx).unwrap();
        assert_eq!(da.dtype(), DType::F32, "pooled features are f32");
        close(&format!("{name} avg y"), &da, &a, tol(dtype));
        let g = t(a.shape(), rng.vec(a.len(), 0.0, 1.0));
        let dxa = global_avg_pool_backward(&x, &g).unwrap();
        let ddxa = global_avg_pool_backward(&dxx, &g.to_device(dev).unwrap()).unwrap();
        assert_eq!(ddxa.dtype(), dtype);
        close(&format!("{name} avg dx"), &ddxa, &dxa, tol(dtype));
    }
}

fn f32_ops(dev: Device) {
    let mut rng = Rng(4);
    for (rows, fin, fout) in [(1, 3, 5), (37, 64, 20), (200, 128, 300)] {
        let name = format!("linear {rows}x{fin}->{fout} on {dev}");
        let x = t(&[rows, fin], rng.vec(rows * fin, 0.0, 1.0));
        let w = t(&[fout, fin], rng.vec(fout * fin, 0.0, 0.3));
        let b = t(&[fout], rng.vec(fout, 0.0, 0.3));
        let y = linear_forward(&x, &w, Some(&b)).unwrap();
        let dy = t(y.shape(), rng.vec(y.len(), 0.0, 1.0));
        let (mut dw, mut db) = (Tensor::full(w.shape(), 0.5, Device::Cpu), Tensor::full(&[fout], 0.5, Device::Cpu));
        let dx = linear_backward(&x, &w, &dy, &mut dw, Some(&mut db), true).unwrap().unwrap();
        let (xd, wd, bd, dyd) =
            (on(&x, dev, DType::F32), on(&w, dev, DType::F32), on(&b, dev, DType::F32), on(&dy, dev, DType::F32));
        close(&format!("{name} y"), &linear_forward(&xd, &wd, Some(&bd)).unwrap(), &y, 1e-4);
        let (mut ddw, mut ddb) = (Tensor::full(w.shape(), 0.5, dev), Tensor::full(&[fout], 0.5, dev));
        let ddx = linear_backward(&xd, &wd, &dyd, &mut ddw, Some(&mut ddb), true).unwrap().unwrap();
        close(&format!("{name} dx"), &ddx, &dx, 1e-4);
        close(&format!("{name} dw"), &ddw, &dw, 1e-4);
        close(&format!("{name} db"), &ddb, &db, 1e-4);

        let (z, norms) = l2_normalize_forward(&y).unwrap();
        let (zd, normsd) = l2_normalize_forward(&y.to_device(dev).unwrap()).unwrap();
        close(&format!("{name} l2 y"), &zd, &z, 1e-4);
        let dz = l2_normalize_backward(&z, &norms, &dy).unwrap();
        close(&format!("{name} l2 dx"), &l2_normalize_backward(&zd, &normsd, &dyd).unwrap(), &dz, 1e-4);

        let r = relu_forward(&y).unwrap();
        let rd = relu_forward(&y.to_device(dev).unwrap()).unwrap();
        close(&format!("{name} relu"), &rd, &r, 1e-6);
        close(&format!("{name} relu dx"), &relu_backward(&rd, &dyd).unwrap(), &relu_backward(&r, &dy).unwrap(), 1e-6);
    }
}

/// Mixed precision's linear layer: bf16 input and weight, fp32 accumulation and outputs, the backward
/// on a bf16 copy of `dy` (the bias gradient on `dy` itself): the CPU op on the rounded values.
fn bf16_linear_ops(dev: Device) {
    let mut rng = Rng(5);
    for (rows, fin, fout) in [(1, 3, 5), (37, 64, 20), (200, 128, 300)] {
        let name = format!("bf16 linear {rows}x{fin}->{fout} on {dev}");
        let x = t(&[rows, fin], rng.vec(rows * fin, 0.0, 1.0));
        let w = t(&[fout, fin], rng.vec(fout * fin, 0.0, 0.3));
        let b = t(&[fout], rng.vec(fout, 0.0, 0.3));
        let dy = t(&[rows, fout], rng.vec(rows * fout, 0.0, 1.0));
        let (xr, wr, dyr) = (rounded(&x, DType::Bf16), rounded(&w, DType::Bf16), rounded(&dy, DType::Bf16));
        let y = linear_forward(&xr, &wr, Some(&b)).unwrap();
        let (mut dw, mut db) = (Tensor::full(w.shape(), 0.5, Device::Cpu), Tensor::full(&[fout], 0.5, Device::Cpu));
        let dx = linear_backward(&xr, &wr, &dyr, &mut dw, None, true).unwrap().unwrap();
        let mut unused = Tensor::zeros(w.shape(), Device::Cpu);
        linear_backward(&xr, &wr, &dy, &mut unused, Some(&mut db), false).unwrap();

        let (xd, wd) = (on(&x, dev, DType::Bf16), on(&w, dev, DType::Bf16));
        let (bd, dyd) = (on(&b, dev, DType::F32), on(&dy, dev, DType::F32));
        let yd = linear_forward(&xd, &wd, Some(&bd)).unwrap();
        assert_eq!(yd.dtype(), DType::F32, "{name}: output in fp32");
        close(&format!("{name} y"), &yd, &y, 1e-4);
        let (mut ddw, mut ddb) = (Tensor::full(w.shape(), 0.5, dev), Tensor::full(&[fout], 0.5, dev));
        let ddx = linear_backward(&xd, &wd, &dyd, &mut ddw, Some(&mut ddb), true).unwrap().unwrap();
        assert_eq!(ddx.dtype(), DType::F32, "{name}: dx in fp32");
        close(&format!("{name} dx"), &ddx, &dx, 1e-4);
        close(&format!("{name} dw"), &ddw, &dw, 1e-4);
        close(&format!("{name} db"), &ddb, &db, 1e-4);
        // Against the unrounded fp32 op: what mixed precision costs, within the bf16 tolerance.
        close(&format!("{name} y against fp32"), &yd, &linear_forward(&x, &w, Some(&b)).unwrap(), tol(DType::Bf16));
        // Input and weight must agree.
        assert!(linear_forward(&xd, &on(&w, dev, DType::F32), None).is_err(), "{name}: mixed inputs refused");
    }
}

#[test]
fn every_op_on_a_cuda_device_matches_the_cpu() {
    for dev in devices() {
        f32_ops(dev);
        bf16_linear_ops(dev);
        for dtype in [DType::F32, DType::Bf16] {
            conv_ops(dev, dtype);
            batchnorm_ops(dev, dtype);
            pool_ops(dev, dtype);
        }
    }
}
