// Kernels that exercise every built-in the shim provides (see tests/emulator.rs).
#include <cuda_bf16.h>

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block sum in a fixed order: warps by shuffles, then warp 0 over the warps' sums.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    v = warp_sum(v);
    __syncthreads();
    if ((tid & 31) == 0) part[tid >> 5] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (nthreads + 31) / 32; ++w) total += part[w];
    return total;
}

// out[block] = sum of x over the block's 3-D threads; ids[global thread] = its linear index.
extern "C" __global__ void __launch_bounds__(512) sum3d(const float* __restrict__ x, float* out, unsigned* ids) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int per = blockDim.x * blockDim.y * blockDim.z;
    const float s = block_sum(__ldg(&x[block * per + tid]));
    ids[block * per + tid] = block * per + tid;
    if (tid == 0) out[block] = s;
}

// Dynamic shared memory: reverse each block's slice through it.
extern "C" __global__ void reverse_blocks(const int* in, int* out, int n) {
    extern __shared__ int tile[];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? in[i] : -1;
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) out[j] = tile[threadIdx.x];
}

// __shfl_down_sync reduction with lanes reading past the warp (they keep their own value).
extern "C" __global__ void shfl_down_sum(const float* x, float* out) {
    float v = x[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) out[threadIdx.x >> 5] = v;
}

// Atomics from every thread of every block.
extern "C" __global__ void atomics(float* fsum, int* isum, unsigned* umax, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        atomicAdd(fsum, 1.0f);
        atomicAdd(isum, (int)i);
        atomicMax(umax, (unsigned)i);
    }
}

// bf16 conversions and the fast math functions.
extern "C" __global__ void convert(const float* x, __nv_bfloat16* y, float* back, float* math, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = __float2bfloat16(x[i]);
        back[i] = __bfloat162float(y[i]);
        math[i] = __expf(x[i]) + rsqrtf(fabsf(x[i]) + 1.0f) + fmaxf(x[i], 0.0f) + (float)min(i, 3);
    }
}

// Scalars of every kind, echoed.
extern "C" __global__ void scalars(unsigned long long* out, int a, unsigned b, float c, long long d, unsigned long long e,
                                   const unsigned char* bytes) {
    if (threadIdx.x == 0) {
        out[0] = (unsigned long long)(long long)a;
        out[1] = b;
        out[2] = (unsigned long long)__float_as_uint(c);
        out[3] = (unsigned long long)d;
        out[4] = e;
        out[5] = bytes[0] + bytes[1];
    }
}

// A barrier inside divergent code: a deadlock the emulator must report.
extern "C" __global__ void divergent_barrier(float* x) {
    if (threadIdx.x < 16) __syncthreads();
    x[threadIdx.x] = 1.0f;
}

// A shuffle inside divergent code: lanes 16.. never take part.
extern "C" __global__ void divergent_shuffle(float* x) {
    if (threadIdx.x < 16) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}

// Off by one: writes x[n].
extern "C" __global__ void overrun(float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) x[i] = 0.0f;
}

// A race: every thread reads its neighbour's shared slot without a barrier.
extern "C" __global__ void racy(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Optional output: a null pointer is allowed.
extern "C" __global__ void optional_out(const float* x, float* maybe, float* out) {
    out[threadIdx.x] = x[threadIdx.x] + (maybe ? 1.0f : 0.0f);
    if (maybe) maybe[threadIdx.x] = 7.0f;
}

// Half the block waits at __syncthreads, the other half at a warp shuffle: a true deadlock.
extern "C" __global__ void deadlock(float* x) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
    }
}
