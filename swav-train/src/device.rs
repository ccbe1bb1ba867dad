//! The device half of the training step: what [`crate::step::swav_step`] does when the model lives on
//! a CUDA device, with the same semantics as the CPU half (`assign.rs`, `loss.rs`, `lars.rs`):
//!
//! - codes: Sinkhorn with swav-sinkhorn's CUDA kernels on the engine's own stream (the real device),
//!   or on the host for the emulated device (whose kernels swav-sinkhorn tests on its own emulation);
//! - the swapped-prediction loss and its gradient in fp32 (`loss.cu`), which also raises a device flag
//!   when the loss is not finite;
//! - the multi-tensor LARS/SGD update (`lars.cu`), which reads that flag and updates nothing after a
//!   bad step, so "nothing is updated on a bad step" holds without the host looking at the loss first;
//! - the cluster statistics of the metrics (`prototypes.cu`).

use std::sync::Arc;

use swav_model::param::{Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::cuda::runtime::{DeviceBuffer, DeviceRuntime};
use swav_tensor::{DType, Tensor};

use crate::distributed::CollectiveReducer;
use crate::lars::Lars;
use crate::{lars_cuda, loss_cuda, prototypes_cuda, TrainError};

fn runtime(t: &Tensor) -> Result<&Arc<DeviceRuntime>, TrainError> {
    t.runtime().ok_or_else(|| TrainError::Shape(format!("a CPU tensor {:?} in the device step", t.shape())))
}

/// Sinkhorn on the device of the scores (kernels compiled once, kept here).
#[derive(Default)]
pub struct DeviceSinkhorn {
    #[cfg(feature = "cuda")]
    cuda: Option<swav_sinkhorn::cuda::CudaSinkhorn>,
}

impl DeviceSinkhorn {
    /// The codes of `scores` (`[rows, k]`, f32 on a CUDA device): Sinkhorn over every row, its sums
    /// all-reduced over the ranks of `reducer` (through host memory).
    fn run(
        &mut self,
        scores: &Tensor,
        params: &swav_sinkhorn::Params,
        reducer: CollectiveReducer<'_>,
    ) -> Result<Tensor, TrainError> {
        let (rows, k) = (scores.dim(0), scores.dim(1));
        #[cfg(feature = "cuda")]
        {
            let rt = runtime(scores)?;
            if let Some(driver) = rt.backend().as_any().downcast_ref::<swav_tensor::cuda::driver::DriverBackend>() {
                return self.run_cuda(driver.stream(), rt, scores, (rows, k), params, reducer);
            }
        }
        let host = scores.to_vec();
        let mut q = vec![0f32; rows * k];
        let q = match swav_sinkhorn::sinkhorn_into(&host, rows, k, params, &reducer, &mut q) {
            Ok(()) => q,
            // As the device kernels with their check off: codes of no meaning, and the loss of the
            // non-finite scores raises the skip flag.
            Err(swav_sinkhorn::SinkhornError::NonFinite { .. }) => vec![1.0 / k as f32; rows * k],
            Err(e) => return Err(TrainError::Sinkhorn(e.to_string())),
        };
        Ok(Tensor::from_vec(&[rows, k], q)?.to_device(scores.device())?)
    }

    #[cfg(feature = "cuda")]
    fn run_cuda(
        &mut self,
        stream: &Arc<swav_sinkhorn::cuda::cudarc::driver::CudaStream>,
        rt: &Arc<DeviceRuntime>,
        scores: &Tensor,
        (rows, k): (usize, usize),
        params: &swav_sinkhorn::Params,
        reducer: CollectiveReducer<'_>,
    ) -> Result<Tensor, TrainError> {
        use swav_sinkhorn::cuda::{CudaSinkhorn, HostStaged};
        let sk_err = |e: swav_sinkhorn::SinkhornError| TrainError::Sinkhorn(e.to_string());
        if self.cuda.is_none() {
            let mut sk = CudaSinkhorn::new(stream).map_err(sk_err)?;
            // Its finiteness check reads a flag back (the host would wait for every step): non-finite
            // scores give a non-finite loss, which the loss kernel's skip flag catches on the device.
            sk.set_check_finite(false);
            self.cuda = Some(sk);
        }
        let q = Tensor::device_uninit(rt, &[rows, k], DType::F32)?;
        // SAFETY: both blocks belong to the engine, hold rows x k f32 values, and live on the stream
        // the kernels run on; the views are leaked (not freed) after the call: the tensors own them.
        unsafe {
            let s = stream.upgrade_device_ptr::<f32>(scores.ptr(), rows * k);
            let mut out = stream.upgrade_device_ptr::<f32>(q.ptr(), rows * k);
            let sk = self.cuda.as_mut().expect("created above");
            let result = sk.run(&s, rows, k, params, &HostStaged(reducer), &mut out);
            s.leak();
            out.leak();
            result.map_err(sk_err)?;
        }
        Ok(q)
    }
}

/// The codes of one assigned crop: Sinkhorn of `[queue scores; crop scores]`, the crop's own (last
/// `crop_scores.dim(0)`) rows kept (see `assign.rs` for the official order); Sinkhorn's sums run over
/// the ranks of `reducer` (`CollectiveReducer(&SingleProcess)` for one process).
pub fn codes_for_crop(
    sinkhorn: &mut DeviceSinkhorn,
    crop_scores: &Tensor,
    queue_scores: Option<&Tensor>,
    params: &swav_sinkhorn::Params,
    reducer: CollectiveReducer<'_>,
) -> Result<Tensor, TrainError> {
    let batch = crop_scores.dim(0);
    match queue_scores {
        None => sinkhorn.run(crop_scores, params, reducer),
        Some(q) => {
            let all = Tensor::cat(&[q, crop_scores])?;
            let codes = sinkhorn.run(&all, params, reducer)?;
            Ok(codes.narrow(all.dim(0) - batch, batch)?)
        }
    }
}

/// The loss, its gradient with respect to the scores, and the device flag that says the loss was not
/// finite.
pub struct DeviceLoss {
    /// The loss, f32 `[1]` on the device (read back with the step's other metrics, a step late).
    pub loss: Tensor,
    /// `d loss / d scores`, `[rows, k]`.
    pub dscores: Tensor,
    /// u32 `[1]`: 1 when the loss was not finite (the optimizer then updates nothing).
    pub skip: DeviceBuffer,
}

/// The swapped-prediction loss on the device (`loss.cu`; the formula is `loss.rs`'s).
pub fn swapped_prediction_loss(
    scores: &Tensor,
    codes: &[Tensor],
    batch: usize,
    crops_for_assign: &[usize],
    temperature: f32,
) -> Result<DeviceLoss, TrainError> {
    let rt = runtime(scores)?;
    let (rows, k) = (scores.dim(0), scores.dim(1));
    let plan = loss_cuda::plan(rows / batch, batch, k, crops_for_assign, temperature)?;
    let codes = Tensor::cat(&codes.iter().collect::<Vec<_>>())?;
    let dscores = Tensor::device_uninit(rt, &[rows, k], DType::F32)?;
    let loss = Tensor::device_uninit(rt, &[1], DType::F32)?;
    let skip = rt.alloc(4)?;
    rt.run(
        &loss_cuda::SOURCE,
        &plan,
        &[
            (loss_cuda::SCORES, scores.ptr()),
            (loss_cuda::CODES, codes.ptr()),
            (loss_cuda::DSCORES, dscores.ptr()),
            (loss_cuda::LOSS, loss.ptr()),
            (loss_cuda::SKIP, skip.ptr()),
        ],
    )?;
    Ok(DeviceLoss { loss, dscores, skip })
}

/// The mean of per-head losses (f32 `[1]` each, on the device) and the flag that says it is not finite
/// (a non-finite loss in any head stops the whole update).
pub fn mean_loss(losses: &[&Tensor]) -> Result<(Tensor, DeviceBuffer), TrainError> {
    let first = losses.first().ok_or_else(|| TrainError::Shape("loss mean of no heads".into()))?;
    let rt = runtime(first)?;
    let plan = loss_cuda::mean_plan(losses.len())?;
    let stacked = Tensor::cat(losses)?;
    let loss = Tensor::device_uninit(rt, &[1], DType::F32)?;
    let skip = rt.alloc(4)?;
    rt.run(
        &loss_cuda::SOURCE,
        &plan,
        &[(loss_cuda::ROW_LOSS, stacked.ptr()), (loss_cuda::LOSS, loss.ptr()), (loss_cuda::SKIP, skip.ptr())],
    )?;
    Ok((loss, skip))
}

/// One LARS/SGD step of `optimizer` over the model's parameters on the device (`lars.cu`; the
/// semantics are `lars.rs`'s, momentum buffers created on first use as PyTorch does), skipped entirely
/// when `skip` is raised.
pub fn lars_step(
    optimizer: &mut Lars,
    model: &mut SwavModel,
    lr: f64,
    frozen: impl Fn(&str) -> bool,
    skip: &DeviceBuffer,
) -> Result<(), TrainError> {
    let rt = skip.runtime().clone();
    let device = swav_tensor::Device::Cuda(rt.ordinal());
    let mut tensors = Vec::new();
    let mut table: Vec<u64> = Vec::new();
    let mut error = None;
    model.visit("", &mut |name, slot| {
        let Slot::Param(p) = slot else { return };
        let is_frozen = frozen(name);
        let momentum = if is_frozen {
            0
        } else {
            let buf =
                optimizer.buffers.entry(name.to_string()).or_insert_with(|| Tensor::zeros(p.value.shape(), device));
            if buf.device() != device {
                error = Some(TrainError::Shape(format!(
                    "momentum of `{name}` is on {}, the model on {device}",
                    buf.device()
                )));
                return;
            }
            buf.ptr()
        };
        tensors.push(lars_cuda::LarsTensor { len: p.value.len(), frozen: is_frozen });
        table.extend(lars_cuda::table_row(p.value.ptr(), p.grad.ptr(), momentum, p.value.len()));
    });
    if let Some(e) = error {
        return Err(e);
    }
    let settings = lars_cuda::LarsSettings {
        momentum: optimizer.momentum as f32,
        weight_decay: optimizer.weight_decay as f32,
        trust_coefficient: optimizer.trust_coefficient as f32,
        lars: optimizer.lars,
    };
    let plan = lars_cuda::plan(&tensors, &settings, lr as f32)?;
    let table_buf = rt.alloc(table.len() * 8)?;
    let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
    rt.backend().upload(table_buf.ptr(), &bytes)?;
    rt.run(&lars_cuda::SOURCE, &plan, &[(lars_cuda::TABLE, table_buf.ptr()), (lars_cuda::SKIP, skip.ptr())])?;
    Ok(())
}

/// Entropy (nats) of the mean code and the number of prototypes that are some image's argmax, of
/// `codes` (`[batch, k]`) on the device: f32 `[2]` on the device.
pub fn cluster_stats(codes: &Tensor) -> Result<Tensor, TrainError> {
    let rt = runtime(codes)?;
    let (batch, k) = (codes.dim(0), codes.dim(1));
    let plan = prototypes_cuda::cluster_stats(batch, k)?;
    let hist = rt.alloc(k * 4)?;
    let stats = Tensor::device_uninit(rt, &[2], DType::F32)?;
    rt.run(
        &prototypes_cuda::SOURCE,
        &plan,
        &[
            (prototypes_cuda::CODES, codes.ptr()),
            (prototypes_cuda::HIST, hist.ptr()),
            (prototypes_cuda::STATS, stats.ptr()),
        ],
    )?;
    Ok(stats)
}
