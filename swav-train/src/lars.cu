// Multi-tensor SGD with momentum wrapped in LARC (apex, clip=False), the official SwAV optimizer. CPU
// twin: lars.rs (its header states apex's edge cases); plan: lars_cuda.rs.
//
// One launch updates every parameter tensor. `table` holds one row per tensor, 4 unsigned long longs:
// the device addresses of the parameter, its gradient and its momentum buffer (fp32), and its length.
// The work is cut into chunks of `chunk_len` values of one tensor (the plan lists them in `chunks`:
// tensor, first value), so that a block never spans two tensors and the cut depends on the shapes only.
// Frozen tensors have no chunk: nothing reads or writes them (no decay, no momentum), as a parameter
// whose .grad is None in PyTorch.
//
// Per tensor (LARC): when ||w|| > 0 and ||g|| > 0, s = trust ||w|| / (||g|| + wd ||w|| + 1e-8) and the
// update is u = (g + wd w) s; otherwise u = g (no decay). Plain SGD (lars = 0): u = g + wd w. Then
// buf = momentum buf + u and w -= lr buf. Norms: lars_sumsq writes each chunk's sums of w^2 and g^2
// (block reduction), lars_coefficients adds a tensor's chunks in index order (lane l takes chunks
// l, l + blockDim, ..., then the block reduction): deterministic, no atomics. coef[t] = (s, d) with
// u = (g + d w) s, so the update kernel has no branch on the case.
//
// skip[0] != 0 (set by the loss kernel when the loss is not finite) makes every kernel return at once:
// the step updates nothing. The check is the first statement, uniform over the block.

extern "C" __global__ void __launch_bounds__(256)
    lars_sumsq(const unsigned long long* __restrict__ table, const unsigned* __restrict__ chunks, int chunk_len,
               const unsigned* __restrict__ skip, float* __restrict__ partials) {
    if (skip[0]) return;
    __shared__ float scratch[32];
    const unsigned t = chunks[2 * blockIdx.x];
    const long long first = chunks[2 * blockIdx.x + 1];
    const long long end = min(first + chunk_len, (long long)table[4 * t + 3]);
    const float* w = (const float*)table[4 * t];
    const float* g = (const float*)table[4 * t + 1];
    float ww = 0.0f, gg = 0.0f;
    for (long long i = first + threadIdx.x; i < end; i += blockDim.x) {
        ww += w[i] * w[i];
        gg += g[i] * g[i];
    }
    ww = swav_block_sum(ww, scratch);
    gg = swav_block_sum(gg, scratch);
    if (threadIdx.x == 0) {
        partials[2 * blockIdx.x] = ww;
        partials[2 * blockIdx.x + 1] = gg;
    }
}

// One block per tensor: its chunks are tensor_chunks[t] .. tensor_chunks[t + 1].
extern "C" __global__ void __launch_bounds__(256)
    lars_coefficients(const unsigned* __restrict__ tensor_chunks, const float* __restrict__ partials,
                      float weight_decay, float trust, int lars, const unsigned* __restrict__ skip,
                      float* __restrict__ coef) {
    if (skip[0]) return;
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    float ww = 0.0f, gg = 0.0f;
    for (unsigned c = tensor_chunks[t] + threadIdx.x; c < tensor_chunks[t + 1]; c += blockDim.x) {
        ww += partials[2 * c];
        gg += partials[2 * c + 1];
    }
    const float wn = sqrtf(swav_block_sum(ww, scratch));
    const float gn = sqrtf(swav_block_sum(gg, scratch));
    if (threadIdx.x == 0) {
        float s = 1.0f, d = weight_decay;
        if (lars) {
            if (wn > 0.0f && gn > 0.0f) {
                s = trust * wn / (gn + weight_decay * wn + 1e-8f);
            } else {
                d = 0.0f;
            }
        }
        coef[2 * t] = s;
        coef[2 * t + 1] = d;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    lars_update(const unsigned long long* __restrict__ table, const unsigned* __restrict__ chunks, int chunk_len,
                const float* __restrict__ coef, float lr, float momentum, const unsigned* __restrict__ skip) {
    if (skip[0]) return;
    const unsigned t = chunks[2 * blockIdx.x];
    const long long first = chunks[2 * blockIdx.x + 1];
    const long long end = min(first + chunk_len, (long long)table[4 * t + 3]);
    float* w = (float*)table[4 * t];
    const float* g = (const float*)table[4 * t + 1];
    float* buf = (float*)table[4 * t + 2];
    const float s = coef[2 * t];
    const float d = coef[2 * t + 1];
    for (long long i = first + threadIdx.x; i < end; i += blockDim.x) {
        // d == 0 skips the product, so a non-finite w does not turn g into NaN (the CPU never reads w then).
        const float u = (d != 0.0f ? g[i] + d * w[i] : g[i]) * s;
        const float b = momentum * buf[i] + u;
        buf[i] = b;
        w[i] -= lr * b;
    }
}
