// Sinkhorn-Knopp kernels, compiled with NVRTC at first use. The host side (the order of launches, the
// buffers and the all-reduces between them) is `plan.rs`; the CPU twin of every kernel is in `cpu.rs`.
//
// Layout: scores S and output Q are rows x K, row-major, f32. A "tile" is `tile_rows` consecutive rows,
// handled by one block. Per-tile partial results are written to `tiles x K` buffers and combined by a
// second, tiny kernel in a fixed order, so results are deterministic (no atomics).
//
// Numerics (see lib.rs): m_k = max over all samples (and ranks) of S[b][k]; a = S - m_k (clamped to
// -FLT_MAX, never -inf); A_b = max_k a (stored in `rowmax` by the first row pass); e = exp((a - A_b)/eps),
// which is exactly 1 at each row's maximum. Scaling is kept in vectors: u_k = clamp(1 / (K r_k)) from the
// column sums r, v_b = clamp(1 / (B c_b)) with c_b = sum_k e u_k. Loaded scores are sanitised
// (NaN -> -FLT_MAX, +-inf -> +-FLT_MAX) so that no kernel can produce NaN or infinity, and `colstats`
// flags them so that the host can report the error.
//
// Fusion: every pass reads S once from memory; the row passes keep a thread's part of the row in
// registers (CPT values per thread) between the row-max, row-sum and column-sum steps, and recompute exp
// instead of storing it. The matrix is never scaled in memory; Q is written once, by the last pass.
//
// The file is plain C++ apart from the CUDA built-ins, so that the test suite can also compile it with a
// host C++ compiler and a small emulation of the built-ins (see emulate.rs).

#define SK_FLT_MAX 3.402823466e+38f
#define SK_SCALE_MIN 1e-30f
#define SK_SCALE_MAX 1e30f

__device__ __forceinline__ float sk_sanitize(float x) { return fminf(fmaxf(x, -SK_FLT_MAX), SK_FLT_MAX); }

__device__ __forceinline__ float sk_clamp_scale(float x) { return fminf(fmaxf(x, SK_SCALE_MIN), SK_SCALE_MAX); }

__device__ __forceinline__ int sk_min(int a, int b) { return a < b ? a : b; }

// Block-wide max (IS_MAX) or sum of v, returned to every thread. blockDim.x must be a multiple of 32 and
// every thread of the block must call it (it synchronises). `red` is 32 floats of shared memory.
template <bool IS_MAX>
__device__ __forceinline__ float sk_block_reduce(float v, float* red) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = IS_MAX ? fmaxf(v, other) : v + other;
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    __syncthreads();  // the previous call's readers are done with `red`
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < warps; ++w) r = IS_MAX ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

// Pass 0. Block = tile, thread = column (stride blockDim.x): the tile's column maximum, then
// sum over the tile's rows of exp((x - max) / eps). part_flag[tile] = 1 if a score was not finite.
extern "C" __global__ void sk_colstats(const float* __restrict__ S, int rows, int K, int tile_rows, float inv_eps,
                                       float* __restrict__ part_max, float* __restrict__ part_sum,
                                       float* __restrict__ part_flag) {
    __shared__ float red[32];
    const int tile = blockIdx.x;
    const int b0 = tile * tile_rows;
    const int b1 = sk_min(b0 + tile_rows, rows);
    float bad = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float m = -SK_FLT_MAX;
        for (int b = b0; b < b1; ++b) {
            const float x = S[(size_t)b * K + k];
            if (!(fabsf(x) <= SK_FLT_MAX)) bad = 1.0f;
            m = fmaxf(m, sk_sanitize(x));
        }
        float s = 0.0f;
        for (int b = b0; b < b1; ++b) {
            s += expf((sk_sanitize(S[(size_t)b * K + k]) - m) * inv_eps);
        }
        part_max[(size_t)tile * K + k] = m;
        part_sum[(size_t)tile * K + k] = s;
    }
    bad = sk_block_reduce<true>(bad, red);
    if (threadIdx.x == 0) part_flag[tile] = bad;
}

// Combines the tiles of pass 0, one thread per column: colmax[k] = max_j M_jk (also copied to local_max,
// needed to rescale after the all-reduce), colsum[k] = sum_j s_jk exp((M_jk - m_k) / eps) in double.
// Thread K writes colmax[K] = 1 if any tile saw a non-finite score (all-reduced with the maxima).
extern "C" __global__ void sk_colstats_combine(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                               const float* __restrict__ part_flag, int tiles, int K, float inv_eps,
                                               float* __restrict__ colmax, float* __restrict__ local_max,
                                               float* __restrict__ colsum) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < K) {
        float m = -SK_FLT_MAX;
        for (int j = 0; j < tiles; ++j) m = fmaxf(m, part_max[(size_t)j * K + k]);
        double r = 0.0;
        for (int j = 0; j < tiles; ++j) {
            r += (double)(part_sum[(size_t)j * K + k] * expf((part_max[(size_t)j * K + k] - m) * inv_eps));
        }
        colmax[k] = m;
        local_max[k] = m;
        colsum[k] = (float)r;
    } else if (k == K) {
        float f = 0.0f;
        for (int j = 0; j < tiles; ++j) f = fmaxf(f, part_flag[j]);
        colmax[K] = f;
    }
}

// Distributed runs only, between the all-reduce of the maxima and that of the sums: the sums were taken
// relative to this rank's maxima; express them relative to the global ones.
extern "C" __global__ void sk_rescale(const float* __restrict__ local_max, const float* __restrict__ colmax, int K,
                                      float inv_eps, float* __restrict__ colsum) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < K) colsum[k] *= expf((local_max[k] - colmax[k]) * inv_eps);
}

// Sums the tiles' column sums of a sweep (double, fixed order): colsum[k] = sum_j part_sum[j][k].
extern "C" __global__ void sk_sum_tiles(const float* __restrict__ part_sum, int tiles, int K,
                                        float* __restrict__ colsum) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < K) {
        double r = 0.0;
        for (int j = 0; j < tiles; ++j) r += (double)part_sum[(size_t)j * K + k];
        colsum[k] = (float)r;
    }
}

// A row pass. Block = tile; thread t owns columns t + j * blockDim.x, j < CPT (so K <= CPT * blockDim.x),
// keeping m_k, u_k, its share of the current row and its column sums in registers.
// first_pass: compute and store the row maxima A_b (otherwise read them).
// output == 0: part_sum[tile][k] = sum over the tile's rows of e v_b (Q untouched).
// output == 1: Q[b][k] = e u_k / c_b (part_sum untouched).
template <int CPT>
__device__ __forceinline__ void sk_rows(const float* __restrict__ S, int rows, int K, int tile_rows, float inv_eps,
                                        float inv_K, float inv_B, const float* __restrict__ colmax,
                                        const float* __restrict__ colsum, float* __restrict__ rowmax, int first_pass,
                                        int output, float* __restrict__ part_sum, float* __restrict__ Q) {
    __shared__ float red[32];
    const int tile = blockIdx.x;
    const int b0 = tile * tile_rows;
    const int b1 = sk_min(b0 + tile_rows, rows);
    float m[CPT];
    float u[CPT];
    float acc[CPT];
    float e[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
        const int k = threadIdx.x + j * blockDim.x;
        const bool in = k < K;
        m[j] = in ? colmax[k] : 0.0f;
        u[j] = in ? sk_clamp_scale(inv_K / colsum[k]) : 0.0f;
        acc[j] = 0.0f;
    }
    for (int b = b0; b < b1; ++b) {
        const float* row = S + (size_t)b * K;
        float amax = -SK_FLT_MAX;
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int k = threadIdx.x + j * blockDim.x;
            e[j] = k < K ? fmaxf(sk_sanitize(row[k]) - m[j], -SK_FLT_MAX) : -SK_FLT_MAX;
            amax = fmaxf(amax, e[j]);
        }
        float A;
        if (first_pass) {
            A = sk_block_reduce<true>(amax, red);
            if (threadIdx.x == 0) rowmax[b] = A;
        } else {
            A = rowmax[b];
        }
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int k = threadIdx.x + j * blockDim.x;
            e[j] = k < K ? expf((e[j] - A) * inv_eps) : 0.0f;
            dot += e[j] * u[j];
        }
        const float c = sk_block_reduce<false>(dot, red);
        if (output) {
            const float w = 1.0f / c;
#pragma unroll
            for (int j = 0; j < CPT; ++j) {
                const int k = threadIdx.x + j * blockDim.x;
                if (k < K) Q[(size_t)b * K + k] = e[j] * u[j] * w;
            }
        } else {
            const float v = sk_clamp_scale(inv_B / c);
#pragma unroll
            for (int j = 0; j < CPT; ++j) acc[j] += e[j] * v;
        }
    }
    if (!output) {
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int k = threadIdx.x + j * blockDim.x;
            if (k < K) part_sum[(size_t)tile * K + k] = acc[j];
        }
    }
}

// K <= 8 * 512 = 4096 (SwAV's 3000 prototypes): 8 columns per thread, up to 512 threads.
extern "C" __global__ void __launch_bounds__(512)
    sk_rows_c8(const float* __restrict__ S, int rows, int K, int tile_rows, float inv_eps, float inv_K, float inv_B,
               const float* __restrict__ colmax, const float* __restrict__ colsum, float* __restrict__ rowmax,
               int first_pass, int output, float* __restrict__ part_sum, float* __restrict__ Q) {
    sk_rows<8>(S, rows, K, tile_rows, inv_eps, inv_K, inv_B, colmax, colsum, rowmax, first_pass, output, part_sum, Q);
}

// K <= 32 * 1024 = 32768: 32 columns per thread, up to 1024 threads (registers may spill; still correct).
extern "C" __global__ void __launch_bounds__(1024)
    sk_rows_c32(const float* __restrict__ S, int rows, int K, int tile_rows, float inv_eps, float inv_K, float inv_B,
                const float* __restrict__ colmax, const float* __restrict__ colsum, float* __restrict__ rowmax,
                int first_pass, int output, float* __restrict__ part_sum, float* __restrict__ Q) {
    sk_rows<32>(S, rows, K, tile_rows, inv_eps, inv_K, inv_B, colmax, colsum, rowmax, first_pass, output, part_sum, Q);
}
