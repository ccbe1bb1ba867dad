//! Standalone Sinkhorn-Knopp for SwAV cluster assignment, on CPU and CUDA.
