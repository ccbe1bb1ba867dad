// Prototype normalisation and cluster statistics. CPU twins: swav-model head.rs (Prototypes::normalize)
// and the cluster statistics at the end of step.rs; plans: prototypes_cuda.rs.
//
// proto_normalize: each row of the prototype matrix C [K, D] to unit L2 norm, in place, w *= 1 /
// max(||w||, 1e-12) (the official code's normalisation before every step, without gradient). One block
// per row, fp32, fixed-order block reduction.
//
// Cluster statistics of a step's codes Q [B, K] (the metrics: is the model collapsing?):
// cluster_argmax: one block per row, the index of the row's maximum (the first one on ties, as the CPU's
// strict `>` scan), by a block reduction of (value, index) pairs that prefers the larger value, then the
// smaller index: deterministic. cluster_colsum: one thread per prototype adds its column over the rows in
// order (the mean code, unnormalised). cluster_stats (one block): the usage histogram hist[k] = number of
// rows whose argmax is k (integer atomics: exact, so deterministic), the number of prototypes used, and
// the entropy -sum p ln p of the mean code p = colsum / sum(colsum); stats = [entropy, used].

#define PROTO_EPS 1e-12f

extern "C" __global__ void proto_normalize(float* __restrict__ w, int D) {
    __shared__ float scratch[32];
    float* row = w + (long long)blockIdx.x * D;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) ss += row[d] * row[d];
    const float inv = 1.0f / fmaxf(sqrtf(swav_block_sum(ss, scratch)), PROTO_EPS);
    for (int d = threadIdx.x; d < D; d += blockDim.x) row[d] *= inv;
}

// The better of two (value, index) candidates: the larger value, then the smaller index. An index of
// -1 is no candidate.
__device__ __forceinline__ void proto_better(float& v, int& i, float ov, int oi) {
    if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) {
        v = ov;
        i = oi;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    cluster_argmax(const float* __restrict__ codes, int K, unsigned* __restrict__ argmax) {
    __shared__ float wv[32];
    __shared__ int wi[32];
    const float* row = codes + (long long)blockIdx.x * K;
    float v = SWAV_NEG_INF;
    int i = -1;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float x = row[k];
        if (i < 0 ? !isnan(x) : x > v) {  // ascending scan: the first maximum; NaN is never a candidate
            v = x;
            i = k;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
        proto_better(v, i, ov, oi);
    }
    if ((threadIdx.x & 31) == 0) {
        wv[threadIdx.x >> 5] = v;
        wi[threadIdx.x >> 5] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) proto_better(v, i, wv[w], wi[w]);
        // A row without a comparable value (all NaN) counts for prototype 0, as on the CPU.
        argmax[blockIdx.x] = i < 0 ? 0u : (unsigned)i;
    }
}

extern "C" __global__ void cluster_colsum(const float* __restrict__ codes, int B, int K, float* __restrict__ colsum) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < K) {
        float s = 0.0f;
        for (int b = 0; b < B; ++b) s += codes[(long long)b * K + k];
        colsum[k] = s;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    cluster_stats(const unsigned* __restrict__ argmax, int B, const float* __restrict__ colsum, int K,
                  unsigned* __restrict__ hist, float* __restrict__ stats) {
    __shared__ float scratch[32];
    for (int k = threadIdx.x; k < K; k += blockDim.x) hist[k] = 0u;
    __syncthreads();
    for (int b = threadIdx.x; b < B; b += blockDim.x) atomicAdd(&hist[argmax[b]], 1u);
    __syncthreads();
    float used = 0.0f, total = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        used += hist[k] > 0u ? 1.0f : 0.0f;
        total += colsum[k];
    }
    used = swav_block_sum(used, scratch);
    total = swav_block_sum(total, scratch);
    float h = 0.0f;
    if (total > 0.0f) {
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float p = colsum[k] / total;
            if (p > 0.0f) h -= p * logf(p);
        }
    }
    h = swav_block_sum(h, scratch);
    if (threadIdx.x == 0) {
        stats[0] = h;
        stats[1] = used;
    }
}
