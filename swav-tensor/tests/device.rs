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

/// NCCL's device-memory path with one rank (the GPU check runs it): the communicator starts over the
/// host collective, and the grouped in-place all-reduce leaves a rank's own values as they are, in
/// their blocks. On the emulated device it is refused by name.
#[test]
fn nccl_reduces_device_tensors_in_place() {
    use std::sync::Arc;
    use swav_tensor::collective::nccl::NcclCollective;
    use swav_tensor::collective::SingleProcess;
    use swav_tensor::cuda::runtime::runtime;
    use swav_tensor::Collective;

    if let Some(Device::Cuda(i)) = emulated_device() {
        let e = NcclCollective::new(Arc::new(SingleProcess), runtime(i).unwrap()).unwrap_err().to_string();
        assert!(e.contains("real CUDA device"), "{e}");
    }
    let Some(Device::Cuda(i)) = real_device() else { return };
    if !swav_tensor::collective::nccl::available() {
        assert!(std::env::var("SWAV_REQUIRE_CUDA").as_deref() != Ok("1"), "SWAV_REQUIRE_CUDA=1 but no libnccl");
        eprintln!("SKIPPED: NCCL is not on the library path");
        return;
    }
    let nccl = NcclCollective::new(Arc::new(SingleProcess), runtime(i).unwrap()).expect("a one-rank communicator");
    assert!(nccl.reduces_device_memory() && nccl.world_size() == 1);
    let mut rng = Rng(3);
    let values: Vec<Vec<f32>> = [1usize, 1000, 70_000].iter().map(|&n| rng.vec(n, 0.0, 1.0)).collect();
    let mut tensors: Vec<Tensor> =
        values.iter().map(|v| Tensor::from_slice(&[v.len()], v).unwrap().to_device(Device::Cuda(i)).unwrap()).collect();
    let ptrs: Vec<u64> = tensors.iter().map(|t| t.ptr()).collect();
    nccl.all_reduce_sum_device(&mut tensors.iter_mut().collect::<Vec<_>>()).unwrap();
    for ((t, v), p) in tensors.iter().zip(&values).zip(&ptrs) {
        assert_eq!(t.ptr(), *p, "reduced in place");
        assert_eq!(&t.to_vec(), v, "one rank's sum is its own values");
    }
    // A CPU tensor is refused, not reduced.
    let mut host = Tensor::zeros(&[4], Device::Cpu);
    assert!(nccl.all_reduce_sum_device(&mut [&mut host]).is_err());
}

/// The allocator's two pools: a block freed by the persistent side is not handed to a step, and a
/// step's blocks come back at the same addresses in the next step.
#[test]
fn step_allocations_come_from_a_pool_of_their_own() {
    use swav_tensor::cuda::runtime::{runtime, Pool};
    let Some(dev @ Device::Cuda(i)) = emulated_device() else { return };
    let rt = runtime(i).unwrap();
    // A size no other test of this file uses.
    let n = 123_457;
    let persistent = Tensor::zeros(&[n], dev);
    assert_eq!(persistent.device_pool(), Some(Pool::Persistent));
    let kept = persistent.ptr();
    drop(persistent);
    let mut step_addrs = Vec::new();
    for _ in 0..2 {
        let _step = rt.in_step();
        let t = Tensor::zeros(&[n], dev);
        assert_eq!(t.device_pool(), Some(Pool::Step));
        assert_ne!(t.ptr(), kept, "a step took the persistent pool's free block");
        step_addrs.push(t.ptr());
    }
    assert_eq!(step_addrs[0], step_addrs[1], "the second step reuses the first one's block");
    let again = Tensor::zeros(&[n], dev);
    assert_eq!((again.device_pool(), again.ptr()), (Some(Pool::Persistent), kept));
    assert!(rt.stats().step_reserved >= 4 * n, "{:?}", rt.stats());
}
