// Row-wise L2 normalisation of a [rows, D] fp32 matrix: y = x / max(||x||, 1e-12) (PyTorch's
// F.normalize(x, dim=1)), with the norms (before clamping) saved for the backward:
// dx = (dy - y (y . dy)) / ||x|| where ||x|| > 1e-12, else dx = dy / 1e-12. CPU twin: normalize.rs; plans:
// normalize_cuda.rs.
//
// fp32 only: it runs on SwAV's embeddings (D = 128), which are small and precision-sensitive (scores are
// divided by a temperature of 0.1 after this).
//
// One block per row; threads stride over the row; the sums (of squares, and y . dy) are block reductions
// in a fixed order (common.cuh), so results are deterministic. The row is read twice (sum, then scale):
// it is at most a few KB and the second read hits the cache, which beats holding it in registers for
// every D.

#define L2_EPS 1e-12f

extern "C" __global__ void l2norm_forward(const float* __restrict__ x, int D, float* __restrict__ y,
                                          float* __restrict__ norms) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * D;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) ss += xr[d] * xr[d];
    const float norm = sqrtf(swav_block_sum(ss, scratch));
    const float inv = 1.0f / fmaxf(norm, L2_EPS);
    for (int d = threadIdx.x; d < D; d += blockDim.x) y[row * D + d] = xr[d] * inv;
    if (threadIdx.x == 0) norms[row] = norm;
}

extern "C" __global__ void l2norm_backward(const float* __restrict__ y, const float* __restrict__ norms,
                                           const float* __restrict__ dy, int D, float* __restrict__ dx) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const float* yr = y + row * D;
    const float* gr = dy + row * D;
    const float norm = norms[row];
    float dot = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dot += gr[d] * yr[d];
    dot = swav_block_sum(dot, scratch);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        dx[row * D + d] = norm > L2_EPS ? (gr[d] - yr[d] * dot) / norm : gr[d] / L2_EPS;
    }
}
