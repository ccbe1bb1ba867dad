// The swapped-prediction loss of SwAV and its gradient, fp32. CPU twin: loss.rs (formula and gradient in
// its header); plan: loss_cuda.rs.
//
// Layout: scores [V B, K] crop-major (rows [v B, (v + 1) B) are crop v); codes [A, B, K], the codes of
// crop assign[a] for a < A (stacked in crops_for_assign order); assign [A] crop ids.
//
// swav_loss_rows: one block per score row (v, b). It takes the row's log-softmax of s / T with the
// maximum subtracted (lse = m/T + log sum exp(s/T - m/T)), then for every assigned crop a != v the code
// mass q_sum_a = sum_k q_a[b,k] and the cross term sum_k q_a[b,k] log p_k, and writes
//   row_loss[row] = -sum_a cross_a,
//   dscores[row,k] = (p_k sum_a q_sum_a - sum_a q_a[b,k]) * grad_scale,   grad_scale = 1 / (T B (V-1) A),
// which is the CPU's sum over a of (p_k q_sum_a - q_a[b,k]) regrouped (no per-a array in registers). The
// row is re-read from global memory in each pass (a few KB: cache hits), so any K works.
//
// A non-finite score anywhere, even in a row without loss terms (an assigned crop's own scores feed only
// Sinkhorn), makes that row's loss NaN: the device twin of the CPU step's check of every score.
//
// swav_loss_total: one block adds row_loss in a fixed order (thread t takes rows t, t + blockDim, ...,
// then the block reduction of common.cuh): loss = total * loss_scale, loss_scale = 1 / (B (V-1) A).
// Deterministic, no atomics. It also writes skip[0] = 1 when the loss is not finite (0 otherwise): the
// optimizer kernels (lars.cu) read that flag and leave every parameter untouched, so a diverged step
// updates nothing, as on the CPU. The loss kernel owns the flag: it writes it on every step.

extern "C" __global__ void __launch_bounds__(256)
    swav_loss_rows(const float* __restrict__ scores, const float* __restrict__ codes, const int* __restrict__ assign,
                   int A, int B, int K, float inv_t, float grad_scale, float* __restrict__ dscores,
                   float* __restrict__ row_loss) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int v = row / B;
    const int b = row % B;
    const float* s = scores + (long long)row * K;
    float m = SWAV_NEG_INF, bad = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        m = fmaxf(m, s[k]);
        if (!isfinite(s[k])) bad = 1.0f;  // fmaxf ignores NaN: count them apart
    }
    const float shift = swav_block_max(m, scratch) * inv_t;
    bad = swav_block_max(bad, scratch);
    float e = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) e += expf(s[k] * inv_t - shift);
    const float lse = logf(swav_block_sum(e, scratch)) + shift;
    float q_total = 0.0f;
    float loss = 0.0f;
    for (int a = 0; a < A; ++a) {
        if (assign[a] == v) continue;
        const float* q = codes + ((long long)a * B + b) * K;
        float q_sum = 0.0f, cross = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            q_sum += q[k];
            cross += q[k] * (s[k] * inv_t - lse);
        }
        q_total += swav_block_sum(q_sum, scratch);
        loss -= swav_block_sum(cross, scratch);
    }
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float q_k = 0.0f;
        for (int a = 0; a < A; ++a) {
            if (assign[a] != v) q_k += codes[((long long)a * B + b) * K + k];
        }
        const float p = expf(s[k] * inv_t - lse);
        dscores[(long long)row * K + k] = (p * q_total - q_k) * grad_scale;
    }
    if (threadIdx.x == 0) row_loss[row] = bad != 0.0f ? __int_as_float(0x7fc00000) : loss;
}

extern "C" __global__ void __launch_bounds__(1024)
    swav_loss_total(const float* __restrict__ row_loss, int rows, float loss_scale, float* __restrict__ loss,
                    unsigned* __restrict__ skip) {
    __shared__ float scratch[32];
    float t = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) t += row_loss[r];
    const float total = swav_block_sum(t, scratch) * loss_scale;
    if (threadIdx.x == 0) {
        loss[0] = total;
        skip[0] = isfinite(total) ? 0u : 1u;
    }
}
