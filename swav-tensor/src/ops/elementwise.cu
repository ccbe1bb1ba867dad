// Elementwise kernels: storage casts (fp32 <-> bf16, which is also the upload conversion of a loader
// batch, whose crops arrive normalised in fp32 NHWC), accumulation y += x (gradients of a value used
// twice), scaling, and fill. CPU twins: Tensor::add_assign, scale, fill (tensor.rs) and the bf16 rounding
// of swav-cuda-emu (round to nearest even, as __float2bfloat16).
//
// Memory-bound: a grid-stride loop, one value per thread per step, arithmetic in fp32. Rows are not
// involved, so any length works; no reduction, so results are trivially deterministic.

extern "C" __global__ void ew_cast_f32_bf16(const float* __restrict__ x, long long n, __nv_bfloat16* __restrict__ y) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) y[i] = __float2bfloat16(x[i]);
}

extern "C" __global__ void ew_cast_bf16_f32(const __nv_bfloat16* __restrict__ x, long long n, float* __restrict__ y) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) y[i] = __bfloat162float(x[i]);
}

// y += x.
extern "C" __global__ void ew_add_f32(float* __restrict__ y, const float* __restrict__ x, long long n) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) y[i] += x[i];
}

// y += x in fp32, rounded once to bf16.
extern "C" __global__ void ew_add_bf16(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                                       long long n) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) {
        y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(x[i]));
    }
}

// x *= s.
extern "C" __global__ void ew_scale_f32(float* __restrict__ x, long long n, float s) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) x[i] *= s;
}

extern "C" __global__ void ew_fill_f32(float* __restrict__ x, long long n, float v) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) x[i] = v;
}

extern "C" __global__ void ew_fill_bf16(__nv_bfloat16* __restrict__ x, long long n, float v) {
    const __nv_bfloat16 b = __float2bfloat16(v);
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) x[i] = b;
}
