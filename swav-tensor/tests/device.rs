//! Tensors on a CUDA device (the emulated one, and device 0 where there is one): moves between devices,
//! fills, accumulation, casts, cat and narrow give what the CPU gives.

mod common;

use common::{emulated_device, real_device, Rng};
use swav_tensor::{DType, Device, Tensor};

#[test]
fn tensors_move_between_devices_and_basic_ops_agree_with_the_cpu() {
    for dev in emulated_device().into_iter().chain(real_device()) {
        moves_and_basic_ops(dev);
    }
}

fn moves_and_basic_ops(dev: Device) {
    let mut rng = Rng(5);
    let a = Tensor::from_vec(&[3, 5], rng.vec(15, 0.0, 2.0)).unwrap();
    let b = Tensor::from_vec(&[3, 5], rng.vec(15, 1.0, 1.0)).unwrap();
    let (da, db) = (a.to_device(dev).unwrap(), b.to_device(dev).unwrap());
    assert_eq!(da.device(), dev);
    assert_eq!(da.to_vec(), a.to_vec(), "a round trip is exact");
    assert_eq!(da.to_device(Device::Cpu).unwrap().as_slice(), a.as_slice());

    let (mut sum, mut dsum) = (a.clone(), da.clone());
    sum.add_assign(&b).unwrap();
    dsum.add_assign(&db).unwrap();
    assert_eq!(dsum.to_vec(), sum.to_vec());
    sum.scale(-0.5);
    dsum.scale(-0.5);
    assert_eq!(dsum.to_vec(), sum.to_vec());
    let mut filled = Tensor::zeros(&[4, 2], dev);
    assert_eq!(filled.to_vec(), vec![0.0; 8]);
    filled.fill(2.5);
    assert_eq!(filled.to_vec(), vec![2.5; 8]);

    let cat = Tensor::cat(&[&a, &b, &a]).unwrap();
    let dcat = Tensor::cat(&[&da, &db, &da]).unwrap();
    assert_eq!(dcat.shape(), [9, 5]);
    assert_eq!(dcat.to_vec(), cat.to_vec());
    assert_eq!(dcat.narrow(2, 4).unwrap().to_vec(), cat.narrow(2, 4).unwrap().to_vec());
    assert!(Tensor::cat(&[&a, &da]).is_err(), "parts on different devices");

    // bf16: rounded to nearest even, widened back exactly.
    let half = da.to_dtype(DType::Bf16).unwrap();
    assert_eq!(half.dtype(), DType::Bf16);
    let back = half.to_dtype(DType::F32).unwrap().to_vec();
    for (x, y) in a.as_slice().iter().zip(&back) {
        assert_eq!(*y, swav_tensor::cuda::calls::swav_round_bf16(*x));
    }
    // Blocks go back to the allocator's cache and are reused.
    let rt = da.runtime().unwrap().clone();
    let before = rt.stats();
    drop(Tensor::zeros(&[1000], dev));
    drop(Tensor::zeros(&[1000], dev));
    let after = rt.stats();
    assert!(after.hits > before.hits, "{before:?} -> {after:?}");
}
