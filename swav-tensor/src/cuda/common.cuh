// Helpers shared by every kernel file of swav-rs. Prepended to each file before it is compiled, by NVRTC
// and by the emulator alike (see `Source::text` in cuda/mod.rs), so each file still compiles on its own.
//
// Reductions here are deterministic: a warp adds by an xor butterfly (every lane ends with the same
// bits), a block adds its warps' results in warp order. Every thread of the block must call the block
// reductions (they synchronise), and blockDim.x must be a multiple of 32.

// bf16 storage. NVRTC has no built-in cuda_bf16.h (checked with NVRTC 13.5: "could not open source file")
// and the nvidia-cuda-nvrtc wheel ships no headers, so unless the CUDA headers are on the include path
// (then the official type is used), a minimal stand-in with the same name, layout and conversions is
// defined here: cvt.rn.bf16.f32 (round to nearest even, NaN -> canonical NaN) is what cuda_bf16.h itself
// uses on sm_80 and later. The emulator provides the header (its shim defines the type).
#if __has_include(<cuda_bf16.h>)
#include <cuda_bf16.h>
#else
struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
};
__device__ __forceinline__ __nv_bfloat16 __float2bfloat16(float f) {
    __nv_bfloat16 r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.__x) : "f"(f));
#else
    const unsigned u = __float_as_uint(f);
    r.__x = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fff : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    return r;
}
__device__ __forceinline__ float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.__x << 16); }
#endif

#define SWAV_NEG_INF (-__int_as_float(0x7f800000))

// Activation storage <-> fp32 arithmetic.
__device__ __forceinline__ float swav_load(const float* p) { return *p; }
__device__ __forceinline__ float swav_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void swav_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void swav_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float swav_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float swav_warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum (IS_MAX false) or maximum of v over a 1-D block, returned to every thread. `scratch`: 32 floats
// of shared memory, reusable right after the call returns.
template <bool IS_MAX>
__device__ __forceinline__ float swav_block_reduce(float v, float* scratch) {
    v = IS_MAX ? swav_warp_max(v) : swav_warp_sum(v);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    __syncthreads();  // the previous call's readers are done with `scratch`
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < warps; ++w) r = IS_MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

__device__ __forceinline__ float swav_block_sum(float v, float* scratch) { return swav_block_reduce<false>(v, scratch); }
__device__ __forceinline__ float swav_block_max(float v, float* scratch) { return swav_block_reduce<true>(v, scratch); }

// Grid-stride loop bounds for elementwise kernels over n elements.
__device__ __forceinline__ long long swav_first_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long swav_grid_stride() { return (long long)gridDim.x * blockDim.x; }
