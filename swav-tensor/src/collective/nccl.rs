//! NCCL for tensors in device memory, another collective (MPI, threads) for everything else.
//!
//! Gradients are the bytes of a data-parallel step; NCCL reduces them where they are, on the
//! engine's stream, over NVLink or InfiniBand, instead of a device -> host -> MPI -> host -> device
//! round trip. The small host buffers (Sinkhorn's sums, the loss, the setup check, heartbeats) keep
//! going through the host collective, which also carries NCCL's unique id from rank 0 to the others.
//! One GPU per rank, as NCCL requires.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result, sys};

use super::{Collective, CollectiveError};
use crate::cuda::driver::DriverBackend;
use crate::cuda::runtime::DeviceRuntime;
use crate::{DType, Device, Tensor};

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

fn nccl_error(what: &str, e: result::NcclError) -> CollectiveError {
    CollectiveError::Transport(format!("NCCL {what}: {e:?}"))
}

/// A communicator handle, used with the mutex of [`NcclCollective`] held.
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent, which the mutex around it guarantees.
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is dropped once.
        let _ = unsafe { result::comm_destroy(self.0) };
    }
}

/// Device tensors through NCCL on the runtime's stream, host buffers through `host`.
pub struct NcclCollective {
    host: Arc<dyn Collective>,
    runtime: Arc<DeviceRuntime>,
    comm: Mutex<Comm>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclCollective {{ rank {} of {}, cuda:{} }}", self.rank(), self.world_size(), self.runtime.ordinal())
    }
}

/// Whether libnccl can be loaded.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

impl NcclCollective {
    /// Joins every rank of `host` in one NCCL communicator on `runtime`'s device (every rank calls
    /// this at the same point, each with its own GPU). Fails on every rank alike when NCCL cannot be
    /// loaded or rank 0 cannot make the unique id.
    pub fn new(host: Arc<dyn Collective>, runtime: Arc<DeviceRuntime>) -> Result<NcclCollective, CollectiveError> {
        let backend = runtime.backend().as_any().downcast_ref::<DriverBackend>().ok_or_else(|| {
            CollectiveError::Transport(format!("NCCL needs a real CUDA device; cuda:{} is not one", runtime.ordinal()))
        })?;
        // Every rank says whether it can load NCCL, so that all of them fail together or none does.
        let mut missing = vec![0.0f32; host.world_size()];
        missing[host.rank()] = if available() { 0.0 } else { 1.0 };
        host.all_reduce_sum(&mut missing)?;
        let without: Vec<String> = (0..missing.len()).filter(|&r| missing[r] != 0.0).map(|r| r.to_string()).collect();
        if !without.is_empty() {
            return Err(CollectiveError::Transport(format!(
                "libnccl.so.2 could not be loaded on rank(s) {} (pip install nvidia-nccl-cu13, or put NCCL on the \
                 library path; scripts/gpu-env.sh finds it)",
                without.join(", ")
            )));
        }
        // Rank 0's id (and whether it made one) to everyone.
        let mut shared = vec![0.0f32; ID_BYTES + 1];
        if host.rank() == 0 {
            if let Ok(id) = result::get_uniqueid() {
                shared[0] = 1.0;
                for (v, &c) in shared[1..].iter_mut().zip(id.internal.iter()) {
                    *v = c as u8 as f32;
                }
            }
        }
        host.broadcast(&mut shared, 0)?;
        if shared[0] != 1.0 {
            return Err(CollectiveError::Transport("NCCL: rank 0 could not make a unique id".into()));
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (c, &v) in internal.iter_mut().zip(&shared[1..]) {
            *c = v as u8 as std::ffi::c_char;
        }
        backend
            .stream()
            .context()
            .bind_to_thread()
            .map_err(|e| CollectiveError::Transport(format!("binding cuda:{}: {e}", runtime.ordinal())))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; the id is the same on every rank.
        let comm = unsafe {
            result::comm_init_rank(
                comm.as_mut_ptr(),
                host.world_size() as i32,
                sys::ncclUniqueId { internal },
                host.rank() as i32,
            )
            .map_err(|e| nccl_error(&format!("init of rank {} of {}", host.rank(), host.world_size()), e))?;
            comm.assume_init()
        };
        Ok(NcclCollective { host, runtime, comm: Mutex::new(Comm(comm)) })
    }

    fn backend(&self) -> &DriverBackend {
        self.runtime.backend().as_any().downcast_ref::<DriverBackend>().expect("checked in new")
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        self.host.all_reduce_sum(values)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CollectiveError> {
        self.host.all_reduce_sum_f64(values)
    }
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        self.host.all_reduce_max(values)
    }
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.host.broadcast(values, root)
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.host.barrier()
    }
    fn abort(&self, reason: &str) {
        if let Ok(comm) = self.comm.try_lock() {
            // SAFETY: aborting makes NCCL calls of the other ranks return an error instead of hanging.
            let _ = unsafe { result::comm_abort(comm.0) };
        }
        self.host.abort(reason)
    }
    fn subgroup(&self, group_size: usize) -> Result<Arc<dyn Collective>, CollectiveError> {
        self.host.subgroup(group_size)
    }
    fn duplicate(&self) -> Result<Arc<dyn Collective>, CollectiveError> {
        self.host.duplicate()
    }
    fn reduces_device_memory(&self) -> bool {
        true
    }

    fn all_reduce_sum_device(&self, tensors: &mut [&mut Tensor]) -> Result<(), CollectiveError> {
        let here = Device::Cuda(self.runtime.ordinal());
        if let Some(t) = tensors.iter().find(|t| t.device() != here || t.dtype() != DType::F32) {
            return Err(CollectiveError::Mismatch {
                op: "all_reduce_sum_device",
                detail: format!("a {:?} tensor on {} where f32 on {here} was expected", t.dtype(), t.device()),
            });
        }
        let stream = self.backend().stream();
        stream.context().bind_to_thread().map_err(|e| CollectiveError::Transport(format!("binding {here}: {e}")))?;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // One group: NCCL fuses the calls into as few kernels as it can.
        result::group_start().map_err(|e| nccl_error("group start", e))?;
        let mut first_error = None;
        for t in tensors.iter_mut().filter(|t| !t.is_empty()) {
            let ptr = t.ptr() as *mut c_void;
            // SAFETY: `ptr` is the live f32 block of `t` (len values), in place; queued on the stream
            // that every op on these tensors uses, so it follows the backward that wrote them.
            let r = unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    t.len(),
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    stream.cu_stream() as _,
                )
            };
            if let Err(e) = r {
                first_error.get_or_insert(nccl_error("all-reduce", e));
            }
        }
        result::group_end().map_err(|e| nccl_error("group end", e))?;
        first_error.map_or(Ok(()), Err)
    }
}
