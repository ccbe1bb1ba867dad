//! The real CUDA device, through cudarc with dynamic loading (no CUDA toolkit is needed to build; the
//! driver, NVRTC, cuBLAS and cuDNN are loaded when a device is opened, with an error naming whichever
//! is missing). One context, event tracking off (graph capture needs it), one compute stream on which
//! every allocation, copy, kernel and library call of this backend is queued; kernels compiled by
//! NVRTC to a cubin for the device's own architecture (`sm_XY` from its compute capability), with PTX
//! for the lowest supported architecture as the fallback when this NVRTC does not know the device.
//!
//! cuDNN: descriptors are built from [`ConvCall`]s (NHWC activations, KRSC filters, fp32 compute,
//! tensor-op math); the algorithms of each (call, pass) are measured once by cuDNN (`cudnnFind*`;
//! its heuristics when that fails, or with `SWAV_CUDNN_SEARCH=heuristic`), cached, and the next
//! candidate is tried when one fails. cuBLAS gets an explicit workspace of its own at open (it would
//! otherwise allocate one on first use, which CUDA graph capture forbids).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::cudnn::{result as dnn, sys as dnn_sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};

use crate::cuda::calls::{ConvCall, ConvPass, GemmCall};
use crate::cuda::pinned::{synchronous_copies, Event, PinnedDownload, Staging};
use crate::cuda::plan::{Launch, Storage};
use crate::cuda::runtime::{Backend, ConvPtrs, DevPtr, Fence, LaunchArg, PendingDownload};
use crate::cuda::{nvrtc, Source};
use crate::error::TensorError;
use crate::Result;

/// The most workspace a convolution algorithm may ask for.
const MAX_WORKSPACE: usize = 256 << 20;
/// cuBLAS's workspace (what PyTorch gives it on Hopper: 32 MiB).
const CUBLAS_WORKSPACE: usize = 32 << 20;

fn err(what: impl std::fmt::Display) -> TensorError {
    TensorError::Device(format!("cuda: {what}"))
}

/// Library handles and caches, used by one thread at a time (the mutex), as cuDNN and cuBLAS require.
struct Handles {
    cublas: blas_sys::cublasHandle_t,
    cudnn: dnn_sys::cudnnHandle_t,
    modules: HashMap<&'static str, drv_sys::CUmodule>,
    functions: HashMap<(&'static str, &'static str), drv_sys::CUfunction>,
    /// Ranked algorithms of each convolution call (key: the call's debug text).
    algos: HashMap<String, Vec<(i32, usize)>>,
    workspace: (DevPtr, usize),
    staging: Staging,
}

/// The real device.
pub struct DriverBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Uploads of loader batches ([`Backend::upload_after`]), so that they overlap compute.
    copy_stream: Arc<CudaStream>,
    arch: String,
    name: String,
    handles: Mutex<Handles>,
}

// SAFETY: the raw handles are only used with the `handles` mutex held, on the one stream of this
// backend; cudarc's context and stream are themselves Send + Sync.
unsafe impl Send for DriverBackend {}
// SAFETY: as above.
unsafe impl Sync for DriverBackend {}

impl DriverBackend {
    /// Opens device `ordinal`: driver, context, stream, cuBLAS and cuDNN handles bound to the stream.
    pub fn open(ordinal: usize) -> Result<DriverBackend> {
        let present = |what: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(err(format!(
                    "{what} could not be loaded: put the CUDA libraries on the library path (scripts/gpu-env.sh finds them); `cargo xtask doctor` says what is found"
                )))
            }
        };
        // SAFETY: each only tries to dlopen its library.
        present(
            "the CUDA driver (libcuda.so)",
            std::panic::catch_unwind(|| unsafe { drv_sys::is_culib_present() }).unwrap_or(false),
        )?;
        let ctx = CudaContext::new(ordinal).map_err(|e| err(format!("no CUDA device {ordinal}: {e}")))?;
        // SAFETY: disabling event tracking is what stream capture requires; this backend orders all
        // work on one stream itself.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err)?;
        let copy_stream = ctx.new_stream().map_err(err)?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let name = ctx.name().map_err(err)?;
        present(
            "cuBLAS (libcublas.so)",
            std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false),
        )?;
        present(
            "cuDNN (libcudnn.so)",
            std::panic::catch_unwind(|| unsafe { dnn_sys::is_culib_present() }).unwrap_or(false),
        )?;
        nvrtc::available().map_err(err)?;
        let cublas = blas::create_handle().map_err(|e| err(format!("cublasCreate: {e:?}")))?;
        let cudnn = dnn::create_handle().map_err(|e| err(format!("cudnnCreate: {e:?}")))?;
        // SAFETY: fresh handles, bound to this backend's live stream; the cuBLAS workspace is a block
        // of its own, allocated on that stream and complete before cuBLAS is handed it (never freed: a
        // device stays open for the life of the process, as the runtime registry keeps it).
        unsafe {
            blas::set_stream(cublas, stream.cu_stream() as _).map_err(|e| err(format!("cublasSetStream: {e:?}")))?;
            dnn::set_stream(cudnn, stream.cu_stream() as _).map_err(|e| err(format!("cudnnSetStream: {e:?}")))?;
            let ws = drv::malloc_async(stream.cu_stream(), CUBLAS_WORKSPACE)
                .map_err(|e| err(format!("allocating cuBLAS's workspace: {e}")))?;
            stream.synchronize().map_err(err)?;
            blas_sys::cublasSetWorkspace_v2(cublas, ws as *mut c_void, CUBLAS_WORKSPACE)
                .result()
                .map_err(|e| err(format!("cublasSetWorkspace: {e:?}")))?;
        }
        Ok(DriverBackend {
            ctx,
            stream,
            copy_stream,
            arch: format!("sm_{major}{minor}"),
            name,
            handles: Mutex::new(Handles {
                cublas,
                cudnn,
                modules: HashMap::new(),
                functions: HashMap::new(),
                algos: HashMap::new(),
                workspace: (0, 0),
                staging: Staging::default(),
            }),
        })
    }

    /// The compute stream every call of this backend is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cu_stream(&self) -> drv_sys::CUstream {
        self.stream.cu_stream()
    }

    /// The function `kernel` of `source`, compiled and loaded on first use.
    fn function(&self, h: &mut Handles, source: &Source, kernel: &'static str) -> Result<drv_sys::CUfunction> {
        if let Some(&f) = h.functions.get(&(source.name, kernel)) {
            return Ok(f);
        }
        if !h.modules.contains_key(source.name) {
            self.ctx.bind_to_thread().map_err(err)?;
            let image = match nvrtc::compile(source, &self.arch) {
                Ok(c) => c.cubin,
                // An NVRTC older than the device: PTX for the oldest supported architecture, which the
                // driver compiles for the device.
                Err(cubin_err) => nvrtc::compile_ptx(source, "compute_80").map_err(|e| {
                    err(format!("{}: no cubin for {} ({cubin_err}) and no PTX ({e})", source.name, self.arch))
                })?,
            };
            // SAFETY: a complete cubin or NUL-terminated PTX image from NVRTC.
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| err(format!("loading {}: {e}", source.name)))?;
            h.modules.insert(source.name, module);
        }
        let module = h.modules[source.name];
        let cname = CString::new(kernel).map_err(|_| err("kernel name with a NUL byte"))?;
        // SAFETY: a loaded module.
        let f = unsafe { drv::module::get_function(module, cname) }
            .map_err(|e| err(format!("{kernel} in {}: {e}", source.name)))?;
        h.functions.insert((source.name, kernel), f);
        Ok(f)
    }

    fn workspace(&self, h: &mut Handles, bytes: usize) -> Result<DevPtr> {
        if h.workspace.1 < bytes {
            if h.workspace.0 != 0 {
                // SAFETY: our own block, freed in stream order.
                unsafe { drv::free_async(h.workspace.0, self.cu_stream()) }.map_err(err)?;
            }
            // SAFETY: a stream-ordered allocation on our stream.
            let p = unsafe { drv::malloc_async(self.cu_stream(), bytes) }.map_err(err)?;
            h.workspace = (p, bytes);
        }
        Ok(h.workspace.0)
    }
}

fn dnn_type(s: Storage) -> dnn_sys::cudnnDataType_t {
    match s {
        Storage::F32 => dnn_sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        Storage::Bf16 => dnn_sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

fn blas_type(s: Storage) -> blas_sys::cudaDataType {
    match s {
        Storage::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        Storage::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

fn c_int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("dimension {v} exceeds what the libraries take")))
}

/// cuDNN descriptors of one call, destroyed when dropped.
struct ConvDescriptors {
    x: dnn_sys::cudnnTensorDescriptor_t,
    w: dnn_sys::cudnnFilterDescriptor_t,
    y: dnn_sys::cudnnTensorDescriptor_t,
    conv: dnn_sys::cudnnConvolutionDescriptor_t,
}

impl ConvDescriptors {
    fn new(call: &ConvCall) -> Result<ConvDescriptors> {
        let e = |what: &str, x: dnn::CudnnError| err(format!("{what}: {x:?}"));
        let tensor = |d: &crate::cuda::calls::TensorDesc| -> Result<dnn_sys::cudnnTensorDescriptor_t> {
            let t = dnn::create_tensor_descriptor().map_err(|x| e("cudnnCreateTensorDescriptor", x))?;
            let dims = [c_int(d.dims[0])?, c_int(d.dims[1])?, c_int(d.dims[2])?, c_int(d.dims[3])?];
            let strides = [c_int(d.strides[0])?, c_int(d.strides[1])?, c_int(d.strides[2])?, c_int(d.strides[3])?];
            // SAFETY: a fresh descriptor.
            unsafe { dnn::set_tensor4d_descriptor_ex(t, dnn_type(d.storage), dims, strides) }
                .map_err(|x| e("cudnnSetTensor4dDescriptorEx", x))?;
            Ok(t)
        };
        let x = tensor(&call.x)?;
        let y = tensor(&call.y)?;
        let w = dnn::create_filter_descriptor().map_err(|x| e("cudnnCreateFilterDescriptor", x))?;
        let f = &call.w;
        // SAFETY: a fresh descriptor; NHWC filters are stored KRSC.
        unsafe {
            dnn::set_filter4d_descriptor(
                w,
                dnn_type(f.storage),
                dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [c_int(f.k)?, c_int(f.c)?, c_int(f.r)?, c_int(f.s)?],
            )
        }
        .map_err(|x| e("cudnnSetFilter4dDescriptor", x))?;
        let conv = dnn::create_convolution_descriptor().map_err(|x| e("cudnnCreateConvolutionDescriptor", x))?;
        let c = &call.conv;
        // SAFETY: a fresh descriptor.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv,
                c_int(c.pad[0])?,
                c_int(c.pad[1])?,
                c_int(c.stride[0])?,
                c_int(c.stride[1])?,
                c_int(c.dilation[0])?,
                c_int(c.dilation[1])?,
                dnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                dnn_sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|x| e("cudnnSetConvolution2dDescriptor", x))?;
            let math = if c.tensor_ops {
                dnn_sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else {
                dnn_sys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            dnn::set_convolution_math_type(conv, math).map_err(|x| e("cudnnSetConvolutionMathType", x))?;
        }
        Ok(ConvDescriptors { x, w, y, conv })
    }
}

impl Drop for ConvDescriptors {
    fn drop(&mut self) {
        // SAFETY: descriptors created by `new`, destroyed once.
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// One algorithm cuDNN offers for a call.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    algo: i32,
    workspace: usize,
    deterministic: bool,
}

/// How the algorithms of a call are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Search {
    /// cuDNN runs every algorithm on the call's shapes and ranks them by time (`cudnnFind*`).
    Measure,
    /// cuDNN's heuristics rank them without running anything (`cudnnGet*_v7`).
    Heuristic,
}

/// The search `SWAV_CUDNN_SEARCH` asks for: `heuristic`, or measurement (the default).
fn search_mode() -> Search {
    match std::env::var("SWAV_CUDNN_SEARCH").as_deref() {
        Ok("heuristic") => Search::Heuristic,
        _ => Search::Measure,
    }
}

/// The successful entries of a cuDNN perf-result array, in cuDNN's order.
macro_rules! candidates {
    ($perf:expr, $count:expr) => {
        $perf[..($count.max(0) as usize).min($perf.len())]
            .iter()
            .filter(|p| p.status == dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
            .map(|p| Candidate {
                algo: p.algo as i32,
                workspace: p.memory,
                deterministic: p.determinism == dnn_sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            })
            .collect::<Vec<_>>()
    };
}

/// cuDNN's algorithms for a call, ranked by `search`.
///
/// # Safety
/// `h` and `d` must be live and describe `call`.
unsafe fn offered(h: &Handles, call: &ConvCall, d: &ConvDescriptors, search: Search) -> Result<Vec<Candidate>> {
    const N: usize = 8;
    let mut count = 0;
    // One pass: its perf-result type, its `cudnnFind*` and `cudnnGet*_v7` entry points (the same
    // arguments), and its three descriptors in cuDNN's order.
    macro_rules! rank {
        ($perf:ty, $find:ident, $get:ident, $a:expr, $b:expr, $c:expr) => {{
            let mut perf = [std::mem::zeroed::<$perf>(); N];
            let (name, s) = match search {
                Search::Measure => (
                    stringify!($find),
                    dnn_sys::$find(h.cudnn, $a, $b, d.conv, $c, N as i32, &mut count, perf.as_mut_ptr()),
                ),
                Search::Heuristic => (
                    stringify!($get),
                    dnn_sys::$get(h.cudnn, $a, $b, d.conv, $c, N as i32, &mut count, perf.as_mut_ptr()),
                ),
            };
            if s != dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                return Err(err(format!("{name}: {s:?}")));
            }
            candidates!(perf, count)
        }};
    }
    // SAFETY (all calls): live handle and descriptors (the caller's contract); each result array
    // holds N entries.
    Ok(match call.pass {
        ConvPass::Forward => rank!(
            dnn_sys::cudnnConvolutionFwdAlgoPerf_t,
            cudnnFindConvolutionForwardAlgorithm,
            cudnnGetConvolutionForwardAlgorithm_v7,
            d.x,
            d.w,
            d.y
        ),
        ConvPass::BackwardData => rank!(
            dnn_sys::cudnnConvolutionBwdDataAlgoPerf_t,
            cudnnFindConvolutionBackwardDataAlgorithm,
            cudnnGetConvolutionBackwardDataAlgorithm_v7,
            d.w,
            d.y,
            d.x
        ),
        ConvPass::BackwardFilter => rank!(
            dnn_sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            cudnnFindConvolutionBackwardFilterAlgorithm,
            cudnnGetConvolutionBackwardFilterAlgorithm_v7,
            d.x,
            d.y,
            d.w
        ),
    })
}

/// The algorithms to try for a call, best first: measured once (cuDNN runs each on scratch memory of
/// its own), or ranked by the heuristics when measuring fails or is turned off; those that need more
/// than [`MAX_WORKSPACE`] dropped; deterministic ones first (each group in cuDNN's order), so that a
/// run repeats itself bit for bit wherever cuDNN has a deterministic algorithm for the shape.
fn rank_algorithms(h: &Handles, call: &ConvCall, d: &ConvDescriptors) -> Result<Vec<(i32, usize)>> {
    // A library without the entry point panics in the loader: treat that as a failed measurement.
    let measured = match search_mode() {
        Search::Measure => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: live handle and descriptors of `call`.
            unsafe { offered(h, call, d, Search::Measure) }
        }))
        .unwrap_or_else(|_| Err(err("cuDNN has no cudnnFind entry points"))),
        Search::Heuristic => Ok(Vec::new()),
    };
    let mut list = match measured {
        Ok(list) if !list.is_empty() => list,
        // SAFETY: as above.
        _ => unsafe { offered(h, call, d, Search::Heuristic)? },
    };
    list.retain(|c| c.workspace <= MAX_WORKSPACE);
    list.sort_by_key(|c| !c.deterministic);
    if list.is_empty() {
        return Err(err(format!("cuDNN offers no algorithm for {call:?}")));
    }
    Ok(list.into_iter().map(|c| (c.algo, c.workspace)).collect())
}

impl Backend for DriverBackend {
    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.arch)
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.ctx.bind_to_thread().map_err(err)?;
        // SAFETY: a stream-ordered allocation on our stream.
        unsafe { drv::malloc_async(self.cu_stream(), bytes) }.map_err(|e| err(format!("allocating {bytes} bytes: {e}")))
    }

    fn free(&self, ptr: DevPtr, _bytes: usize) {
        // SAFETY: a block this backend allocated, freed once, in stream order.
        let _ = unsafe { drv::free_async(ptr, self.cu_stream()) };
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(err)?;
        if !synchronous_copies() {
            // Through a page-locked staging block: the host buffer may be reused at once, and the host
            // does not wait for the work queued before.
            return self.lock().staging.upload(self.cu_stream(), dst, src);
        }
        // SAFETY: `dst` holds at least `src.len()` bytes; the copy completes before this returns, so
        // the host buffer may be reused.
        unsafe {
            drv::memcpy_htod_async(dst, src, self.cu_stream()).map_err(err)?;
            drv::stream::synchronize(self.cu_stream()).map_err(err)
        }
    }

    fn fence(&self) -> Result<Fence> {
        self.ctx.bind_to_thread().map_err(err)?;
        Ok(Fence(Some(Box::new(Event::after(self.cu_stream())?))))
    }

    fn upload_after(&self, dst: DevPtr, src: &[u8], after: &Fence) -> Result<()> {
        if synchronous_copies() {
            return self.upload(dst, src);
        }
        self.ctx.bind_to_thread().map_err(err)?;
        let copy = self.copy_stream.cu_stream();
        // The copy waits for the last use of `dst` on the compute stream, not for everything queued.
        if let Some(event) = after.0.as_ref().and_then(|e| e.downcast_ref::<Event>()) {
            event.wait_on(copy)?;
        }
        self.lock().staging.upload(copy, dst, src)?;
        // Compute queued from now on waits for the copy.
        Event::after(copy)?.wait_on(self.cu_stream())
    }

    fn download_later(&self, src: DevPtr, bytes: usize) -> Result<PendingDownload> {
        if synchronous_copies() {
            let mut out = vec![0u8; bytes];
            self.download(src, &mut out)?;
            return Ok(PendingDownload::ready(out));
        }
        let copy = PinnedDownload::start(self.ctx.clone(), self.cu_stream(), src, bytes)?;
        Ok(PendingDownload::later(move || copy.take()))
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: `src` holds at least `dst.len()` bytes; the stream is synchronised before `dst` is read.
        unsafe {
            drv::memcpy_dtoh_async(dst, src, self.cu_stream()).map_err(err)?;
            drv::stream::synchronize(self.cu_stream()).map_err(err)
        }
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        // SAFETY: both blocks hold at least `bytes` bytes.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.cu_stream()) }.map_err(err)
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        // SAFETY: `dst` holds at least `bytes` bytes.
        unsafe { drv::memset_d8_async(dst, 0, bytes, self.cu_stream()) }.map_err(err)
    }

    fn launch(&self, source: &Source, launch: &Launch, args: &[LaunchArg]) -> Result<()> {
        let mut h = self.lock();
        let f = self.function(&mut h, source, launch.kernel)?;
        // Each argument's value lives in this vector; the driver reads them through pointers.
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                LaunchArg::Ptr(p) => p,
                LaunchArg::I32(v) => v as u32 as u64,
                LaunchArg::U32(v) => v as u64,
                LaunchArg::F32(v) => v.to_bits() as u64,
                LaunchArg::I64(v) => v as u64,
                LaunchArg::U64(v) => v,
            })
            .collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        let [gx, gy, gz] = launch.grid;
        let [bx, by, bz] = launch.block;
        // SAFETY: the arguments match the kernel's signature (the plan tests check every launch against
        // the parsed signatures); 32-bit values sit in the low bytes of their u64 slot (little-endian).
        unsafe { drv::launch_kernel(f, (gx, gy, gz), (bx, by, bz), launch.shared_bytes, self.cu_stream(), &mut params) }
            .map_err(|e| err(format!("{} ({}): {e}", launch.kernel, source.name)))
    }

    fn conv(&self, call: &ConvCall, ptrs: ConvPtrs) -> Result<()> {
        call.validate()?;
        let mut h = self.lock();
        let d = ConvDescriptors::new(call)?;
        let key = format!("{call:?}");
        if !h.algos.contains_key(&key) {
            let ranked = rank_algorithms(&h, call, &d)?;
            h.algos.insert(key.clone(), ranked);
        }
        let (alpha, beta) = (call.alpha, call.beta);
        let candidates = h.algos[&key].clone();
        let mut last = None;
        for (i, &(algo, ws_bytes)) in candidates.iter().enumerate() {
            let ws = self.workspace(&mut h, ws_bytes.max(1))?;
            let (a, b) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
            // SAFETY: live handle and descriptors that match the buffers (validated call); the
            // workspace holds what the algorithm asked for. Algorithm values come from cuDNN itself.
            let r = unsafe {
                match call.pass {
                    ConvPass::Forward => dnn::convolution_forward(
                        h.cudnn,
                        a,
                        d.x,
                        ptrs.x as *const c_void,
                        d.w,
                        ptrs.w as *const c_void,
                        d.conv,
                        std::mem::transmute::<i32, dnn_sys::cudnnConvolutionFwdAlgo_t>(algo),
                        ws as *mut c_void,
                        ws_bytes,
                        b,
                        d.y,
                        ptrs.y as *mut c_void,
                    ),
                    ConvPass::BackwardData => dnn::convolution_backward_data(
                        h.cudnn,
                        a,
                        d.w,
                        ptrs.w as *const c_void,
                        d.y,
                        ptrs.y as *const c_void,
                        d.conv,
                        std::mem::transmute::<i32, dnn_sys::cudnnConvolutionBwdDataAlgo_t>(algo),
                        ws as *mut c_void,
                        ws_bytes,
                        b,
                        d.x,
                        ptrs.x as *mut c_void,
                    ),
                    ConvPass::BackwardFilter => dnn::convolution_backward_filter(
                        h.cudnn,
                        a,
                        d.x,
                        ptrs.x as *const c_void,
                        d.y,
                        ptrs.y as *const c_void,
                        d.conv,
                        std::mem::transmute::<i32, dnn_sys::cudnnConvolutionBwdFilterAlgo_t>(algo),
                        ws as *mut c_void,
                        ws_bytes,
                        b,
                        d.w,
                        ptrs.w as *mut c_void,
                    ),
                }
            };
            match r {
                Ok(()) => {
                    // Keep the algorithm that worked first in line.
                    if i > 0 {
                        let list = h.algos.get_mut(&key).expect("inserted above");
                        list.drain(..i);
                    }
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(err(format!("every cuDNN algorithm failed for {call:?}: {last:?}")))
    }

    fn gemm(&self, call: &GemmCall, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        call.validate()?;
        let h = self.lock();
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (call.alpha, call.beta);
        // SAFETY: the buffers hold the spans the (validated) call describes; fp32 scalars for a
        // CUBLAS_COMPUTE_32F computation.
        unsafe {
            blas::gemm_ex(
                h.cublas,
                op(call.trans_a),
                op(call.trans_b),
                c_int(call.m)?,
                c_int(call.n)?,
                c_int(call.k)?,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                blas_type(call.ab),
                c_int(call.lda)?,
                b as *const c_void,
                blas_type(call.ab),
                c_int(call.ldb)?,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas_type(call.c),
                c_int(call.ldc)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err(format!("cublasGemmEx {call:?}: {e:?}")))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(err)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
