//! Every op against an independent float64 implementation written from its definition (direct loops,
//! no im2col, no fusion), and against finite differences of the op itself.

use swav_tensor::matmul::{round_bf16, MulPrecision};
use swav_tensor::ops::batchnorm::{
    batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward, BnParams, Fused,
};
use swav_tensor::ops::conv::{conv2d_backward, conv2d_forward, ConvParams};
use swav_tensor::ops::conv_plan::ConvKernel;
use swav_tensor::ops::elementwise::{add_forward, relu_backward, relu_forward};
use swav_tensor::ops::linear::{linear_backward, linear_forward};
use swav_tensor::ops::normalize::{l2_normalize_backward, l2_normalize_forward};
use swav_tensor::ops::pool::{global_avg_pool_backward, global_avg_pool_forward, max_pool_backward, max_pool_forward};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::Tensor;

/// A small deterministic generator (SplitMix64) so the tests need no dependency.
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
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|_| self.next()).collect()).unwrap()
    }
}

/// `|got - want| / |want|` over the whole vectors.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum::<f64>().sqrt();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt().max(1e-30);
    num / den
}

fn assert_close(name: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let e = rel_err(got, want);
    assert!(e < rel, "{name}: relative error {e:.3e} >= {rel:.1e}");
}

fn dot(a: &Tensor, b: &[f32]) -> f64 {
    a.as_slice().iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central differences of `loss` at `count` coordinates of `x`, compared with `grad`.
fn check_fd(name: &str, x: &Tensor, grad: &[f32], h: f32, tol: f64, loss: impl Fn(&Tensor) -> f64) {
    let mut rng = Rng(99);
    let mut worst: f64 = 0.0;
    let scale = grad.iter().map(|g| g.abs() as f64).fold(0.0, f64::max).max(1e-3);
    for _ in 0..24 {
        let i = ((rng.next() + 1.0) / 2.0 * x.len() as f32) as usize % x.len();
        let mut xp = x.clone();
        xp.as_mut_slice()[i] += h;
        let mut xm = x.clone();
        xm.as_mut_slice()[i] -= h;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        worst = worst.max((fd - grad[i] as f64).abs() / scale);
    }
    assert!(worst < tol, "{name}: finite-difference error {worst:.3e} (relative to max |grad| {scale:.3e})");
}

// ---------- convolution ----------

struct NaiveConv {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl NaiveConv {
    fn out(&self) -> (usize, usize) {
        ((self.h + 2 * self.p - self.k) / self.s + 1, (self.w + 2 * self.p - self.k) / self.s + 1)
    }
    fn at(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.s + ky) as isize - self.p as isize;
        let ix = (ox * self.s + kx) as isize - self.p as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < self.h && (ix as usize) < self.w).then_some((iy as usize, ix as usize))
    }
    /// Forward, dx and dw in f64 by direct loops over the definition.
    fn run(&self, x: &[f32], wt: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = self.out();
        let (k, cin, cout) = (self.k, self.cin, self.cout);
        let mut y = vec![0.0; self.n * oh * ow * cout];
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; wt.len()];
        for b in 0..self.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let o = ((b * oh + oy) * ow + ox) * cout + co;
                        for ky in 0..k {
                            for kx in 0..k {
                                let Some((iy, ix)) = self.at(oy, ox, ky, kx) else { continue };
                                for ci in 0..cin {
                                    let xi = ((b * self.h + iy) * self.w + ix) * cin + ci;
                                    let wi = ((co * k + ky) * k + kx) * cin + ci;
                                    y[o] += x[xi] as f64 * wt[wi] as f64;
                                    dx[xi] += dy[o] as f64 * wt[wi] as f64;
                                    dw[wi] += dy[o] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }
}

#[test]
fn conv2d_matches_direct_loops_for_every_kernel_stride_and_padding() {
    let mut rng = Rng(1);
    // (n, h, w, cin, cout, k, s, p): stems, 3x3 s1/s2, 1x1 s1/s2 downsamples, odd sizes, a 7x7/2 stem.
    let cases = [
        (2, 9, 7, 3, 5, 3, 1, 1),
        (2, 9, 8, 4, 6, 3, 2, 1),
        (3, 6, 6, 5, 7, 1, 1, 0),
        (2, 7, 5, 6, 4, 1, 2, 0),
        (1, 13, 11, 3, 8, 7, 2, 3),
        (2, 5, 5, 2, 3, 3, 1, 0),
        (1, 8, 8, 3, 4, 5, 3, 2),
        (4, 4, 4, 16, 32, 3, 2, 1),
        (8, 3, 3, 64, 32, 3, 2, 1),
        (8, 3, 3, 64, 128, 1, 2, 0),
        (6, 5, 5, 32, 64, 3, 2, 1),
        (5, 2, 2, 16, 8, 3, 1, 1),
        (7, 1, 1, 16, 8, 3, 1, 1),
        (3, 3, 3, 8, 8, 3, 1, 1),
        (70, 3, 3, 33, 20, 3, 2, 1),
        (8, 20, 20, 8, 16, 1, 1, 0),
        (8, 20, 20, 8, 16, 1, 2, 0),
        (8, 21, 21, 8, 16, 3, 2, 1),
        (8, 2, 2, 16, 32, 3, 2, 1),
        // Winograd sizes: F(4,3) on 28, 14, 7, 9; F(2,3) on 2x2; odd and non-multiple edges.
        (2, 28, 28, 32, 40, 3, 1, 1),
        (3, 14, 13, 32, 48, 3, 1, 1),
        (4, 7, 7, 64, 32, 3, 1, 1),
        (2, 9, 11, 32, 32, 3, 1, 1),
        (6, 2, 2, 32, 32, 3, 1, 1),
        (130, 4, 4, 32, 33, 3, 1, 1),
        (8, 2, 2, 16, 32, 1, 2, 0),
        (8, 1, 1, 16, 32, 1, 1, 0),
    ];
    for (n, h, w, cin, cout, k, s, p) in cases {
        let nc = NaiveConv { n, h, w, cin, cout, k, s, p };
        let (oh, ow) = nc.out();
        let x = rng.tensor(&[n, h, w, cin]);
        let wt = rng.tensor(&[cout, k, k, cin]);
        let dy = rng.tensor(&[n, oh, ow, cout]);
        let (y_ref, dx_ref, dw_ref) = nc.run(x.as_slice(), wt.as_slice(), dy.as_slice());
        let dw_ref: Vec<f64> = dw_ref.iter().map(|v| v + 0.5).collect();
        // Every algorithm choice (Winograd F(4,3)/F(2,3) where allowed, im2col elsewhere) is exact.
        for algo in [ConvAlgorithm::Auto, ConvAlgorithm::Winograd2, ConvAlgorithm::Direct] {
            let params = ConvParams { algo, ..ConvParams::new(s, p) };
            let y = conv2d_forward(&x, &wt, params).unwrap();
            assert_eq!(y.shape(), [n, oh, ow, cout]);
            let name = format!("conv n{n} {h}x{w} {cin}->{cout} k{k} s{s} p{p} {algo}");
            assert_close(&format!("{name} forward"), y.as_slice(), &y_ref, 1e-5);
            // dw accumulates onto what is already there.
            let mut dw = Tensor::full(wt.shape(), 0.5, Default::default());
            let dx = conv2d_backward(&x, &wt, &dy, params, &mut dw, true).unwrap().unwrap();
            assert_close(&format!("{name} dx"), dx.as_slice(), &dx_ref, 1e-5);
            assert_close(&format!("{name} dw"), dw.as_slice(), &dw_ref, 1e-5);
        }
    }
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    let mut rng = Rng(2);
    let (s, p) = (2, 1);
    let x = rng.tensor(&[2, 7, 6, 3]);
    let wt = rng.tensor(&[4, 3, 3, 3]);
    let y = conv2d_forward(&x, &wt, ConvParams::new(s, p)).unwrap();
    let r = rng.tensor(y.shape());
    let mut dw = Tensor::zeros(wt.shape(), Default::default());
    let dx = conv2d_backward(&x, &wt, &r, ConvParams::new(s, p), &mut dw, true).unwrap().unwrap();
    check_fd("conv dx", &x, dx.as_slice(), 1e-2, 1e-3, |x| {
        dot(&conv2d_forward(x, &wt, ConvParams::new(s, p)).unwrap(), r.as_slice())
    });
    check_fd("conv dw", &wt, dw.as_slice(), 1e-2, 1e-3, |w| {
        dot(&conv2d_forward(&x, w, ConvParams::new(s, p)).unwrap(), r.as_slice())
    });
}

#[test]
fn conv2d_large_enough_to_use_many_tiles_is_deterministic_and_correct() {
    // Enough pixels for several tiles and weight-gradient chunks.
    let mut rng = Rng(3);
    let nc = NaiveConv { n: 8, h: 20, w: 20, cin: 8, cout: 16, k: 3, s: 1, p: 1 };
    let x = rng.tensor(&[8, 20, 20, 8]);
    let wt = rng.tensor(&[16, 3, 3, 8]);
    let dy = rng.tensor(&[8, 20, 20, 16]);
    let (y_ref, dx_ref, dw_ref) = nc.run(x.as_slice(), wt.as_slice(), dy.as_slice());
    let y = conv2d_forward(&x, &wt, ConvParams::new(1, 1)).unwrap();
    assert_close("big conv forward", y.as_slice(), &y_ref, 1e-5);
    let mut dw = Tensor::zeros(wt.shape(), Default::default());
    let dx = conv2d_backward(&x, &wt, &dy, ConvParams::new(1, 1), &mut dw, true).unwrap().unwrap();
    assert_close("big conv dx", dx.as_slice(), &dx_ref, 1e-5);
    assert_close("big conv dw", dw.as_slice(), &dw_ref, 1e-5);
    let mut dw2 = Tensor::zeros(wt.shape(), Default::default());
    let dx2 = conv2d_backward(&x, &wt, &dy, ConvParams::new(1, 1), &mut dw2, true).unwrap().unwrap();
    assert_eq!(dw.as_slice(), dw2.as_slice(), "weight gradient must be bit-identical run to run");
    assert_eq!(dx.as_slice(), dx2.as_slice());
}

/// The weight gradient alone (no `dx`), computed on a pool of `threads` compute threads.
fn weight_grad_on(threads: usize, x: &Tensor, wt: &Tensor, dy: &Tensor, params: ConvParams) -> Tensor {
    swav_tensor::with_isa(swav_core::isa::available(), threads, || {
        let mut dw = Tensor::zeros(wt.shape(), Default::default());
        conv2d_backward(x, wt, dy, params, &mut dw, false).unwrap();
        dw
    })
    .unwrap()
}

#[test]
fn weight_gradient_is_the_same_whether_chunks_or_products_are_spread_over_threads() {
    // 4096 pixels make 8 chunks: one thread runs them in parallel (trivially), five threads have too
    // few chunks to share and spread each product instead. Both must give the naive gradient, with the
    // same bits (a pointwise convolution's chunks are single products whatever the thread count).
    let mut rng = Rng(4);
    let (n, h, cin, cout) = (16, 16, 64, 48);
    let nc = NaiveConv { n, h, w: h, cin, cout, k: 1, s: 1, p: 0 };
    let x = rng.tensor(&[n, h, h, cin]);
    let wt = rng.tensor(&[cout, 1, 1, cin]);
    let dy = rng.tensor(&[n, h, h, cout]);
    let (_, _, dw_ref) = nc.run(x.as_slice(), wt.as_slice(), dy.as_slice());
    let grad = |threads: usize| weight_grad_on(threads, &x, &wt, &dy, ConvParams::new(1, 0));
    let (one, five) = (grad(1), grad(5));
    assert_close("pointwise dw, 1 thread", one.as_slice(), &dw_ref, 1e-5);
    assert_eq!(one.as_slice(), five.as_slice(), "1 thread against 5 threads");
}

#[test]
fn weight_gradient_of_im2col_tiles_with_products_over_the_pool() {
    // 8 chunks on 5 threads: each chunk's im2col tiles are multiplied over the pool, large enough for
    // the GEMM to split, while other chunks run on the same threads.
    let mut rng = Rng(5);
    let nc = NaiveConv { n: 8, h: 32, w: 32, cin: 64, cout: 64, k: 3, s: 1, p: 1 };
    let x = rng.tensor(&[8, 32, 32, 64]);
    let wt = rng.tensor(&[64, 3, 3, 64]);
    let dy = rng.tensor(&[8, 32, 32, 64]);
    let (_, _, dw_ref) = nc.run(x.as_slice(), wt.as_slice(), dy.as_slice());
    let params = ConvParams { algo: ConvAlgorithm::Direct, ..ConvParams::new(1, 1) };
    let dw = weight_grad_on(5, &x, &wt, &dy, params);
    assert_close("3x3 dw, 5 threads", dw.as_slice(), &dw_ref, 1e-5);
}

/// `t` with every value rounded to bf16.
fn rounded(t: &Tensor) -> Tensor {
    Tensor::from_vec(t.shape(), t.as_slice().iter().map(|&v| round_bf16(v)).collect()).unwrap()
}

fn relative(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.len(), want.len());
    rel_err(got.as_slice(), &want.as_slice().iter().map(|&v| v as f64).collect::<Vec<f64>>())
}

/// Forward, data gradient and weight gradient of one convolution.
fn conv_passes(x: &Tensor, w: &Tensor, dy: &Tensor, p: ConvParams) -> [Tensor; 3] {
    let y = conv2d_forward(x, w, p).unwrap();
    let mut dw = Tensor::zeros(w.shape(), Default::default());
    let dx = conv2d_backward(x, w, dy, p, &mut dw, true).unwrap().unwrap();
    [y, dx, dw]
}

#[test]
fn bf16_convolutions_are_the_f32_convolutions_of_the_rounded_factors() {
    // Every im2col product path: tiles, a whole-matrix product (late-stage shape), pointwise, strided
    // (data-gradient classes) and a first-layer-like 3-channel input.
    let mut rng = Rng(7);
    let cases = [
        (4, 12, 12, 16, 24, 3, 1, 1),
        (2, 3, 3, 64, 96, 3, 1, 1),
        (3, 8, 8, 24, 40, 1, 1, 0),
        (2, 9, 9, 16, 32, 3, 2, 1),
        (2, 14, 14, 3, 16, 7, 2, 3),
    ];
    for (n, h, w, cin, cout, k, s, p) in cases {
        let name = format!("bf16 conv n{n} {h}x{w} {cin}->{cout} k{k} s{s} p{p}");
        let x = rng.tensor(&[n, h, w, cin]);
        let wt = rng.tensor(&[cout, k, k, cin]);
        let dy = rng.tensor(conv2d_forward(&x, &wt, ConvParams::new(s, p)).unwrap().shape());
        let f32p = ConvParams { algo: ConvAlgorithm::Direct, ..ConvParams::new(s, p) };
        let bf16p = ConvParams { precision: MulPrecision::Bf16, ..f32p };
        let got = conv_passes(&x, &wt, &dy, bf16p);
        let want = conv_passes(&rounded(&x), &rounded(&wt), &rounded(&dy), f32p);
        let plain = conv_passes(&x, &wt, &dy, f32p);
        for (i, pass) in ["forward", "dx", "dw"].iter().enumerate() {
            let e = relative(&got[i], &want[i]);
            assert!(e < 1e-6, "{name} {pass}: {e:.2e} from the f32 convolution of the rounded factors");
            // And not the f32 convolution: bf16 keeps 8 bits of mantissa.
            let e = relative(&got[i], &plain[i]);
            assert!(e > 1e-4 && e < 1e-2, "{name} {pass}: {e:.2e} from the f32 convolution");
        }
    }
}

#[test]
fn bf16_winograd_rounds_f2_products_and_keeps_f4_in_f32() {
    let mut rng = Rng(8);
    let x = rng.tensor(&[2, 10, 10, 32]);
    let wt = rng.tensor(&[40, 3, 3, 32]);
    let dy = rng.tensor(&[2, 10, 10, 40]);
    for (kernel, bf16_level) in [(ConvKernel::WinogradF2, true), (ConvKernel::WinogradF4, false)] {
        let f32p = ConvParams { algo: ConvAlgorithm::Only(kernel), ..ConvParams::new(1, 1) };
        let got = conv_passes(&x, &wt, &dy, ConvParams { precision: MulPrecision::Bf16, ..f32p });
        let want = conv_passes(&x, &wt, &dy, f32p);
        for (i, pass) in ["forward", "dx", "dw"].iter().enumerate() {
            let e = relative(&got[i], &want[i]);
            if bf16_level {
                assert!(e > 1e-4 && e < 1e-2, "{kernel} {pass}: {e:.2e} from f32");
            } else {
                assert_eq!(got[i].as_slice(), want[i].as_slice(), "{kernel} {pass}: not f32's bits");
            }
        }
    }
}

#[test]
fn conv2d_rejects_mismatched_shapes() {
    let x = Tensor::zeros(&[1, 4, 4, 3], Default::default());
    assert!(conv2d_forward(&x, &Tensor::zeros(&[2, 3, 3, 4], Default::default()), ConvParams::new(1, 1)).is_err());
    assert!(conv2d_forward(&x, &Tensor::zeros(&[2, 7, 7, 3], Default::default()), ConvParams::new(1, 0)).is_err());
    assert!(conv2d_forward(
        &Tensor::zeros(&[4, 4, 3], Default::default()),
        &Tensor::zeros(&[2, 3, 3, 3], Default::default()),
        ConvParams::new(1, 1)
    )
    .is_err());
}

// ---------- batch norm ----------

/// Reference BN in f64: returns y, dx, dgamma, dbeta for `y = act(bn(x) + res)`.
fn naive_bn(
    x: &[f32],
    res: Option<&[f32]>,
    relu: bool,
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    eps: f64,
) -> [Vec<f64>; 5] {
    let c = gamma.len();
    let rows = x.len() / c;
    let mut y = vec![0.0; x.len()];
    let mut dx = vec![0.0; x.len()];
    let mut dres = vec![0.0; x.len()];
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let col: Vec<f64> = (0..rows).map(|r| x[r * c + ch] as f64).collect();
        let mean = col.iter().sum::<f64>() / rows as f64;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = col.iter().map(|v| (v - mean) * rstd).collect();
        let mut g = vec![0.0; rows];
        for r in 0..rows {
            let i = r * c + ch;
            let pre = xhat[r] * gamma[ch] as f64 + beta[ch] as f64 + res.map_or(0.0, |s| s[i] as f64);
            y[i] = if relu { pre.max(0.0) } else { pre };
            g[r] = if relu && pre <= 0.0 { 0.0 } else { dy[i] as f64 };
            dres[i] = g[r];
        }
        let sg: f64 = g.iter().sum();
        let sgx: f64 = g.iter().zip(&xhat).map(|(a, b)| a * b).sum();
        dg[ch] = sgx;
        db[ch] = sg;
        for r in 0..rows {
            let n = rows as f64;
            dx[r * c + ch] = gamma[ch] as f64 * rstd * (g[r] - sg / n - xhat[r] * sgx / n);
        }
    }
    [y, dx, dg, db, dres]
}

#[test]
fn batchnorm_train_matches_reference_with_every_fusion() {
    let mut rng = Rng(4);
    for (shape, fused) in [
        (vec![3, 5, 4, 6], Fused::NONE),
        (vec![3, 5, 4, 6], Fused::RELU),
        (vec![2, 7, 3, 5], Fused::RESIDUAL_RELU),
        (vec![9, 33], Fused::RELU),
        (vec![257, 70], Fused::NONE),
    ] {
        let c = *shape.last().unwrap();
        let x = rng.tensor(&shape);
        let res = rng.tensor(&shape);
        let dy = rng.tensor(&shape);
        let gamma = rng.tensor(&[c]);
        let beta = rng.tensor(&[c]);
        let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
        let mut rm = rng.tensor(&[c]);
        let mut rv = Tensor::full(&[c], 2.0, Default::default());
        let (rm0, rv0) = (rm.clone(), rv.clone());
        let r = fused.residual.then_some(&res);
        let (y, cache) = batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, r, fused.relu).unwrap();
        let [y_ref, dx_ref, dg_ref, db_ref, dres_ref] = naive_bn(
            x.as_slice(),
            r.map(|t| t.as_slice()),
            fused.relu,
            gamma.as_slice(),
            beta.as_slice(),
            dy.as_slice(),
            1e-5,
        );
        assert_close("bn forward", y.as_slice(), &y_ref, 1e-5);
        let mut dg = Tensor::zeros(&[c], Default::default());
        let mut db = Tensor::zeros(&[c], Default::default());
        let (dx, dres) = batchnorm_backward(&x, &y, &dy, &p, &cache, fused, &mut dg, &mut db).unwrap();
        assert_close("bn dx", dx.as_slice(), &dx_ref, 1e-4);
        assert_close("bn dgamma", dg.as_slice(), &dg_ref, 1e-5);
        assert_close("bn dbeta", db.as_slice(), &db_ref, 1e-5);
        assert_eq!(dres.is_some(), fused.residual);
        if let Some(dres) = dres {
            assert_close("bn dresidual", dres.as_slice(), &dres_ref, 1e-6);
        }
        // Running statistics: momentum 0.1, unbiased variance.
        let rows = x.len() / c;
        for ch in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| x.as_slice()[r * c + ch] as f64).collect();
            let mean = col.iter().sum::<f64>() / rows as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (rows as f64 - 1.0);
            let want_m = 0.9 * rm0.as_slice()[ch] as f64 + 0.1 * mean;
            let want_v = 0.9 * rv0.as_slice()[ch] as f64 + 0.1 * var;
            assert!((rm.as_slice()[ch] as f64 - want_m).abs() < 1e-5);
            assert!((rv.as_slice()[ch] as f64 - want_v).abs() < 1e-5);
        }
    }
}

/// The fused ReLU's backward (which recomputes the mask from `x` when there is no residual) equals the
/// plain backward of the gradient masked by the forward's output, bit for bit: the recomputed mask is
/// exactly `y > 0`, on values around zero too and over many rows (several chunks and sum blocks).
#[test]
fn batchnorm_relu_backward_is_the_plain_backward_of_the_gradient_masked_by_the_output() {
    let mut rng = Rng(11);
    for shape in [vec![2, 9, 7, 24], vec![3000, 13]] {
        let c = *shape.last().unwrap();
        let x = rng.tensor(&shape);
        let dy = rng.tensor(&shape);
        let gamma = rng.tensor(&[c]);
        let beta = rng.tensor(&[c]);
        let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
        let (mut rm, mut rv) = (Tensor::zeros(&[c], Default::default()), Tensor::zeros(&[c], Default::default()));
        let (y, cache) = batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, None, true).unwrap();
        let (y_plain, _) = batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, None, false).unwrap();
        let masked: Vec<f32> =
            dy.as_slice().iter().zip(y.as_slice()).map(|(&d, &v)| if v > 0.0 { d } else { 0.0 }).collect();
        let live = masked.iter().zip(dy.as_slice()).filter(|(m, d)| m == d).count();
        assert!(
            live > dy.len() / 4 && live < dy.len() * 3 / 4,
            "the mask should cut about half: {live} of {}",
            dy.len()
        );
        let masked = Tensor::from_vec(&shape, masked).unwrap();
        let grads = |fused: Fused, y: &Tensor, dy: &Tensor| {
            let (mut dg, mut db) = (Tensor::zeros(&[c], Default::default()), Tensor::zeros(&[c], Default::default()));
            let (dx, _) = batchnorm_backward(&x, y, dy, &p, &cache, fused, &mut dg, &mut db).unwrap();
            [dx.as_slice().to_vec(), dg.as_slice().to_vec(), db.as_slice().to_vec()]
        };
        assert_eq!(grads(Fused::RELU, &y, &dy), grads(Fused::NONE, &y_plain, &masked), "{shape:?}");
    }
}

#[test]
fn batchnorm_gradients_match_finite_differences() {
    let mut rng = Rng(5);
    let x = rng.tensor(&[4, 3, 3, 5]);
    let res = rng.tensor(x.shape());
    let r = rng.tensor(x.shape());
    let gamma = rng.tensor(&[5]);
    let beta = rng.tensor(&[5]);
    let run = |x: &Tensor, gamma: &Tensor| {
        let p = BnParams { gamma, beta: &beta, eps: 1e-5 };
        let mut rm = Tensor::zeros(&[5], Default::default());
        let mut rv = Tensor::zeros(&[5], Default::default());
        batchnorm_train_forward(x, &p, &mut rm, &mut rv, 0.1, Some(&res), true).unwrap()
    };
    let (y, cache) = run(&x, &gamma);
    let mut dg = Tensor::zeros(&[5], Default::default());
    let mut db = Tensor::zeros(&[5], Default::default());
    let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
    let (dx, _) = batchnorm_backward(&x, &y, &r, &p, &cache, Fused::RESIDUAL_RELU, &mut dg, &mut db).unwrap();
    check_fd("bn dx", &x, dx.as_slice(), 1e-3, 2e-2, |x| dot(&run(x, &gamma).0, r.as_slice()));
    check_fd("bn dgamma", &gamma, dg.as_slice(), 1e-3, 2e-2, |g| dot(&run(&x, g).0, r.as_slice()));
}

#[test]
fn batchnorm_eval_uses_running_statistics() {
    let mut rng = Rng(6);
    let x = rng.tensor(&[5, 4]);
    let gamma = rng.tensor(&[4]);
    let beta = rng.tensor(&[4]);
    let rm = rng.tensor(&[4]);
    let rv = Tensor::from_slice(&[4], &[0.5, 1.0, 2.0, 3.0]).unwrap();
    let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
    let y = batchnorm_eval_forward(&x, &p, &rm, &rv, None, false).unwrap();
    let want: Vec<f64> = (0..20)
        .map(|i| {
            let c = i % 4;
            (x.as_slice()[i] as f64 - rm.as_slice()[c] as f64) / (rv.as_slice()[c] as f64 + 1e-5).sqrt()
                * gamma.as_slice()[c] as f64
                + beta.as_slice()[c] as f64
        })
        .collect();
    assert_close("bn eval", y.as_slice(), &want, 1e-6);
}

// ---------- pooling ----------

#[test]
fn max_pool_matches_direct_loops_and_routes_gradients_to_the_argmax() {
    let mut rng = Rng(7);
    let (n, h, w, c) = (2, 9, 8, 3);
    let x = rng.tensor(&[n, h, w, c]);
    let (y, idx) = max_pool_forward(&x, 3, 2, 1).unwrap();
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    assert_eq!(y.shape(), [n, oh, ow, c]);
    let dy = rng.tensor(y.shape());
    let mut want_dx = vec![0.0f64; x.len()];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut best = (f32::NEG_INFINITY, 0);
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let i = ((b * h + iy as usize) * w + ix as usize) * c + ch;
                            if x.as_slice()[i] > best.0 {
                                best = (x.as_slice()[i], i);
                            }
                        }
                    }
                    let o = ((b * oh + oy) * ow + ox) * c + ch;
                    assert_eq!(y.as_slice()[o], best.0);
                    want_dx[best.1] += dy.as_slice()[o] as f64;
                }
            }
        }
    }
    let dx = max_pool_backward(x.shape(), &idx, &dy).unwrap();
    assert_close("max pool dx", dx.as_slice(), &want_dx, 1e-6);
}

#[test]
fn max_pool_takes_the_first_of_equal_maxima_and_propagates_nan() {
    // 16 channels (whole vectors at every instruction set), all values equal but one NaN in channel 5:
    // each gradient goes to the first pixel of its window in window order, except where the NaN is.
    let (h, w, c) = (6, 6, 16);
    let nan_at = (2 * w + 3) * c + 5; // pixel (2, 3), channel 5
    let mut values = vec![1.0f32; h * w * c];
    values[nan_at] = f32::NAN;
    let x = Tensor::from_vec(&[1, h, w, c], values).unwrap();
    let (y, idx) = max_pool_forward(&x, 3, 2, 1).unwrap();
    let dy = Tensor::full(y.shape(), 1.0, Default::default());
    let dx = max_pool_backward(x.shape(), &idx, &dy).unwrap();
    let (oh, ow) = (y.shape()[1], y.shape()[2]);
    let mut want = vec![0.0f64; x.len()];
    for oy in 0..oh {
        for ox in 0..ow {
            // The window's first pixel inside the image (padding 1).
            let (iy, ix) = ((oy * 2).saturating_sub(1), (ox * 2).saturating_sub(1));
            let covers_nan = (oy * 2).saturating_sub(1) <= 2
                && 2 <= oy * 2 + 1
                && (ox * 2).saturating_sub(1) <= 3
                && 3 <= ox * 2 + 1;
            for ch in 0..c {
                let o = (oy * ow + ox) * c + ch;
                if ch == 5 && covers_nan {
                    assert!(y.as_slice()[o].is_nan(), "output ({oy},{ox}) should be NaN");
                    want[nan_at] += 1.0;
                } else {
                    assert_eq!(y.as_slice()[o], 1.0);
                    want[(iy * w + ix) * c + ch] += 1.0;
                }
            }
        }
    }
    assert_close("max pool dx with ties and a NaN", dx.as_slice(), &want, 1e-12);
}

#[test]
fn global_avg_pool_and_its_gradient() {
    let mut rng = Rng(8);
    let x = rng.tensor(&[3, 4, 5, 6]);
    let y = global_avg_pool_forward(&x).unwrap();
    let want: Vec<f64> = (0..18)
        .map(|i| {
            let (b, c) = (i / 6, i % 6);
            (0..20).map(|p| x.as_slice()[(b * 20 + p) * 6 + c] as f64).sum::<f64>() / 20.0
        })
        .collect();
    assert_close("avg pool", y.as_slice(), &want, 1e-6);
    let r = rng.tensor(&[3, 6]);
    let dx = global_avg_pool_backward(&x, &r).unwrap();
    check_fd("avg pool dx", &x, dx.as_slice(), 1e-2, 1e-3, |x| dot(&global_avg_pool_forward(x).unwrap(), r.as_slice()));
}

// ---------- linear, relu, add, normalisation ----------

#[test]
fn linear_matches_reference_and_finite_differences() {
    let mut rng = Rng(9);
    let x = rng.tensor(&[7, 5]);
    let w = rng.tensor(&[3, 5]);
    let b = rng.tensor(&[3]);
    let y = linear_forward(&x, &w, Some(&b)).unwrap();
    let want: Vec<f64> = (0..21)
        .map(|i| {
            let (r, o) = (i / 3, i % 3);
            b.as_slice()[o] as f64
                + (0..5).map(|k| x.as_slice()[r * 5 + k] as f64 * w.as_slice()[o * 5 + k] as f64).sum::<f64>()
        })
        .collect();
    assert_close("linear", y.as_slice(), &want, 1e-6);
    let r = rng.tensor(&[7, 3]);
    let mut dw = Tensor::zeros(w.shape(), Default::default());
    let mut db = Tensor::zeros(&[3], Default::default());
    let dx = linear_backward(&x, &w, &r, &mut dw, Some(&mut db), true).unwrap().unwrap();
    let loss = |x: &Tensor, w: &Tensor, b: &Tensor| dot(&linear_forward(x, w, Some(b)).unwrap(), r.as_slice());
    check_fd("linear dx", &x, dx.as_slice(), 1e-2, 1e-3, |x| loss(x, &w, &b));
    check_fd("linear dw", &w, dw.as_slice(), 1e-2, 1e-3, |w| loss(&x, w, &b));
    check_fd("linear db", &b, db.as_slice(), 1e-2, 1e-3, |b| loss(&x, &w, b));
    // Without bias.
    let y0 = linear_forward(&x, &w, None).unwrap();
    let shifted: Vec<f64> = want.iter().enumerate().map(|(i, v)| v - b.as_slice()[i % 3] as f64).collect();
    assert_close("linear without bias", y0.as_slice(), &shifted, 1e-5);
}

#[test]
fn relu_and_add() {
    let mut rng = Rng(10);
    let x = rng.tensor(&[4, 6]);
    let y = relu_forward(&x).unwrap();
    let dy = rng.tensor(&[4, 6]);
    let dx = relu_backward(&y, &dy).unwrap();
    for i in 0..24 {
        let v = x.as_slice()[i];
        assert_eq!(y.as_slice()[i], v.max(0.0));
        assert_eq!(dx.as_slice()[i], if v > 0.0 { dy.as_slice()[i] } else { 0.0 });
    }
    let s = add_forward(&x, &dy).unwrap();
    for i in 0..24 {
        assert_eq!(s.as_slice()[i], x.as_slice()[i] + dy.as_slice()[i]);
    }
    assert!(add_forward(&x, &Tensor::zeros(&[6, 4], Default::default())).is_err());
}

#[test]
fn l2_normalize_matches_reference_and_finite_differences() {
    let mut rng = Rng(11);
    let x = rng.tensor(&[6, 9]);
    let (y, norms) = l2_normalize_forward(&x).unwrap();
    for row in y.as_slice().chunks(9) {
        let n: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum();
        assert!((n - 1.0).abs() < 1e-6);
    }
    let r = rng.tensor(&[6, 9]);
    let dx = l2_normalize_backward(&y, &norms, &r).unwrap();
    check_fd("l2 normalize dx", &x, dx.as_slice(), 1e-3, 1e-2, |x| {
        dot(&l2_normalize_forward(x).unwrap().0, r.as_slice())
    });
    // A zero row stays finite (PyTorch clamps the norm at 1e-12).
    let z = Tensor::zeros(&[1, 4], Default::default());
    let (yz, nz) = l2_normalize_forward(&z).unwrap();
    assert!(yz.as_slice().iter().all(|v| *v == 0.0));
    assert!(l2_normalize_backward(&yz, &nz, &Tensor::full(&[1, 4], 1.0, Default::default()))
        .unwrap()
        .as_slice()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn cat_and_narrow_round_trip() {
    let mut rng = Rng(12);
    let a = rng.tensor(&[2, 3, 3, 2]);
    let b = rng.tensor(&[5, 3, 3, 2]);
    let c = Tensor::cat(&[&a, &b]).unwrap();
    assert_eq!(c.shape(), [7, 3, 3, 2]);
    assert_eq!(c.narrow(0, 2).unwrap(), a);
    assert_eq!(c.narrow(2, 5).unwrap(), b);
    assert!(c.narrow(3, 5).is_err());
    assert!(Tensor::cat(&[&a, &rng.tensor(&[1, 3, 2, 2])]).is_err());
}
