//! The ops of the engine, one idea per file, each with its forward and backward.

pub mod batchnorm;
pub mod batchnorm_cuda;
pub mod conv;
pub(crate) mod conv_cuda;
pub mod conv_plan;
pub mod elementwise;
pub mod elementwise_cuda;
pub mod linear;
pub(crate) mod linear_cuda;
pub mod normalize;
pub mod normalize_cuda;
pub mod pool;
pub mod pool_cuda;
mod scratch;
pub mod winograd;

/// Checks that every tensor of a device op is on the device of its first input (an op never moves
/// data between devices by itself).
pub(crate) fn check_device(
    op: &'static str,
    rt: &std::sync::Arc<crate::cuda::runtime::DeviceRuntime>,
    tensors: &[&crate::Tensor],
) -> crate::Result<()> {
    let device = crate::Device::Cuda(rt.ordinal());
    match tensors.iter().find(|t| t.device() != device) {
        Some(t) => Err(crate::error::shape_err(
            op,
            format!("an operand {:?} is on {}, the input on {device}", t.shape(), t.device()),
        )),
        None => Ok(()),
    }
}
