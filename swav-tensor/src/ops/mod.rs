//! The ops of the engine, one idea per file, each with its forward and backward.

pub mod batchnorm;
pub mod batchnorm_cuda;
pub mod conv;
pub mod elementwise;
pub mod elementwise_cuda;
pub mod linear;
pub mod normalize;
pub mod normalize_cuda;
pub mod pool;
pub mod pool_cuda;
mod scratch;
pub mod winograd;
