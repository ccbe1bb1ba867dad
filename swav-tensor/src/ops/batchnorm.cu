// Batch normalisation over the channel (last) dimension of a [rows, C] activation: NHWC BatchNorm2d and
// BatchNorm1d alike. CPU twin: batchnorm.rs (same formulas, same fusion); launch plans: batchnorm_cuda.rs.
//
// Storage: x, y, residual, dy, dx and dresidual are T = float or __nv_bfloat16 (kernels _f32 / _bf16).
// gamma, beta, the running statistics, mean, rstd, dgamma, dbeta and every partial sum are fp32, and all
// arithmetic is fp32. mean and rstd of a training forward are saved as fp32 device buffers for the
// backward (the device twin of the CPU's BnCache).
//
// Determinism: the rows are cut into tiles of `tile_rows` rows (chosen from the shape only, see the
// plan). A block (32 channels x 8 row lanes) sums one tile for 32 consecutive channels (a warp reads 128
// contiguous bytes of a row) and writes the tile's partial sums; a second kernel adds the tiles in index
// order. No atomics: the same input gives the same bits on every run.
//
// Statistics: sums of d = x - x[0][c] (a per-channel shift). Shifted sums keep the variance when
// |mean| >> std, where sum(x^2)/n - mean^2 in fp32 would lose it to cancellation. mean = shift + S1/n,
// var = S2/n - (S1/n)^2 is the biased variance used to normalise; the running variance gets the unbiased
// var * n/(n-1) (PyTorch): running = (1 - momentum) running + momentum stat.
//
// Fusion (why): the forward writes y = relu?((x - mean) rstd gamma + beta [+ residual]) in one pass, because
// the residual add and the ReLU that follow a BN in a ResNet would each cost another full read and write
// of the activation. The backward reads x, y (the ReLU mask: g = dy where y > 0) and dy twice: pass 1 sums
// g and g (x - mean) per tile; the combine ACCUMULATES dgamma += sum g xhat and dbeta += sum g (parameter
// gradients always add, see lib.rs) and turns the sums into per-channel coefficients; pass 2 writes
// dx = a g + b + e (x - mean) and, when the forward had a residual, dresidual = g in the same sweep.

#define BN_CH 32    // channels per block (x)
#define BN_LANES 8  // row lanes per block (y)

// ---- training forward: statistics -------------------------------------------------------------------

// partials[tile][c] = sum of d, partials[tile][C + c] = sum of d^2 over the tile's rows.
template <class T>
__device__ __forceinline__ void bn_stats_partial(const T* __restrict__ x, int rows, int C, int tile_rows,
                                                 float* __restrict__ partials) {
    __shared__ float s1[BN_LANES][BN_CH];
    __shared__ float s2[BN_LANES][BN_CH];
    const int c = blockIdx.x * BN_CH + threadIdx.x;
    const int tile = blockIdx.y;
    const long long r0 = (long long)tile * tile_rows;
    const long long r1 = min(r0 + tile_rows, (long long)rows);
    float a = 0.0f, b = 0.0f;
    if (c < C) {
        const float shift = swav_load(x + c);
        for (long long r = r0 + threadIdx.y; r < r1; r += BN_LANES) {
            const float d = swav_load(x + r * C + c) - shift;
            a += d;
            b += d * d;
        }
    }
    s1[threadIdx.y][threadIdx.x] = a;
    s2[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t1 = 0.0f, t2 = 0.0f;
        for (int l = 0; l < BN_LANES; ++l) {
            t1 += s1[l][threadIdx.x];
            t2 += s2[l][threadIdx.x];
        }
        partials[(size_t)tile * 2 * C + c] = t1;
        partials[(size_t)tile * 2 * C + C + c] = t2;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    bn_stats_partial_f32(const float* __restrict__ x, int rows, int C, int tile_rows, float* __restrict__ partials) {
    bn_stats_partial(x, rows, C, tile_rows, partials);
}

extern "C" __global__ void __launch_bounds__(256)
    bn_stats_partial_bf16(const __nv_bfloat16* __restrict__ x, int rows, int C, int tile_rows,
                          float* __restrict__ partials) {
    bn_stats_partial(x, rows, C, tile_rows, partials);
}

// Adds the tiles of `partials` (the first 2C values of each of `tiles` rows, sums of `parts` values
// per channel) in a fixed order: lane l takes tiles l, l + 8, ..., then the lanes are added in order.
// Thread (c, 0) gets the totals. Every thread of the block calls it.
__device__ __forceinline__ void bn_sum_tiles(const float* __restrict__ partials, int tiles, int C, int c, float* t1,
                                             float* t2) {
    __shared__ float s1[BN_LANES][BN_CH];
    __shared__ float s2[BN_LANES][BN_CH];
    float a = 0.0f, b = 0.0f;
    if (c < C) {
        for (int t = threadIdx.y; t < tiles; t += BN_LANES) {
            a += partials[(size_t)t * 2 * C + c];
            b += partials[(size_t)t * 2 * C + C + c];
        }
    }
    s1[threadIdx.y][threadIdx.x] = a;
    s2[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    *t1 = 0.0f;
    *t2 = 0.0f;
    if (threadIdx.y == 0) {
        for (int l = 0; l < BN_LANES; ++l) {
            *t1 += s1[l][threadIdx.x];
            *t2 += s2[l][threadIdx.x];
        }
    }
}

// mean, rstd (saved for the backward) and the running statistics, from the tiles' shifted sums.
template <class T>
__device__ __forceinline__ void bn_stats_combine(const T* __restrict__ x, const float* __restrict__ partials, int tiles,
                                                 int rows, int C, float momentum, float eps, float* __restrict__ mean,
                                                 float* __restrict__ rstd, float* __restrict__ running_mean,
                                                 float* __restrict__ running_var) {
    const int c = blockIdx.x * BN_CH + threadIdx.x;
    float s1, s2;
    bn_sum_tiles(partials, tiles, C, c, &s1, &s2);
    if (threadIdx.y == 0 && c < C) {
        const float n = (float)rows;
        const float m1 = s1 / n;
        const float var = fmaxf(s2 / n - m1 * m1, 0.0f);
        const float mu = swav_load(x + c) + m1;
        mean[c] = mu;
        rstd[c] = 1.0f / sqrtf(var + eps);
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mu;
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (var * n / (n - 1.0f));
    }
}

extern "C" __global__ void __launch_bounds__(256)
    bn_stats_combine_f32(const float* __restrict__ x, const float* __restrict__ partials, int tiles, int rows, int C,
                         float momentum, float eps, float* __restrict__ mean, float* __restrict__ rstd,
                         float* __restrict__ running_mean, float* __restrict__ running_var) {
    bn_stats_combine(x, partials, tiles, rows, C, momentum, eps, mean, rstd, running_mean, running_var);
}

extern "C" __global__ void __launch_bounds__(256)
    bn_stats_combine_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ partials, int tiles, int rows,
                          int C, float momentum, float eps, float* __restrict__ mean, float* __restrict__ rstd,
                          float* __restrict__ running_mean, float* __restrict__ running_var) {
    bn_stats_combine(x, partials, tiles, rows, C, momentum, eps, mean, rstd, running_mean, running_var);
}

// ---- forward: normalisation (training and evaluation) -----------------------------------------------

// Evaluation mode: rstd = 1 / sqrt(running_var + eps).
extern "C" __global__ void bn_rstd_from_var(const float* __restrict__ running_var, int C, float eps,
                                            float* __restrict__ rstd) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) rstd[c] = 1.0f / sqrtf(running_var[c] + eps);
}

// y = relu?((x - mean) (rstd gamma) + beta [+ residual]) over n = rows * C values, grid-stride. The channel
// of element i is i mod C, tracked incrementally (the stride mod C is added each step) instead of dividing.
template <class T>
__device__ __forceinline__ void bn_apply(const T* __restrict__ x, const T* __restrict__ residual,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const float* __restrict__ gamma, const float* __restrict__ beta, long long n,
                                         int C, int relu, T* __restrict__ y) {
    const long long stride = swav_grid_stride();
    long long i = swav_first_index();
    int c = (int)(i % C);
    const int step = (int)(stride % C);
    for (; i < n; i += stride) {
        float v = (swav_load(x + i) - mean[c]) * (rstd[c] * gamma[c]) + beta[c];
        if (residual) v += swav_load(residual + i);
        if (relu) v = fmaxf(v, 0.0f);
        swav_store(y + i, v);
        c += step;
        if (c >= C) c -= C;
    }
}

extern "C" __global__ void bn_apply_f32(const float* __restrict__ x, const float* __restrict__ residual,
                                        const float* __restrict__ mean, const float* __restrict__ rstd,
                                        const float* __restrict__ gamma, const float* __restrict__ beta, long long n,
                                        int C, int relu, float* __restrict__ y) {
    bn_apply(x, residual, mean, rstd, gamma, beta, n, C, relu, y);
}

extern "C" __global__ void bn_apply_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ residual,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const float* __restrict__ gamma, const float* __restrict__ beta, long long n,
                                         int C, int relu, __nv_bfloat16* __restrict__ y) {
    bn_apply(x, residual, mean, rstd, gamma, beta, n, C, relu, y);
}

// ---- backward ---------------------------------------------------------------------------------------

// g = dy, masked by the fused ReLU where the forward's output was not positive.
template <class T>
__device__ __forceinline__ float bn_grad(const T* y, const T* dy, long long i, int relu) {
    const float g = swav_load(dy + i);
    return (relu && swav_load(y + i) <= 0.0f) ? 0.0f : g;
}

// partials[tile][c] = sum of g, partials[tile][C + c] = sum of g (x - mean) over the tile's rows.
template <class T>
__device__ __forceinline__ void bn_backward_partial(const T* __restrict__ x, const T* __restrict__ y,
                                                    const T* __restrict__ dy, const float* __restrict__ mean, int rows,
                                                    int C, int tile_rows, int relu, float* __restrict__ partials) {
    __shared__ float s1[BN_LANES][BN_CH];
    __shared__ float s2[BN_LANES][BN_CH];
    const int c = blockIdx.x * BN_CH + threadIdx.x;
    const int tile = blockIdx.y;
    const long long r0 = (long long)tile * tile_rows;
    const long long r1 = min(r0 + tile_rows, (long long)rows);
    float a = 0.0f, b = 0.0f;
    if (c < C) {
        const float mu = mean[c];
        for (long long r = r0 + threadIdx.y; r < r1; r += BN_LANES) {
            const long long i = r * C + c;
            const float g = bn_grad(y, dy, i, relu);
            a += g;
            b += g * (swav_load(x + i) - mu);
        }
    }
    s1[threadIdx.y][threadIdx.x] = a;
    s2[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t1 = 0.0f, t2 = 0.0f;
        for (int l = 0; l < BN_LANES; ++l) {
            t1 += s1[l][threadIdx.x];
            t2 += s2[l][threadIdx.x];
        }
        partials[(size_t)tile * 2 * C + c] = t1;
        partials[(size_t)tile * 2 * C + C + c] = t2;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    bn_backward_partial_f32(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ dy,
                            const float* __restrict__ mean, int rows, int C, int tile_rows, int relu,
                            float* __restrict__ partials) {
    bn_backward_partial(x, y, dy, mean, rows, C, tile_rows, relu, partials);
}

extern "C" __global__ void __launch_bounds__(256)
    bn_backward_partial_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
                             const __nv_bfloat16* __restrict__ dy, const float* __restrict__ mean, int rows, int C,
                             int tile_rows, int relu, float* __restrict__ partials) {
    bn_backward_partial(x, y, dy, mean, rows, C, tile_rows, relu, partials);
}

// dgamma += sum g xhat, dbeta += sum g; coef = [a | b | e] with dx = a g + b + e (x - mean):
// a = gamma rstd, b = -a mean(g), e = -a rstd mean(g xhat).
extern "C" __global__ void __launch_bounds__(256)
    bn_backward_combine(const float* __restrict__ partials, int tiles, int rows, int C, const float* __restrict__ rstd,
                        const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                        float* __restrict__ coef) {
    const int c = blockIdx.x * BN_CH + threadIdx.x;
    float sum_g, sum_gx;
    bn_sum_tiles(partials, tiles, C, c, &sum_g, &sum_gx);
    if (threadIdx.y == 0 && c < C) {
        const float r = rstd[c];
        const float n = (float)rows;
        const float sum_gxhat = sum_gx * r;
        dgamma[c] += sum_gxhat;
        dbeta[c] += sum_g;
        const float k = gamma[c] * r;
        coef[c] = k;
        coef[C + c] = -k * sum_g / n;
        coef[2 * C + c] = -k * r * sum_gxhat / n;
    }
}

// dx = a g + b + e (x - mean) and, when `dresidual` is not null, dresidual = g. Grid-stride like bn_apply.
template <class T>
__device__ __forceinline__ void bn_backward_dx(const T* __restrict__ x, const T* __restrict__ y,
                                               const T* __restrict__ dy, const float* __restrict__ mean,
                                               const float* __restrict__ coef, long long n, int C, int relu,
                                               T* __restrict__ dx, T* __restrict__ dresidual) {
    const long long stride = swav_grid_stride();
    long long i = swav_first_index();
    int c = (int)(i % C);
    const int step = (int)(stride % C);
    for (; i < n; i += stride) {
        const float g = bn_grad(y, dy, i, relu);
        swav_store(dx + i, coef[c] * g + coef[C + c] + coef[2 * C + c] * (swav_load(x + i) - mean[c]));
        if (dresidual) swav_store(dresidual + i, g);
        c += step;
        if (c >= C) c -= C;
    }
}

extern "C" __global__ void bn_backward_dx_f32(const float* __restrict__ x, const float* __restrict__ y,
                                              const float* __restrict__ dy, const float* __restrict__ mean,
                                              const float* __restrict__ coef, long long n, int C, int relu,
                                              float* __restrict__ dx, float* __restrict__ dresidual) {
    bn_backward_dx(x, y, dy, mean, coef, n, C, relu, dx, dresidual);
}

extern "C" __global__ void bn_backward_dx_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
                                               const __nv_bfloat16* __restrict__ dy, const float* __restrict__ mean,
                                               const float* __restrict__ coef, long long n, int C, int relu,
                                               __nv_bfloat16* __restrict__ dx, __nv_bfloat16* __restrict__ dresidual) {
    bn_backward_dx(x, y, dy, mean, coef, n, C, relu, dx, dresidual);
}
