//! The runtime of one CUDA device: memory, kernel launches, cuDNN and cuBLAS calls, all in stream
//! order on the device's compute stream, behind a small [`Backend`] trait with two implementations:
//! the real one (module `driver`, cudarc with dynamic loading, feature `cuda`) and an emulated one
//! (module `emulated`, feature `emulate`: host memory, kernels on the CPU emulator, cuDNN/cuBLAS calls
//! executed by the CPU engine through their descriptors). Everything above the trait (tensors on the
//! device, every op's device path, a whole training step) is the same code for both, so the emulated
//! device tests all of it on a machine without a GPU; only the backend's calls into the libraries are
//! left to the GPU check script.
//!
//! Memory: a caching allocator keyed by size, with three pools ([`Pool`]). Freed blocks wait for the
//! next request of their size, so a training step, which allocates the same sizes in the same order
//! every iteration, reaches a steady state with no calls into the driver and the same addresses every
//! step (what CUDA graph capture needs). Frees are stream-ordered: a block is reused only by work
//! queued after the free. Uploaded batches are the exception: they are copied on a second stream so
//! that the copy overlaps the step before, and a block of theirs is reused only once the compute
//! stream has passed the point where it was freed (a [`Fence`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use crate::cuda::calls::{ConvCall, GemmCall};
use crate::cuda::plan::{Arg, BufId, ConstData, Launch, Plan, Role};
use crate::cuda::Source;
use crate::error::TensorError;
use crate::Result;

/// A device address.
pub type DevPtr = u64;

/// A kernel argument with its buffer resolved to an address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LaunchArg {
    /// A device address (0 for a null pointer).
    Ptr(DevPtr),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
}

/// The addresses of a convolution call's three tensors (`x`, `w`, `y` as the call describes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPtrs {
    /// Input or its gradient.
    pub x: DevPtr,
    /// Filter or its gradient.
    pub w: DevPtr,
    /// Output or its gradient.
    pub y: DevPtr,
}

/// A point in the compute stream's queued work (a CUDA event), which a copy on the copy stream waits
/// for. Empty where the backend has one stream (the emulated device), or the point has passed.
#[derive(Default)]
pub struct Fence(pub Option<Box<dyn std::any::Any + Send>>);

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Fence(set)" } else { "Fence(none)" })
    }
}

/// What a device must do; everything is queued on its compute stream, in call order (uploads made
/// with [`Backend::upload_after`] on its copy stream).
pub trait Backend: Send + Sync {
    /// Human-readable description (name, compute capability, libraries).
    fn describe(&self) -> String;
    /// A new block of `bytes` (the caching allocator above calls this only on a miss).
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// Returns a block to the device.
    fn free(&self, ptr: DevPtr, bytes: usize);
    /// Copies host bytes to the device (the host buffer may be reused when this returns).
    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// A fence after the work queued so far on the compute stream. The default has one stream:
    /// nothing to wait for.
    fn fence(&self) -> Result<Fence> {
        Ok(Fence(None))
    }
    /// Copies host bytes to `dst` on the copy stream, once the compute stream has passed `after`
    /// (the last use of `dst`); work queued on the compute stream afterwards waits for the copy, and
    /// the host buffer may be reused when this returns. The default: [`Backend::upload`].
    fn upload_after(&self, dst: DevPtr, src: &[u8], after: &Fence) -> Result<()> {
        let _ = after;
        self.upload(dst, src)
    }
    /// Copies device bytes to the host, waiting for the work queued before.
    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Starts copying `bytes` device bytes to the host behind the work queued before; they are read
    /// when the result is waited for, so the host need not wait now. The default copies at once.
    fn download_later(&self, src: DevPtr, bytes: usize) -> Result<PendingDownload> {
        let mut out = vec![0u8; bytes];
        self.download(src, &mut out)?;
        Ok(PendingDownload::ready(out))
    }
    /// Device-to-device copy.
    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Sets `bytes` bytes to zero.
    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()>;
    /// Launches a kernel of `source`.
    fn launch(&self, source: &Source, launch: &Launch, args: &[LaunchArg]) -> Result<()>;
    /// A cuDNN convolution.
    fn conv(&self, call: &ConvCall, ptrs: ConvPtrs) -> Result<()>;
    /// A cuBLAS GEMM: `c = alpha op(a) op(b) + beta c`.
    fn gemm(&self, call: &GemmCall, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()>;
    /// Waits for everything queued.
    fn synchronize(&self) -> Result<()>;
    /// The backend itself, for code that needs the real device's handles (e.g. its cudarc stream, to
    /// run another crate's kernels on it).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Bytes on their way from the device to the host (see [`Backend::download_later`]).
pub struct PendingDownload(Box<dyn FnOnce() -> Result<Vec<u8>> + Send>);

impl PendingDownload {
    /// Bytes that are already on the host.
    pub fn ready(bytes: Vec<u8>) -> PendingDownload {
        PendingDownload(Box::new(move || Ok(bytes)))
    }

    /// Bytes that `wait` brings (a backend's copy in flight).
    pub fn later(wait: impl FnOnce() -> Result<Vec<u8>> + Send + 'static) -> PendingDownload {
        PendingDownload(Box::new(wait))
    }

    /// Waits for the copy and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        (self.0)()
    }
}

impl std::fmt::Debug for PendingDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingDownload")
    }
}

/// Blocks are rounded up to this many bytes, so that sizes that differ a little share blocks.
const GRANULE: usize = 512;

/// Which cache a block comes from and goes back to. Blocks are never split or moved between pools,
/// so the per-step blocks (activations, scratch, the uploaded batch) are the same addresses every step
/// and the long-lived ones (weights, gradients, running statistics) never fragment them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Everything allocated outside a step: the model's tensors, buffers made once.
    Persistent,
    /// What a training step allocates ([`DeviceRuntime::in_step`]).
    Step,
    /// Uploaded batches ([`crate::Tensor::upload`]): copied on the copy stream, each free block with
    /// the fence of its last use.
    Upload,
}

/// One CUDA device with its caching allocator.
pub struct DeviceRuntime {
    ordinal: usize,
    backend: Box<dyn Backend>,
    /// Free blocks by rounded size: `[persistent, step]`.
    free_blocks: Mutex<[BTreeMap<usize, Vec<DevPtr>>; 2]>,
    /// Free upload blocks by rounded size, each with the fence of its last use.
    free_uploads: Mutex<BTreeMap<usize, Vec<(DevPtr, Fence)>>>,
    /// How many [`StepScope`]s are open: allocations go to the step pool while one is.
    step_depth: std::sync::atomic::AtomicUsize,
    stats: Mutex<AllocStats>,
}

/// While alive, the allocations of its runtime come from the per-step pool ([`DeviceRuntime::in_step`]).
#[must_use = "the step pool is used only while the scope lives"]
pub struct StepScope {
    rt: Arc<DeviceRuntime>,
}

impl Drop for StepScope {
    fn drop(&mut self) {
        self.rt.step_depth.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the allocator did (for the benchmark's memory report and for tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes handed out and not yet returned.
    pub in_use: usize,
    /// The most bytes in use at once.
    pub peak: usize,
    /// Bytes held by the allocator (in use or cached).
    pub reserved: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went to the device.
    pub misses: u64,
    /// Of `reserved`, the bytes of the per-step and upload pools.
    pub step_reserved: usize,
}

impl std::fmt::Debug for DeviceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceRuntime(cuda:{} {})", self.ordinal, self.backend.describe())
    }
}

impl DeviceRuntime {
    /// A runtime for device `ordinal` over `backend`.
    pub fn new(ordinal: usize, backend: Box<dyn Backend>) -> DeviceRuntime {
        DeviceRuntime {
            ordinal,
            backend,
            free_blocks: Mutex::new([BTreeMap::new(), BTreeMap::new()]),
            free_uploads: Mutex::new(BTreeMap::new()),
            step_depth: std::sync::atomic::AtomicUsize::new(0),
            stats: Mutex::new(AllocStats::default()),
        }
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The backend (for the calls the ops make).
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// What the allocator did so far.
    pub fn stats(&self) -> AllocStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Until the returned scope is dropped, allocations on this runtime come from the per-step pool
    /// (the training step holds one; the training thread is the only one that allocates).
    pub fn in_step(self: &Arc<Self>) -> StepScope {
        self.step_depth.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StepScope { rt: self.clone() }
    }

    /// The pool an allocation made now comes from.
    pub fn current_pool(&self) -> Pool {
        if self.step_depth.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            Pool::Step
        } else {
            Pool::Persistent
        }
    }

    /// A block of at least `bytes` bytes (contents unspecified), from the current pool's cache when
    /// one of its size waits there.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let size = bytes.max(1).div_ceil(GRANULE) * GRANULE;
        let pool = self.current_pool();
        let cached =
            self.free_blocks.lock().unwrap_or_else(|e| e.into_inner())[pool as usize].get_mut(&size).and_then(Vec::pop);
        let ptr = self.take(cached, size, pool)?;
        Ok(DeviceBuffer { rt: self.clone(), ptr, bytes, size, pool })
    }

    /// A block of the upload pool of at least `bytes` bytes, with the fence the copy into it must
    /// wait for (that of its last use, for a cached block).
    pub fn alloc_upload(self: &Arc<Self>, bytes: usize) -> Result<(DeviceBuffer, Fence)> {
        let size = bytes.max(1).div_ceil(GRANULE) * GRANULE;
        let cached = self.free_uploads.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&size).and_then(Vec::pop);
        let (cached, fence) = match cached {
            Some((p, f)) => (Some(p), f),
            None => (None, Fence(None)),
        };
        let ptr = self.take(cached, size, Pool::Upload)?;
        Ok((DeviceBuffer { rt: self.clone(), ptr, bytes, size, pool: Pool::Upload }, fence))
    }

    /// `cached`, or a new block of `size` bytes from the device; counted in the statistics.
    fn take(&self, cached: Option<DevPtr>, size: usize, pool: Pool) -> Result<DevPtr> {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = match cached {
            Some(p) => {
                stats.hits += 1;
                p
            }
            None => {
                drop(stats);
                let p = match self.backend.alloc(size) {
                    Ok(p) => p,
                    Err(_) => {
                        // Out of memory: give the cached blocks back to the device and try once more.
                        self.release_cached();
                        self.backend.alloc(size)?
                    }
                };
                stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                stats.misses += 1;
                stats.reserved += size;
                if pool != Pool::Persistent {
                    stats.step_reserved += size;
                }
                p
            }
        };
        stats.in_use += size;
        stats.peak = stats.peak.max(stats.in_use);
        Ok(ptr)
    }

    /// Returns every cached block (of every pool) to the device.
    pub fn release_cached(&self) {
        let [persistent, step] = std::mem::take(&mut *self.free_blocks.lock().unwrap_or_else(|e| e.into_inner()));
        // Frees are stream-ordered on the compute stream, after the upload blocks' fences.
        let uploads = std::mem::take(&mut *self.free_uploads.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|(size, blocks)| (size, blocks.into_iter().map(|(p, _fence)| p).collect::<Vec<_>>()));
        let all = persistent
            .into_iter()
            .map(|b| (Pool::Persistent, b))
            .chain(step.into_iter().map(|b| (Pool::Step, b)))
            .chain(uploads.map(|b| (Pool::Upload, b)));
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for (pool, (size, ptrs)) in all {
            for p in ptrs {
                self.backend.free(p, size);
                stats.reserved -= size;
                if pool != Pool::Persistent {
                    stats.step_reserved -= size;
                }
            }
        }
    }

    fn give_back(&self, ptr: DevPtr, size: usize, pool: Pool) {
        if pool == Pool::Upload {
            // The next copy into this block waits for the work queued so far (its last readers); if
            // no fence can be made, for everything.
            let fence = self.backend.fence().unwrap_or_else(|_| {
                let _ = self.backend.synchronize();
                Fence(None)
            });
            self.free_uploads.lock().unwrap_or_else(|e| e.into_inner()).entry(size).or_default().push((ptr, fence));
        } else {
            self.free_blocks.lock().unwrap_or_else(|e| e.into_inner())[pool as usize]
                .entry(size)
                .or_default()
                .push(ptr);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.in_use -= size;
    }

    /// Runs the launches of `plan` (kernels of `source`) with its named buffers bound to `bindings`;
    /// the plan's scratch and constant buffers are allocated here for the duration of the plan.
    pub fn run(self: &Arc<Self>, source: &Source, plan: &Plan, bindings: &[(BufId, DevPtr)]) -> Result<()> {
        plan.validate().map_err(|e| TensorError::Device(format!("{}: invalid plan: {e}", source.name)))?;
        let mut addr: HashMap<BufId, DevPtr> = HashMap::new();
        let mut own = Vec::new();
        for b in &plan.buffers {
            let bound = bindings.iter().find(|(id, _)| *id == b.id).map(|&(_, p)| p);
            let ptr = match (&b.role, bound) {
                (Role::Const(_), Some(_)) => {
                    return Err(TensorError::Device(format!("{}: {:?} is a constant of the plan", source.name, b.id)))
                }
                (Role::Const(data), None) => {
                    let bytes: Vec<u8> = match data {
                        ConstData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        ConstData::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    };
                    let buf = self.alloc(bytes.len())?;
                    self.backend.upload(buf.ptr, &bytes)?;
                    let p = buf.ptr;
                    own.push(buf);
                    p
                }
                (Role::Scratch, None) => {
                    let buf = self.alloc(b.len * dtype_size(b.dtype))?;
                    let p = buf.ptr;
                    own.push(buf);
                    p
                }
                (_, Some(p)) => p,
                (_, None) => {
                    return Err(TensorError::Device(format!("{}: buffer {:?} is not bound", source.name, b.id)))
                }
            };
            addr.insert(b.id, ptr);
        }
        for l in &plan.launches {
            let args: Vec<LaunchArg> = l
                .args
                .iter()
                .map(|a| match *a {
                    Arg::Buf(id) => LaunchArg::Ptr(addr[&id]),
                    Arg::Null => LaunchArg::Ptr(0),
                    Arg::I32(v) => LaunchArg::I32(v),
                    Arg::U32(v) => LaunchArg::U32(v),
                    Arg::F32(v) => LaunchArg::F32(v),
                    Arg::I64(v) => LaunchArg::I64(v),
                    Arg::U64(v) => LaunchArg::U64(v),
                })
                .collect();
            self.backend.launch(source, l, &args)?;
        }
        // Scratch goes back to the cache in stream order: later work may reuse it.
        drop(own);
        Ok(())
    }
}

/// Bytes per element of a plan buffer type.
pub fn dtype_size(d: crate::cuda::plan::DType) -> usize {
    use crate::cuda::plan::DType;
    match d {
        DType::F32 | DType::I32 | DType::U32 => 4,
        DType::Bf16 => 2,
        DType::U8 => 1,
        DType::U64 => 8,
    }
}

/// A block of device memory, returned to its runtime's cache when dropped.
pub struct DeviceBuffer {
    rt: Arc<DeviceRuntime>,
    ptr: DevPtr,
    bytes: usize,
    size: usize,
    pool: Pool,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer(cuda:{} {:#x}, {} bytes)", self.rt.ordinal, self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    /// Its address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// Bytes asked for.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The runtime it belongs to.
    pub fn runtime(&self) -> &Arc<DeviceRuntime> {
        &self.rt
    }

    /// The pool it came from and goes back to.
    pub fn pool(&self) -> Pool {
        self.pool
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.rt.give_back(self.ptr, self.size, self.pool);
    }
}

/// The runtimes of this process, by ordinal: a device is opened once and shared by every tensor on it.
fn registry() -> &'static Mutex<HashMap<usize, Arc<DeviceRuntime>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<usize, Arc<DeviceRuntime>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The runtime of device `ordinal`: the one registered, else the real device opened now (feature
/// `cuda`), else an error that says what is missing.
pub fn runtime(ordinal: usize) -> Result<Arc<DeviceRuntime>> {
    if let Some(rt) = registry().lock().unwrap_or_else(|e| e.into_inner()).get(&ordinal) {
        return Ok(rt.clone());
    }
    let backend = open_backend(ordinal)?;
    let rt = Arc::new(DeviceRuntime::new(ordinal, backend));
    Ok(registry().lock().unwrap_or_else(|e| e.into_inner()).entry(ordinal).or_insert(rt).clone())
}

/// Makes `backend` the device `ordinal` of this process (tests register an emulated device this way).
/// Fails if a device of that ordinal is open already.
pub fn register(ordinal: usize, backend: Box<dyn Backend>) -> Result<Arc<DeviceRuntime>> {
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    if reg.contains_key(&ordinal) {
        return Err(TensorError::Device(format!("cuda:{ordinal} is open already")));
    }
    let rt = Arc::new(DeviceRuntime::new(ordinal, backend));
    reg.insert(ordinal, rt.clone());
    Ok(rt)
}

#[cfg(feature = "cuda")]
fn open_backend(ordinal: usize) -> Result<Box<dyn Backend>> {
    Ok(Box::new(crate::cuda::driver::DriverBackend::open(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn open_backend(ordinal: usize) -> Result<Box<dyn Backend>> {
    Err(TensorError::Device(format!(
        "cuda:{ordinal}: this build of swav-tensor has no CUDA support (build with the `cuda` feature, as xtask does by default)"
    )))
}
