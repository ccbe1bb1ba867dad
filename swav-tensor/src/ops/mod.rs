//! The ops of the engine, one idea per file, each with its forward and backward.

pub mod batchnorm;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod normalize;
pub mod pool;
mod scratch;
pub mod winograd;
