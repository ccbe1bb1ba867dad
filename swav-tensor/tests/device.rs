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

/// A device that records its fences and which fence each upload waited for (the emulated device
/// underneath does the work).
struct Fenced {
    inner: swav_tensor::cuda::emulated::EmulatedBackend,
    /// Fences made so far; each carries its number.
    fences: std::sync::atomic::AtomicU64,
    /// The fence (number) each `upload_after` was given, in call order.
    waited: std::sync::Mutex<Vec<Option<u64>>>,
}

mod fenced {
    use super::Fenced;
    use swav_tensor::cuda::calls::{ConvCall, GemmCall};
    use swav_tensor::cuda::plan::Launch;
    use swav_tensor::cuda::runtime::{Backend, ConvPtrs, DevPtr, Fence, LaunchArg};
    use swav_tensor::cuda::Source;
    use swav_tensor::Result;

    impl Backend for Fenced {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn alloc(&self, bytes: usize) -> Result<DevPtr> {
            self.inner.alloc(bytes)
        }
        fn free(&self, ptr: DevPtr, bytes: usize) {
            self.inner.free(ptr, bytes)
        }
        fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
            self.inner.upload(dst, src)
        }
        fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
            self.inner.download(src, dst)
        }
        fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
            self.inner.copy(dst, src, bytes)
        }
        fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
            self.inner.zero(dst, bytes)
        }
        fn launch(&self, source: &Source, launch: &Launch, args: &[LaunchArg]) -> Result<()> {
            self.inner.launch(source, launch, args)
        }
        fn conv(&self, call: &ConvCall, ptrs: ConvPtrs) -> Result<()> {
            self.inner.conv(call, ptrs)
        }
        fn gemm(&self, call: &GemmCall, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
            self.inner.gemm(call, a, b, c)
        }
        fn synchronize(&self) -> Result<()> {
            self.inner.synchronize()
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn fence(&self) -> Result<Fence> {
            let n = self.fences.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Ok(Fence(Some(Box::new(n))))
        }
        fn upload_after(&self, dst: DevPtr, src: &[u8], after: &Fence) -> Result<()> {
            let n = after.0.as_ref().map(|f| *f.downcast_ref::<u64>().expect("one of our fences"));
            self.waited.lock().unwrap().push(n);
            self.inner.upload(dst, src)
        }
    }
}

/// Uploaded batches: their values arrive; a block of the upload pool is reused only behind the
/// fence made when it was freed (the point after its last readers on the compute stream), and never
/// given to the other pools.
#[test]
fn an_upload_block_is_reused_behind_the_fence_of_its_last_use() {
    use std::sync::atomic::Ordering;
    use swav_tensor::cuda::runtime::{register, Pool};
    if emulated_device().is_none() {
        return;
    }
    let backend = Fenced {
        inner: swav_tensor::cuda::emulated::EmulatedBackend::new(),
        fences: Default::default(),
        waited: Default::default(),
    };
    let rt = register(96, Box::new(backend)).expect("registered once");
    let fenced = || rt.backend().as_any().downcast_ref::<Fenced>().unwrap();
    let mut rng = Rng(11);
    let (a, b) = (rng.vec(3000, 0.0, 1.0), rng.vec(3000, 0.0, 1.0));
    let first = Tensor::upload(&rt, &[3, 1000], &a).unwrap();
    assert_eq!(first.device_pool(), Some(Pool::Upload));
    assert_eq!(first.to_vec(), a);
    let at = first.ptr();
    assert_eq!(*fenced().waited.lock().unwrap(), [None], "a new block waits for nothing");
    // Freed: a fence marks its last use. A step's block of that size does not take it.
    drop(first);
    assert_eq!(fenced().fences.load(Ordering::SeqCst), 1);
    {
        let _step = rt.in_step();
        let other = Tensor::device_zeros(&rt, &[3, 1000], DType::F32).unwrap();
        assert_ne!(other.ptr(), at, "the step pool took an upload block");
    }
    let second = Tensor::upload(&rt, &[3, 1000], &b).unwrap();
    assert_eq!((second.ptr(), second.to_vec()), (at, b), "the block is reused with the new values");
    assert_eq!(*fenced().waited.lock().unwrap(), [None, Some(1)], "the reuse waits for the fence of the free");
    assert!(Tensor::upload(&rt, &[3, 1000], &a[..10]).is_err(), "a length that does not fit the shape");
}
