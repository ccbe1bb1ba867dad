//! Every CPU kernel at every instruction set this machine has, against the baseline build of the same
//! kernel: the results must be bit-identical (Rust neither fuses multiply-adds nor reorders float sums
//! by itself, so any difference is a bug in a kernel or in its dispatch), and each kernel must report
//! that it really ran at the level asked for, on the compute threads too.

use swav_core::isa::{available, used, Isa};
use swav_tensor::ops::batchnorm::{batchnorm_backward, batchnorm_train_forward, BnParams, Fused};
use swav_tensor::ops::conv::{conv2d_backward, conv2d_forward, ConvParams};
use swav_tensor::ops::elementwise::{add_forward, relu_backward, relu_forward};
use swav_tensor::ops::pool::{global_avg_pool_backward, global_avg_pool_forward, max_pool_backward, max_pool_forward};
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::{with_isa, Tensor};

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed;
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(shape, data).unwrap()
}

/// Every output and gradient of the CPU kernels on shapes that reach their edge cases (partial
/// Winograd tiles, strided classes, rows not a multiple of the vector width).
fn run_kernels() -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let x = tensor(&[2, 9, 7, 33], 1);
    for (name, algo, k, stride, pad) in [
        ("winograd F(4,3)", ConvAlgorithm::Auto, 3, 1, 1),
        ("winograd F(2,3)", ConvAlgorithm::Winograd2, 3, 1, 1),
        ("im2col 3x3", ConvAlgorithm::Direct, 3, 1, 1),
        ("im2col 3x3/2", ConvAlgorithm::Auto, 3, 2, 1),
        ("pointwise", ConvAlgorithm::Auto, 1, 1, 0),
    ] {
        let w = tensor(&[34, k, k, 33], 2);
        let p = ConvParams { algo, ..ConvParams::new(stride, pad) };
        let y = conv2d_forward(&x, &w, p).unwrap();
        let dy = tensor(y.shape(), 3);
        let mut dw = Tensor::zeros(w.shape(), x.device());
        let dx = conv2d_backward(&x, &w, &dy, p, &mut dw, true).unwrap().unwrap();
        out.push((format!("{name} y"), y.as_slice().to_vec()));
        out.push((format!("{name} dw"), dw.as_slice().to_vec()));
        out.push((format!("{name} dx"), dx.as_slice().to_vec()));
    }
    let (gamma, beta) = (tensor(&[33], 4), tensor(&[33], 5));
    let p = BnParams { gamma: &gamma, beta: &beta, eps: 1e-5 };
    let res = tensor(x.shape(), 6);
    let (mut rm, mut rv) = (Tensor::zeros(&[33], x.device()), Tensor::zeros(&[33], x.device()));
    for fused in [Fused::NONE, Fused::RELU, Fused::RESIDUAL_RELU] {
        let r = fused.residual.then_some(&res);
        let (y, cache) = batchnorm_train_forward(&x, &p, &mut rm, &mut rv, 0.1, r, fused.relu).unwrap();
        let dy = tensor(x.shape(), 7);
        let (mut dg, mut db) = (Tensor::zeros(&[33], x.device()), Tensor::zeros(&[33], x.device()));
        let (dx, dres) = batchnorm_backward(&x, &y, &dy, &p, &cache, fused, &mut dg, &mut db).unwrap();
        out.push((format!("bn {fused:?} y"), y.as_slice().to_vec()));
        out.push((format!("bn {fused:?} dx"), dx.as_slice().to_vec()));
        out.push((format!("bn {fused:?} dgamma, dbeta"), [dg.as_slice(), db.as_slice()].concat()));
        out.push((format!("bn {fused:?} dres"), dres.map(|t| t.as_slice().to_vec()).unwrap_or_default()));
    }
    out.push(("bn running stats".into(), [rm.as_slice(), rv.as_slice()].concat()));
    let (y, idx) = max_pool_forward(&x, 3, 2, 1).unwrap();
    let dx = max_pool_backward(x.shape(), &idx, &tensor(y.shape(), 8)).unwrap();
    out.push(("max pool y".into(), y.as_slice().to_vec()));
    out.push(("max pool dx".into(), dx.as_slice().to_vec()));
    let y = global_avg_pool_forward(&x).unwrap();
    let dx = global_avg_pool_backward(&x, &tensor(y.shape(), 9)).unwrap();
    out.push(("avg pool y".into(), y.as_slice().to_vec()));
    out.push(("avg pool dx".into(), dx.as_slice().to_vec()));
    let r = relu_forward(&x).unwrap();
    out.push(("relu".into(), r.as_slice().to_vec()));
    out.push(("relu backward".into(), relu_backward(&r, &res).unwrap().as_slice().to_vec()));
    out.push(("add".into(), add_forward(&x, &res).unwrap().as_slice().to_vec()));
    out
}

const KERNELS: [&str; 8] = [
    "swav_tensor::ops::winograd::input_tile",
    "swav_tensor::ops::winograd::output_transform",
    "swav_tensor::ops::winograd::output_grad_tile",
    "swav_tensor::ops::winograd::combine_planes",
    "swav_tensor::ops::batchnorm::normalize_rows",
    "swav_tensor::ops::batchnorm::input_grad",
    "swav_tensor::ops::pool::max_pool_image",
    "swav_tensor::ops::elementwise::mask_by",
];

#[test]
fn every_instruction_set_gives_the_baseline_bits() {
    let levels: Vec<Isa> = Isa::ALL.into_iter().filter(|&i| i <= available()).collect();
    let mut base: Option<Vec<(String, Vec<f32>)>> = None;
    for isa in levels {
        let got = with_isa(isa, 2, run_kernels).unwrap();
        let table = used();
        for k in KERNELS {
            let level = table.iter().find(|(n, _)| *n == k).map(|(_, l)| *l);
            assert_eq!(level, Some(isa), "kernel {k} at {isa}");
        }
        match &base {
            None => base = Some(got),
            Some(want) => {
                for ((name, g), (_, w)) in got.iter().zip(want) {
                    assert!(!w.is_empty() || name.contains("dres"), "{name}: empty");
                    let differ = g.iter().zip(w).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert!(
                        g.len() == w.len() && differ == 0,
                        "{name} at {isa}: {differ} of {} values differ",
                        w.len()
                    );
                }
            }
        }
    }
    println!("levels tested up to {}", available());
}
