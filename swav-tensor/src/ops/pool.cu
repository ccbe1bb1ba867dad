// Pooling on NHWC activations: max-pool (any window, stride and padding; ResNet's is 3x3 stride 2 pad 1)
// with argmax indices, and global average pooling [n, h, w, c] -> [n, c]. CPU twin: pool.rs; plans:
// pool_cuda.rs.
//
// Storage: x, y (max-pool), dy (max-pool), dx are T = float or __nv_bfloat16 (_f32 / _bf16 kernels); the
// argmax indices are u32 flat input indices (the input must hold fewer than 2^32 values); the average
// pool's output and its gradient are fp32 (pooled features feed the fp32 projection head).
//
// Max-pool forward: one thread per output value, channels fastest (coalesced). The window is scanned in
// (ky, kx) order and `v > best || isnan(v)` keeps the first maximum and propagates NaN, as PyTorch and
// the CPU do; the argmax starts at the window's first in-bounds element (PyTorch), so padding never wins.
//
// Max-pool backward is a GATHER, not a scatter: one thread per input value visits the outputs whose
// windows contain it, in ascending output order, and adds the gradients of those that chose it. No
// atomics, and the additions happen in the same order as the CPU's scatter loop: the same bits.
//
// Average pool: one block per (image, 32 channels); 8 lanes add every 8th pixel, then the lanes are
// added in order (deterministic). Backward spreads dy / (h w) over the pixels (elementwise).

#define POOL_CH 32
#define POOL_LANES 8

template <class T>
__device__ __forceinline__ void maxpool_forward(const T* __restrict__ x, int N, int H, int W, int C, int OH, int OW,
                                                int k, int stride, int pad, T* __restrict__ y,
                                                unsigned* __restrict__ idx) {
    const long long total = (long long)N * OH * OW * C;
    for (long long i = swav_first_index(); i < total; i += swav_grid_stride()) {
        const int c = (int)(i % C);
        long long t = i / C;
        const int ox = (int)(t % OW);
        t /= OW;
        const int oy = (int)(t % OH);
        const int b = (int)(t / OH);
        float best = SWAV_NEG_INF;
        unsigned arg = 0xffffffffu;
        for (int ky = 0; ky < k; ++ky) {
            const int iy = oy * stride + ky - pad;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int ix = ox * stride + kx - pad;
                if (ix < 0 || ix >= W) continue;
                const unsigned src = (unsigned)((((long long)b * H + iy) * W + ix) * C + c);
                const float v = swav_load(x + src);
                if (arg == 0xffffffffu) arg = src;
                if (v > best || isnan(v)) {
                    best = v;
                    arg = src;
                }
            }
        }
        swav_store(y + i, best);
        idx[i] = arg;
    }
}

extern "C" __global__ void maxpool_forward_f32(const float* __restrict__ x, int N, int H, int W, int C, int OH, int OW,
                                               int k, int stride, int pad, float* __restrict__ y,
                                               unsigned* __restrict__ idx) {
    maxpool_forward(x, N, H, W, C, OH, OW, k, stride, pad, y, idx);
}

extern "C" __global__ void maxpool_forward_bf16(const __nv_bfloat16* __restrict__ x, int N, int H, int W, int C, int OH,
                                                int OW, int k, int stride, int pad, __nv_bfloat16* __restrict__ y,
                                                unsigned* __restrict__ idx) {
    maxpool_forward(x, N, H, W, C, OH, OW, k, stride, pad, y, idx);
}

// First output index o (along one axis) whose window [o stride - pad, o stride - pad + k) contains i.
__device__ __forceinline__ int pool_first_window(int i, int k, int stride, int pad) {
    const int num = i + pad - k + 1;
    return num <= 0 ? 0 : (num + stride - 1) / stride;
}

template <class T>
__device__ __forceinline__ void maxpool_backward(const T* __restrict__ dy, const unsigned* __restrict__ idx, int N,
                                                 int H, int W, int C, int OH, int OW, int k, int stride, int pad,
                                                 T* __restrict__ dx) {
    const long long total = (long long)N * H * W * C;
    for (long long i = swav_first_index(); i < total; i += swav_grid_stride()) {
        const int c = (int)(i % C);
        long long t = i / C;
        const int ix = (int)(t % W);
        t /= W;
        const int iy = (int)(t % H);
        const int b = (int)(t / H);
        const int oy1 = min((iy + pad) / stride, OH - 1);
        const int ox1 = min((ix + pad) / stride, OW - 1);
        float acc = 0.0f;
        for (int oy = pool_first_window(iy, k, stride, pad); oy <= oy1; ++oy) {
            for (int ox = pool_first_window(ix, k, stride, pad); ox <= ox1; ++ox) {
                const long long o = (((long long)b * OH + oy) * OW + ox) * C + c;
                if (idx[o] == (unsigned)i) acc += swav_load(dy + o);
            }
        }
        swav_store(dx + i, acc);
    }
}

extern "C" __global__ void maxpool_backward_f32(const float* __restrict__ dy, const unsigned* __restrict__ idx, int N,
                                                int H, int W, int C, int OH, int OW, int k, int stride, int pad,
                                                float* __restrict__ dx) {
    maxpool_backward(dy, idx, N, H, W, C, OH, OW, k, stride, pad, dx);
}

extern "C" __global__ void maxpool_backward_bf16(const __nv_bfloat16* __restrict__ dy, const unsigned* __restrict__ idx,
                                                 int N, int H, int W, int C, int OH, int OW, int k, int stride, int pad,
                                                 __nv_bfloat16* __restrict__ dx) {
    maxpool_backward(dy, idx, N, H, W, C, OH, OW, k, stride, pad, dx);
}

// y[b][c] = mean over the HW pixels of image b. Grid (ceil(C / 32), N), block (32, 8).
template <class T>
__device__ __forceinline__ void avgpool_forward(const T* __restrict__ x, int HW, int C, float* __restrict__ y) {
    __shared__ float part[POOL_LANES][POOL_CH];
    const int c = blockIdx.x * POOL_CH + threadIdx.x;
    const int b = blockIdx.y;
    float acc = 0.0f;
    if (c < C) {
        const T* img = x + (long long)b * HW * C + c;
        for (int p = threadIdx.y; p < HW; p += POOL_LANES) acc += swav_load(img + (long long)p * C);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float s = 0.0f;
        for (int l = 0; l < POOL_LANES; ++l) s += part[l][threadIdx.x];
        y[(long long)b * C + c] = s * (1.0f / (float)HW);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    avgpool_forward_f32(const float* __restrict__ x, int HW, int C, float* __restrict__ y) {
    avgpool_forward(x, HW, C, y);
}

extern "C" __global__ void __launch_bounds__(256)
    avgpool_forward_bf16(const __nv_bfloat16* __restrict__ x, int HW, int C, float* __restrict__ y) {
    avgpool_forward(x, HW, C, y);
}

// dx[b][p][c] = dy[b][c] / HW, grid-stride over the N HW C input values.
template <class T>
__device__ __forceinline__ void avgpool_backward(const float* __restrict__ dy, int N, int HW, int C,
                                                 T* __restrict__ dx) {
    const long long total = (long long)N * HW * C;
    const float inv = 1.0f / (float)HW;
    for (long long i = swav_first_index(); i < total; i += swav_grid_stride()) {
        const long long b = i / ((long long)HW * C);
        const int c = (int)(i % C);
        swav_store(dx + i, dy[b * C + c] * inv);
    }
}

extern "C" __global__ void avgpool_backward_f32(const float* __restrict__ dy, int N, int HW, int C,
                                                float* __restrict__ dx) {
    avgpool_backward(dy, N, HW, C, dx);
}

extern "C" __global__ void avgpool_backward_bf16(const float* __restrict__ dy, int N, int HW, int C,
                                                 __nv_bfloat16* __restrict__ dx) {
    avgpool_backward(dy, N, HW, C, dx);
}
