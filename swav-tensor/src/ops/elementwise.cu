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

// y[r, c] += b[c] for every row: a linear layer's bias, after the GEMM wrote x w^T.
extern "C" __global__ void ew_add_rows_f32(float* __restrict__ y, const float* __restrict__ b, long long n, int cols) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) y[i] += b[i % cols];
}

// acc[c] += sum over rows of x[r, c]: a linear layer's bias gradient. One thread per column sums its
// rows in order, so the result is the same bits on every run (no atomics); the heads are narrow enough
// (a few thousand columns) for this to be cheap.
extern "C" __global__ void ew_col_sum_add_f32(const float* __restrict__ x, int rows, int cols, float* __restrict__ acc) {
    for (long long c = swav_first_index(); c < cols; c += swav_grid_stride()) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += x[(long long)r * cols + c];
        acc[c] += s;
    }
}

// y = max(x, 0).
extern "C" __global__ void ew_relu_f32(const float* __restrict__ x, long long n, float* __restrict__ y) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) y[i] = fmaxf(x[i], 0.0f);
}

// dx = dy where y > 0, else 0 (y is the forward's output).
extern "C" __global__ void ew_relu_backward_f32(const float* __restrict__ y, const float* __restrict__ dy, long long n,
                                                float* __restrict__ dx) {
    for (long long i = swav_first_index(); i < n; i += swav_grid_stride()) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}
