// The plain way, kept as the baseline of `cargo xtask bench sinkhorn` (never used for real work): the
// official order of operations, each normalisation a separate full pass over the matrix in global memory
// (like PyTorch eager), no max subtraction (overflows where the official code does). Compiled together
// with kernels.cu (uses sk_block_reduce and sk_sum_tiles from it). Element-wise kernels use grid-stride
// loops; Q is rows x K row-major, as in kernels.cu.

// Q = exp(S / eps)
extern "C" __global__ void sk_naive_exp(const float* __restrict__ S, int rows, int K, float eps,
                                        float* __restrict__ Q) {
    const size_t n = (size_t)rows * K;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        Q[i] = expf(S[i] / eps);
    }
}

// Per-tile column sums (thread per column), combined by sk_sum_tiles.
extern "C" __global__ void sk_naive_colsum_tiles(const float* __restrict__ Q, int rows, int K, int tile_rows,
                                                 float* __restrict__ part_sum) {
    const int tile = blockIdx.x;
    const int b0 = tile * tile_rows;
    const int b1 = sk_min(b0 + tile_rows, rows);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float s = 0.0f;
        for (int b = b0; b < b1; ++b) s += Q[(size_t)b * K + k];
        part_sum[(size_t)tile * K + k] = s;
    }
}

// rowsum[b] = sum_k Q[b][k], one block per row.
extern "C" __global__ void sk_naive_rowsum(const float* __restrict__ Q, int rows, int K, float* __restrict__ rowsum) {
    __shared__ float red[32];
    const int b = blockIdx.x;
    float s = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) s += Q[(size_t)b * K + k];
    s = sk_block_reduce<false>(s, red);
    if (threadIdx.x == 0 && b < rows) rowsum[b] = s;
}

// total[0] = sum_k colsum[k], one block.
extern "C" __global__ void sk_naive_total(const float* __restrict__ colsum, int K, float* __restrict__ total) {
    __shared__ float red[32];
    float s = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) s += colsum[k];
    s = sk_block_reduce<false>(s, red);
    if (threadIdx.x == 0) total[0] = s;
}

// Q /= total[0]
extern "C" __global__ void sk_naive_div_total(float* __restrict__ Q, int rows, int K, const float* __restrict__ total) {
    const size_t n = (size_t)rows * K;
    const float t = total[0];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        Q[i] /= t;
    }
}

// Q[b][k] = Q[b][k] / colsum[k] / count   (per prototype; count = K)
extern "C" __global__ void sk_naive_div_cols(float* __restrict__ Q, int rows, int K, const float* __restrict__ colsum,
                                             float count) {
    const size_t n = (size_t)rows * K;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        Q[i] = Q[i] / colsum[i % K] / count;
    }
}

// Q[b][k] = Q[b][k] / rowsum[b] / count * scale   (per sample; count = B; scale = B on the last pass, else 1)
extern "C" __global__ void sk_naive_div_rows(float* __restrict__ Q, int rows, int K, const float* __restrict__ rowsum,
                                             float count, float scale) {
    const size_t n = (size_t)rows * K;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        Q[i] = Q[i] / rowsum[i / K] / count * scale;
    }
}
