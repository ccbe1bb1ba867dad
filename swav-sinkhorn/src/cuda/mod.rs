//! Sinkhorn-Knopp on CUDA, on the caller's stream and device buffers (no host round trip).
//!
//! The kernels (`kernels.cu`) are compiled with NVRTC the first time a context uses them and cached for
//! the life of the process. They compute the same quantities as the CPU code with passes suited to a
//! memory-bound device: `iterations + 1` reads of the scores, one write of `Q` (see `plan.rs` and the
//! crate documentation). Everything is loaded at run time (cudarc `dynamic-loading`): on a machine without
//! a driver or a GPU, [`open_stream`] and [`CudaSinkhorn::new`] return [`SinkhornError::Cuda`] saying why.
//!
//! ```no_run
//! use swav_sinkhorn::{cuda, Params, SingleProcess};
//! let stream = cuda::open_stream(0)?;
//! let scores = stream.clone_htod(&vec![0.5f32; 256 * 3000]).map_err(cuda::driver_error)?;
//! let mut q = stream.alloc_zeros::<f32>(256 * 3000).map_err(cuda::driver_error)?;
//! let mut sk = cuda::CudaSinkhorn::new(&stream)?;
//! sk.run(&scores, 256, 3000, &Params::default(), &SingleProcess, &mut q)?;
//! # Ok::<(), swav_sinkhorn::SinkhornError>(())
//! ```

use crate::{Params, Problem, Reducer, SingleProcess, SinkhornError};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

pub use cudarc;
pub use cudarc::driver::DriverError;

#[cfg(test)]
mod emulate;
mod plan;

use plan::{Arg, Buf, Kernel, Plan, Step};

/// The kernel sources, compiled together: the fused kernels, then the naive baseline.
pub(crate) const KERNELS_CU: &str = include_str!("kernels.cu");
pub(crate) const NAIVE_CU: &str = include_str!("naive.cu");

/// Compiles the kernels (both files, as one program) with NVRTC to PTX, for `arch` (`"sm_90"`;
/// `None`: NVRTC's default architecture, which every newer device runs through the driver's JIT).
/// The CI compile check calls it for sm_80 and sm_90.
pub fn compile_kernels(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx, SinkhornError> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(SinkhornError::Cuda(
            "NVRTC (libnvrtc.so) could not be loaded: put the CUDA runtime libraries on the library path".into(),
        ));
    }
    let source = format!("{KERNELS_CU}\n{NAIVE_CU}");
    let opts = cudarc::nvrtc::CompileOptions { name: Some("swav_sinkhorn.cu".into()), arch, ..Default::default() };
    catch_unwind(AssertUnwindSafe(|| cudarc::nvrtc::compile_ptx_with_opts(&source, opts)))
        .map_err(|_| SinkhornError::Cuda("NVRTC lacks functions this build needs (update CUDA)".into()))?
        .map_err(|e| SinkhornError::Cuda(format!("compiling the Sinkhorn kernels with NVRTC: {e}")))
}

/// The names of the kernels the runtime loads from the compiled module.
pub fn kernel_names() -> Vec<&'static str> {
    Kernel::ALL.iter().map(|k| k.name()).collect()
}

/// Turns a cudarc driver error into ours.
pub fn driver_error(e: DriverError) -> SinkhornError {
    SinkhornError::Cuda(e.to_string())
}

/// Checks that the CUDA driver library can be loaded (without panicking, unlike a bare cudarc call).
pub fn driver_available() -> Result<(), SinkhornError> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(SinkhornError::Cuda(
            "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine, or it is not on \
             the library path)"
                .into(),
        ))
    }
}

/// Opens device `ordinal` and a new stream on it. Errors (no driver, no device, driver too old) are
/// returned, never panicked.
pub fn open_stream(ordinal: usize) -> Result<Arc<CudaStream>, SinkhornError> {
    driver_available()?;
    let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
        .map_err(|_| {
            SinkhornError::Cuda("the CUDA driver lacks functions this build needs (update the driver)".into())
        })?
        .map_err(|e| SinkhornError::Cuda(format!("cannot open CUDA device {ordinal}: {e}")))?;
    ctx.new_stream().map_err(driver_error)
}

/// All-reduce over ranks on device buffers (the device twin of [`Reducer`]). Implementations must order
/// their work after what `stream` has queued, and the caller's later work on `stream` after theirs.
pub trait DeviceReducer {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError>;
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError>;
}

impl DeviceReducer for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &Arc<CudaStream>, _: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        Ok(())
    }
    fn all_reduce_max(&self, _: &Arc<CudaStream>, _: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        Ok(())
    }
}

/// Any host [`Reducer`] on device buffers: copies to the host, reduces, copies back (synchronising the
/// stream). For tests (with [`crate::LocalGroup`]) and for communication libraries without GPU support.
#[derive(Debug)]
pub struct HostStaged<R>(pub R);

impl<R: Reducer> HostStaged<R> {
    fn staged(
        &self,
        stream: &Arc<CudaStream>,
        values: &mut CudaSlice<f32>,
        op: fn(&R, &mut [f32]) -> Result<(), SinkhornError>,
    ) -> Result<(), SinkhornError> {
        let mut host = stream.clone_dtoh(values).map_err(driver_error)?;
        op(&self.0, &mut host)?;
        stream.memcpy_htod(&host, values).map_err(driver_error)?;
        stream.synchronize().map_err(driver_error)
    }
}

impl<R: Reducer> DeviceReducer for HostStaged<R> {
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        self.staged(stream, values, R::all_reduce_sum)
    }
    fn all_reduce_max(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        self.staged(stream, values, R::all_reduce_max)
    }
}

/// NCCL all-reduce (one rank per GPU). Not exercised by the test suite, which has at most one GPU; the
/// single-rank case is covered by the GPU check script.
#[derive(Debug)]
pub struct NcclReducer {
    comm: cudarc::nccl::Comm,
}

impl NcclReducer {
    /// Wraps an existing communicator.
    pub fn new(comm: cudarc::nccl::Comm) -> NcclReducer {
        NcclReducer { comm }
    }

    /// Joins rank `rank` of `world_size` (every rank passes the same `id`, made by `cudarc::nccl::Id::new()`
    /// on one rank and sent to the others). Errors if NCCL cannot be loaded.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: cudarc::nccl::Id,
    ) -> Result<NcclReducer, SinkhornError> {
        // SAFETY: only tries to dlopen the library by its usual names.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(SinkhornError::Cuda(
                "libnccl.so could not be loaded (install NCCL, or link libnccl.so to libnccl.so.2 on the library \
                 path)"
                    .into(),
            ));
        }
        let comm = cudarc::nccl::Comm::from_rank(stream, rank, world_size, id)
            .map_err(|e| SinkhornError::Reduce(format!("NCCL init of rank {rank}/{world_size}: {:?}", e.0)))?;
        Ok(NcclReducer { comm })
    }

    /// The communicator.
    pub fn comm(&self) -> &cudarc::nccl::Comm {
        &self.comm
    }

    fn reduce(
        &self,
        stream: &Arc<CudaStream>,
        values: &mut CudaSlice<f32>,
        op: cudarc::nccl::ReduceOp,
    ) -> Result<(), SinkhornError> {
        let comm_stream = self.comm.stream();
        let same = comm_stream.cu_stream() == stream.cu_stream();
        if !same {
            comm_stream.join(stream).map_err(driver_error)?;
        }
        self.comm
            .all_reduce_in_place(values, &op)
            .map_err(|e| SinkhornError::Reduce(format!("NCCL all-reduce: {:?}", e.0)))?;
        if !same {
            stream.join(&comm_stream).map_err(driver_error)?;
        }
        Ok(())
    }
}

impl DeviceReducer for NcclReducer {
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        self.reduce(stream, values, cudarc::nccl::ReduceOp::Sum)
    }
    fn all_reduce_max(&self, stream: &Arc<CudaStream>, values: &mut CudaSlice<f32>) -> Result<(), SinkhornError> {
        self.reduce(stream, values, cudarc::nccl::ReduceOp::Max)
    }
}

/// The compiled kernels of one context.
struct Kernels {
    functions: Vec<(Kernel, CudaFunction)>,
}

impl Kernels {
    fn get(&self, kernel: Kernel) -> Result<&CudaFunction, SinkhornError> {
        self.functions
            .iter()
            .find(|(k, _)| *k == kernel)
            .map(|(_, f)| f)
            .ok_or_else(|| SinkhornError::Cuda(format!("kernel {} was not loaded", kernel.name())))
    }
}

/// Compiled modules, keyed by the raw context. An entry keeps its context alive (the module holds it), so
/// a key cannot be reused by another context while it is here.
static KERNEL_CACHE: Mutex<Vec<(usize, Arc<Kernels>)>> = Mutex::new(Vec::new());

fn kernels_for(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>, SinkhornError> {
    let key = ctx.cu_ctx() as usize;
    let mut cache = KERNEL_CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, k)) = cache.iter().find(|(c, _)| *c == key) {
        return Ok(k.clone());
    }
    let ptx = compile_kernels(None)?;
    let module = ctx.load_module(ptx).map_err(|e| SinkhornError::Cuda(format!("loading the kernels: {e}")))?;
    let mut functions = Vec::new();
    for kernel in Kernel::ALL {
        let f = module
            .load_function(kernel.name())
            .map_err(|e| SinkhornError::Cuda(format!("loading kernel {}: {e}", kernel.name())))?;
        functions.push((kernel, f));
    }
    let kernels = Arc::new(Kernels { functions });
    cache.push((key, kernels.clone()));
    Ok(kernels)
}

/// Scratch buffers for one shape, and their device addresses.
struct Scratch {
    shape: (usize, usize, usize),
    buffers: Vec<(Buf, CudaSlice<f32>)>,
    ptrs: Vec<(Buf, sys::CUdeviceptr)>,
}

/// A kernel argument, resolved.
enum Value {
    Ptr(sys::CUdeviceptr),
    I32(i32),
    F32(f32),
}

impl Scratch {
    fn ptr(&self, buf: Buf) -> Result<sys::CUdeviceptr, SinkhornError> {
        self.ptrs
            .iter()
            .find(|(b, _)| *b == buf)
            .map(|(_, p)| *p)
            .ok_or_else(|| SinkhornError::Cuda(format!("no scratch buffer {buf:?}")))
    }
    fn get(&self, buf: Buf) -> Result<&CudaSlice<f32>, SinkhornError> {
        self.buffers
            .iter()
            .find(|(b, _)| *b == buf)
            .map(|(_, s)| s)
            .ok_or_else(|| SinkhornError::Cuda(format!("no scratch buffer {buf:?}")))
    }
    fn get_mut(&mut self, buf: Buf) -> Result<&mut CudaSlice<f32>, SinkhornError> {
        self.buffers
            .iter_mut()
            .find(|(b, _)| *b == buf)
            .map(|(_, s)| s)
            .ok_or_else(|| SinkhornError::Cuda(format!("no scratch buffer {buf:?}")))
    }
}

/// Sinkhorn on one CUDA stream. Holds the compiled kernels and scratch buffers (a few vectors and two
/// `tiles x prototypes` buffers), reused while the shape stays the same: create it once, call
/// [`run`](Self::run) every step.
pub struct CudaSinkhorn {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    sm_count: usize,
    scratch: Option<Scratch>,
    check_finite: bool,
}

impl CudaSinkhorn {
    /// Kernels for `stream`'s context (compiled with NVRTC at the first use in that context).
    pub fn new(stream: &Arc<CudaStream>) -> Result<CudaSinkhorn, SinkhornError> {
        let ctx = stream.context();
        let kernels = kernels_for(ctx)?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error)?
            .max(1) as usize;
        Ok(CudaSinkhorn { stream: stream.clone(), kernels, sm_count, scratch: None, check_finite: true })
    }

    /// The stream the kernels run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether [`run`](Self::run) checks the scores for NaN and infinity (default: yes). The check reads
    /// one float back, which waits for the stream to finish the call. Without it the call is fully
    /// asynchronous (and can be captured in a CUDA graph); non-finite scores then give a finite but
    /// meaningless `Q` instead of an error.
    pub fn set_check_finite(&mut self, check: bool) {
        self.check_finite = check;
    }

    /// Computes `Q` (rows x prototypes, rows summing to 1) from `scores` (rows x prototypes, row-major) on
    /// this object's stream. Both buffers must hold at least `rows x prototypes` floats (the first ones are
    /// used) and live in the stream's context. Every rank of a distributed run calls it with the same
    /// shape and `params`. With [`set_check_finite`](Self::set_check_finite) on, non-finite scores on any
    /// rank give [`SinkhornError::NonFinite`] on every rank (`this_rank` is true only for world size 1).
    pub fn run(
        &mut self,
        scores: &CudaSlice<f32>,
        rows: usize,
        prototypes: usize,
        params: &Params,
        reducer: &dyn DeviceReducer,
        q: &mut CudaSlice<f32>,
    ) -> Result<(), SinkhornError> {
        let p = Problem::new(rows, prototypes, params, reducer.world_size())?;
        let plan = plan::plan(&p, self.sm_count)?;
        self.execute(&p, &plan, scores, reducer, q)?;
        if self.check_finite {
            let scratch = self.scratch.as_ref().ok_or_else(|| SinkhornError::Cuda("no scratch".into()))?;
            let k = p.prototypes;
            let flag = self.stream.clone_dtoh(&scratch.get(Buf::ColMax)?.slice(k..k + 1)).map_err(driver_error)?;
            if flag[0] != 0.0 {
                return Err(SinkhornError::NonFinite { this_rank: p.world_size == 1 });
            }
        }
        Ok(())
    }

    /// The naive baseline (one process): exp, then each normalisation of the official code as a separate
    /// pass over the matrix, like PyTorch eager. For benchmarks only; it overflows like the official code.
    pub fn run_naive(
        &mut self,
        scores: &CudaSlice<f32>,
        rows: usize,
        prototypes: usize,
        params: &Params,
        q: &mut CudaSlice<f32>,
    ) -> Result<(), SinkhornError> {
        let p = Problem::new(rows, prototypes, params, 1)?;
        let plan = plan::naive_plan(&p, self.sm_count)?;
        self.execute(&p, &plan, scores, &SingleProcess, q)
    }

    /// Convenience for tests and one-off use: copies `scores` to the device, runs, copies `Q` back.
    pub fn run_host(
        &mut self,
        scores: &[f32],
        rows: usize,
        prototypes: usize,
        params: &Params,
        reducer: &dyn DeviceReducer,
    ) -> Result<Vec<f32>, SinkhornError> {
        let p = Problem::new(rows, prototypes, params, reducer.world_size())?;
        p.check_len("scores", scores.len())?;
        let d_scores = self.stream.clone_htod(scores).map_err(driver_error)?;
        let mut d_q = self.stream.alloc_zeros::<f32>(p.elements).map_err(driver_error)?;
        self.run(&d_scores, rows, prototypes, params, reducer, &mut d_q)?;
        self.stream.clone_dtoh(&d_q).map_err(driver_error)
    }

    fn execute(
        &mut self,
        p: &Problem,
        plan: &Plan,
        scores: &CudaSlice<f32>,
        reducer: &dyn DeviceReducer,
        q: &mut CudaSlice<f32>,
    ) -> Result<(), SinkhornError> {
        for (name, len) in [("scores", scores.len()), ("q", q.len())] {
            if len < p.elements {
                return Err(SinkhornError::Shape { buffer: name, expected: p.elements, actual: len });
            }
        }
        let ctx = self.stream.context();
        if scores.context().cu_ctx() != ctx.cu_ctx() || q.context().cu_ctx() != ctx.cu_ctx() {
            return Err(SinkhornError::Cuda("scores and q must live in the stream's CUDA context".into()));
        }
        self.ensure_scratch(plan)?;
        let stream = self.stream.clone();
        let kernels = self.kernels.clone();
        let scratch = self.scratch.as_mut().ok_or_else(|| SinkhornError::Cuda("no scratch".into()))?;
        // Raw pointers, taken once: the guards order our stream after earlier writers of `scores` and
        // earlier users of `q` (when they ran on other streams), and record our use when dropped at the end.
        // Launches then push plain pointers, with no per-argument event bookkeeping.
        let (scores_ptr, _scores_guard) = scores.device_ptr(&stream);
        let (q_ptr, _q_guard) = q.device_ptr_mut(&stream);
        for step in &plan.steps {
            match step {
                Step::Launch { kernel, grid, block, args } => {
                    let values = args
                        .iter()
                        .map(|arg| {
                            Ok(match arg {
                                Arg::Buf(Buf::Scores) => Value::Ptr(scores_ptr),
                                Arg::Buf(Buf::Q) => Value::Ptr(q_ptr),
                                Arg::Buf(buf) => Value::Ptr(scratch.ptr(*buf)?),
                                Arg::I32(v) => Value::I32(*v),
                                Arg::F32(v) => Value::F32(*v),
                            })
                        })
                        .collect::<Result<Vec<Value>, SinkhornError>>()?;
                    let function = kernels.get(*kernel)?;
                    let mut launch = stream.launch_builder(function);
                    for value in &values {
                        match value {
                            Value::Ptr(p) => launch.arg(p),
                            Value::I32(v) => launch.arg(v),
                            Value::F32(v) => launch.arg(v),
                        };
                    }
                    let cfg = LaunchConfig { grid_dim: (*grid, 1, 1), block_dim: (*block, 1, 1), shared_mem_bytes: 0 };
                    // SAFETY: the plan's arguments match the kernels' parameters (checked against the
                    // sources by the plan tests and executed by the emulation tests); every buffer holds at
                    // least the plan's length for it (ensure_scratch, and the checks above).
                    unsafe { launch.launch(cfg) }
                        .map_err(|e| SinkhornError::Cuda(format!("launching {}: {e}", kernel.name())))?;
                }
                Step::AllReduceMax(buf) => reducer.all_reduce_max(&stream, scratch.get_mut(*buf)?)?,
                Step::AllReduceSum(buf) => reducer.all_reduce_sum(&stream, scratch.get_mut(*buf)?)?,
            }
        }
        Ok(())
    }

    fn ensure_scratch(&mut self, plan: &Plan) -> Result<(), SinkhornError> {
        let shape = (plan.rows, plan.prototypes, plan.tiles);
        if self.scratch.as_ref().is_some_and(|s| s.shape == shape) {
            return Ok(());
        }
        self.scratch = None;
        let mut buffers = Vec::new();
        let mut ptrs = Vec::new();
        for buf in Buf::SCRATCH {
            let slice = self.stream.alloc_zeros::<f32>(plan.len(buf)).map_err(driver_error)?;
            // Scratch is used on this stream only, so stream order is all the synchronisation it needs.
            ptrs.push((buf, slice.device_ptr(&self.stream).0));
            buffers.push((buf, slice));
        }
        self.scratch = Some(Scratch { shape, buffers, ptrs });
        Ok(())
    }
}

/// One-off call: [`CudaSinkhorn::new`] then [`CudaSinkhorn::run`] (the kernels stay cached; the scratch
/// buffers are allocated each time, so keep a [`CudaSinkhorn`] when calling repeatedly).
pub fn sinkhorn_cuda(
    stream: &Arc<CudaStream>,
    scores: &CudaSlice<f32>,
    rows: usize,
    prototypes: usize,
    params: &Params,
    reducer: &dyn DeviceReducer,
    q: &mut CudaSlice<f32>,
) -> Result<(), SinkhornError> {
    CudaSinkhorn::new(stream)?.run(scores, rows, prototypes, params, reducer, q)
}
