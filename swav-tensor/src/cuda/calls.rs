//! cuDNN convolutions and cuBLAS GEMMs as plain data: every dimension, stride, layout, transpose and
//! leading dimension of a call, exactly what the runtime hands the libraries. A call is built from the
//! op's shapes here, and [`ConvCall::execute_cpu`] / [`GemmCall::execute_cpu`] interpret it with the
//! CPU engine, reading and writing memory only through the call's own descriptors. The tests run every
//! call an op makes this way against the CPU op itself, so a wrong stride, a swapped transpose or a
//! row-/column-major slip fails on the CPU, before it meets a GPU.
//!
//! Conventions: activations NHWC, filters KRSC (= the engine's OHWI), cuDNN's `CROSS_CORRELATION`
//! (what deep-learning frameworks call convolution), fp32 accumulation always (`compute = F32`), bf16
//! or fp32 storage. cuBLAS is column-major: the engine's row-major `[rows, cols]` matrix is, to cuBLAS,
//! a `cols x rows` matrix with leading dimension `cols`.

use crate::cuda::plan::Storage;
use crate::error::shape_err;
use crate::matmul::{matmul, MatMut, MatRef, Threads};
use crate::ops::conv::ConvGeom;
use crate::Result;

/// A 4-D tensor as cuDNN's `cudnnSetTensor4dDescriptorEx` sees it: sizes in N, C, H, W order and
/// the stride of each (in elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// Sizes `[n, c, h, w]`.
    pub dims: [usize; 4],
    /// Strides `[n, c, h, w]`, in elements.
    pub strides: [usize; 4],
    /// Element type.
    pub storage: Storage,
}

impl TensorDesc {
    /// A packed NHWC tensor of `[n, h, w, c]` values, described in cuDNN's NCHW order.
    pub fn nhwc(n: usize, c: usize, h: usize, w: usize, storage: Storage) -> TensorDesc {
        TensorDesc { dims: [n, c, h, w], strides: [h * w * c, 1, w * c, c], storage }
    }

    /// Elements the descriptor reaches (the buffer length it needs).
    pub fn span(&self) -> usize {
        1 + self.dims.iter().zip(&self.strides).map(|(&d, &s)| (d.max(1) - 1) * s).sum::<usize>()
    }

    /// The offset of element (n, c, h, w).
    fn at(&self, n: usize, c: usize, h: usize, w: usize) -> usize {
        n * self.strides[0] + c * self.strides[1] + h * self.strides[2] + w * self.strides[3]
    }
}

/// A filter as `cudnnSetFilter4dDescriptor` with format `NHWC` sees it: `k` output channels, `c` input
/// channels, `r x s` taps, stored `[k][r][s][c]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterDesc {
    /// Output channels.
    pub k: usize,
    /// Input channels.
    pub c: usize,
    /// Kernel height.
    pub r: usize,
    /// Kernel width.
    pub s: usize,
    /// Element type.
    pub storage: Storage,
}

impl FilterDesc {
    /// Elements of the filter.
    pub fn len(&self) -> usize {
        self.k * self.c * self.r * self.s
    }

    /// Whether the filter has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `cudnnSetConvolution2dDescriptor` plus the math type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDesc {
    /// Zero padding (height, width).
    pub pad: [usize; 2],
    /// Stride (height, width).
    pub stride: [usize; 2],
    /// Dilation (height, width): always 1 in ResNets.
    pub dilation: [usize; 2],
    /// Tensor-core math allowed (`CUDNN_TENSOR_OP_MATH`; bf16 inputs with fp32 accumulation). Off for
    /// fp32, whose calls run with `CUDNN_FMA_MATH`: cuDNN's default math lets Ampere and later cards
    /// round fp32 inputs to TF32 (10-bit mantissa), three orders of magnitude from the CPU op.
    pub tensor_ops: bool,
}

/// Which of the three convolution passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvPass {
    /// `y = alpha conv(x, w) + beta y`.
    Forward,
    /// `dx = alpha conv^T(dy, w) + beta dx`.
    BackwardData,
    /// `dw = alpha corr(x, dy) + beta dw`.
    BackwardFilter,
}

/// One cuDNN convolution call. In the backward passes `y` describes `dy` and `x` describes `dx` (data)
/// or the input `x` (filter); `w` describes `dw` for the filter pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvCall {
    /// The pass.
    pub pass: ConvPass,
    /// Input (or its gradient).
    pub x: TensorDesc,
    /// Filter (or its gradient).
    pub w: FilterDesc,
    /// Output (or its gradient).
    pub y: TensorDesc,
    /// Padding, stride, dilation, math.
    pub conv: ConvDesc,
    /// Scale of the result.
    pub alpha: f32,
    /// Scale of what the destination held (1: accumulate, 0: overwrite).
    pub beta: f32,
}

impl ConvCall {
    /// The call of `pass` for the engine's convolution `g` (NHWC activations, OHWI filter) with
    /// activations and filters stored as `storage`. The filter gradient accumulates (`beta = 1`), as
    /// every parameter gradient of the engine does.
    pub fn new(g: &ConvGeom, pass: ConvPass, storage: Storage) -> ConvCall {
        ConvCall {
            pass,
            x: TensorDesc::nhwc(g.n, g.cin, g.h, g.w, storage),
            w: FilterDesc { k: g.cout, c: g.cin, r: g.kh, s: g.kw, storage },
            y: TensorDesc::nhwc(g.n, g.cout, g.oh, g.ow, storage),
            conv: ConvDesc {
                pad: [g.pad, g.pad],
                stride: [g.stride, g.stride],
                dilation: [1, 1],
                tensor_ops: storage == Storage::Bf16,
            },
            alpha: 1.0,
            beta: if pass == ConvPass::BackwardFilter { 1.0 } else { 0.0 },
        }
    }

    /// The output size cuDNN computes for these descriptors (`cudnnGetConvolution2dForwardOutputDim`).
    pub fn output_dims(&self) -> [usize; 4] {
        let o = |i: usize, k: usize, p: usize, s: usize, d: usize| (i + 2 * p - ((k - 1) * d + 1)) / s + 1;
        let [n, _, h, w] = self.x.dims;
        let c = &self.conv;
        [
            n,
            self.w.k,
            o(h, self.w.r, c.pad[0], c.stride[0], c.dilation[0]),
            o(w, self.w.s, c.pad[1], c.stride[1], c.dilation[1]),
        ]
    }

    /// Checks what cuDNN would refuse: channel counts that disagree, an output that is not what the
    /// descriptors produce, mixed storage types.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(shape_err("cudnn convolution", what));
        if self.x.dims[1] != self.w.c {
            return bad(format!("input has {} channels, filter {}", self.x.dims[1], self.w.c));
        }
        let (h, w) = (self.x.dims[2] + 2 * self.conv.pad[0], self.x.dims[3] + 2 * self.conv.pad[1]);
        if h < self.w.r || w < self.w.s || self.conv.stride.contains(&0) || self.conv.dilation != [1, 1] {
            return bad(format!("filter {}x{} on a padded {h}x{w} input, {:?}", self.w.r, self.w.s, self.conv));
        }
        if self.y.dims != self.output_dims() {
            return bad(format!("output {:?}, the descriptors give {:?}", self.y.dims, self.output_dims()));
        }
        if self.x.storage != self.w.storage || self.x.storage != self.y.storage {
            return bad("activations and filter in different types".into());
        }
        Ok(())
    }

    fn geom(&self) -> Result<ConvGeom> {
        let [n, c, h, w] = self.x.dims;
        let f = &self.w;
        if self.conv.pad[0] != self.conv.pad[1] || self.conv.stride[0] != self.conv.stride[1] {
            return Err(shape_err("cudnn convolution (cpu)", "only square padding and stride are executed"));
        }
        ConvGeom::new(&[n, h, w, c], &[f.k, f.r, f.s, f.c], self.conv.stride[0], self.conv.pad[0])
    }

    /// Executes the call on host memory, through its descriptors only: `x`, `w` and `y` are the whole
    /// buffers the descriptors index (values as f32; bf16 storage is rounded to bf16 on input and
    /// output). The destination of the pass is updated with `alpha` and `beta`.
    pub fn execute_cpu(&self, x: &mut [f32], w: &mut [f32], y: &mut [f32]) -> Result<()> {
        self.validate()?;
        let g = self.geom()?;
        if x.len() < self.x.span() || w.len() < self.w.len() || y.len() < self.y.span() {
            return Err(shape_err("cudnn convolution (cpu)", "a buffer is shorter than its descriptor"));
        }
        let round = |v: f32| if self.x.storage == Storage::Bf16 { swav_round_bf16(v) } else { v };
        let gather = |d: &TensorDesc, buf: &[f32]| -> Vec<f32> {
            let [n, c, h, w] = d.dims;
            let mut out = Vec::with_capacity(n * c * h * w);
            for b in 0..n {
                for i in 0..h {
                    for j in 0..w {
                        for ch in 0..c {
                            out.push(round(buf[d.at(b, ch, i, j)]));
                        }
                    }
                }
            }
            out
        };
        let scatter = |d: &TensorDesc, buf: &mut [f32], vals: &[f32], alpha: f32, beta: f32| {
            let [n, c, h, w] = d.dims;
            let mut it = vals.iter();
            for b in 0..n {
                for i in 0..h {
                    for j in 0..w {
                        for ch in 0..c {
                            let at = d.at(b, ch, i, j);
                            let prior = if beta == 0.0 { 0.0 } else { beta * buf[at] };
                            buf[at] = round(alpha * it.next().copied().unwrap_or(0.0) + prior);
                        }
                    }
                }
            }
        };
        let filter: Vec<f32> = w[..self.w.len()].iter().map(|&v| round(v)).collect();
        let params = crate::ops::conv::ConvParams {
            stride: g.stride,
            pad: g.pad,
            algo: crate::ops::winograd::ConvAlgorithm::Direct,
            precision: crate::matmul::MulPrecision::F32,
        };
        let shape_x = [g.n, g.h, g.w, g.cin];
        let filter_t = crate::Tensor::from_vec(&[g.cout, g.kh, g.kw, g.cin], filter)?;
        match self.pass {
            ConvPass::Forward => {
                let xt = crate::Tensor::from_vec(&shape_x, gather(&self.x, x))?;
                let out = crate::ops::conv::conv2d_forward(&xt, &filter_t, params)?;
                scatter(&self.y, y, out.as_slice(), self.alpha, self.beta);
            }
            ConvPass::BackwardData => {
                let dy = crate::Tensor::from_vec(&g.out_shape(), gather(&self.y, y))?;
                // The data gradient does not depend on x's values: any input of the right shape.
                let x0 = crate::Tensor::zeros(&shape_x, crate::Device::Cpu);
                let mut scratch = crate::Tensor::zeros(filter_t.shape(), crate::Device::Cpu);
                let dx = crate::ops::conv::conv2d_backward(&x0, &filter_t, &dy, params, &mut scratch, true)?
                    .expect("dx requested");
                scatter(&self.x, x, dx.as_slice(), self.alpha, self.beta);
            }
            ConvPass::BackwardFilter => {
                let xt = crate::Tensor::from_vec(&shape_x, gather(&self.x, x))?;
                let dy = crate::Tensor::from_vec(&g.out_shape(), gather(&self.y, y))?;
                let mut dw = crate::Tensor::zeros(filter_t.shape(), crate::Device::Cpu);
                crate::ops::conv::conv2d_backward(&xt, &filter_t, &dy, params, &mut dw, false)?;
                for (d, &v) in w.iter_mut().zip(dw.as_slice()) {
                    *d = round(self.alpha * v + if self.beta == 0.0 { 0.0 } else { self.beta * *d });
                }
            }
        }
        Ok(())
    }
}

/// Rounds to bf16 (nearest even), as `__float2bfloat16` does.
pub fn swav_round_bf16(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    crate::matmul::round_bf16(v)
}

/// One cuBLAS `gemm_ex` call, column-major: `C (m x n) = alpha op(A) op(B) + beta C`, `op(A)` is
/// `m x k`, `op(B)` is `k x n`; `A`, `B` in `ab` storage, `C` fp32 or `ab`, computed in fp32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmCall {
    /// `op(A) = A^T`.
    pub trans_a: bool,
    /// `op(B) = B^T`.
    pub trans_b: bool,
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Leading dimension of `A` (as stored).
    pub lda: usize,
    /// Leading dimension of `B` (as stored).
    pub ldb: usize,
    /// Leading dimension of `C`.
    pub ldc: usize,
    /// Storage of `A` and `B`.
    pub ab: Storage,
    /// Storage of `C`.
    pub c: Storage,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of what `C` held.
    pub beta: f32,
}

impl GemmCall {
    /// `y [rows, out] = x [rows, in] w^T` with `w [out, in]` (PyTorch's Linear): `y^T = w' x'`.
    pub fn linear_forward(rows: usize, fin: usize, fout: usize, ab: Storage, out: Storage) -> GemmCall {
        GemmCall {
            trans_a: true,
            trans_b: false,
            m: fout,
            n: rows,
            k: fin,
            lda: fin,
            ldb: fin,
            ldc: fout,
            ab,
            c: out,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `dx [rows, in] = dy [rows, out] w [out, in]`.
    pub fn linear_data_grad(rows: usize, fin: usize, fout: usize, ab: Storage, out: Storage) -> GemmCall {
        GemmCall {
            trans_a: false,
            trans_b: false,
            m: fin,
            n: rows,
            k: fout,
            lda: fin,
            ldb: fout,
            ldc: fin,
            ab,
            c: out,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `dw [out, in] += dy^T x` (accumulates, like every parameter gradient of the engine).
    pub fn linear_weight_grad(rows: usize, fin: usize, fout: usize, ab: Storage) -> GemmCall {
        GemmCall {
            trans_a: false,
            trans_b: true,
            m: fin,
            n: fout,
            k: rows,
            lda: fin,
            ldb: fout,
            ldc: fin,
            ab,
            c: Storage::F32,
            alpha: 1.0,
            beta: 1.0,
        }
    }

    /// Elements `A`, `B` and `C` must hold (column-major spans).
    pub fn spans(&self) -> (usize, usize, usize) {
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        let span =
            |rows: usize, cols: usize, ld: usize| if rows == 0 || cols == 0 { 0 } else { (cols - 1) * ld + rows };
        (span(ar, ac, self.lda), span(br, bc, self.ldb), span(self.m, self.n, self.ldc))
    }

    /// Checks what cuBLAS would refuse (leading dimensions shorter than a column).
    pub fn validate(&self) -> Result<()> {
        let (ar, br) = (if self.trans_a { self.k } else { self.m }, if self.trans_b { self.n } else { self.k });
        if self.lda < ar.max(1) || self.ldb < br.max(1) || self.ldc < self.m.max(1) {
            return Err(shape_err("cublas gemm", format!("leading dimensions too small: {self:?}")));
        }
        Ok(())
    }

    /// Executes the call on host memory through its column-major description only.
    pub fn execute_cpu(&self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        self.validate()?;
        let (sa, sb, sc) = self.spans();
        if a.len() < sa || b.len() < sb || c.len() < sc {
            return Err(shape_err("cublas gemm (cpu)", "a buffer is shorter than its description"));
        }
        let round = |v: &[f32], s: Storage| -> Vec<f32> {
            v.iter().map(|&x| if s == Storage::Bf16 { swav_round_bf16(x) } else { x }).collect()
        };
        let (a, b) = (round(a, self.ab), round(b, self.ab));
        // Column-major (rows x cols, ld) is a strided view: element (i, j) at i + j ld.
        fn view(data: &[f32], rows: usize, cols: usize, ld: usize, trans: bool) -> MatRef<'_> {
            let v = MatRef::strided(data, rows, cols, 1, ld as isize);
            if trans {
                v.t()
            } else {
                v
            }
        }
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        let mut prod = vec![0.0f32; self.m * self.n];
        if self.m > 0 && self.n > 0 {
            matmul(
                MatMut::new(&mut prod, self.m, self.n),
                view(&a, ar, ac, self.lda, self.trans_a),
                view(&b, br, bc, self.ldb, self.trans_b),
                false,
                Threads::Serial,
            );
        }
        for j in 0..self.n {
            for i in 0..self.m {
                let at = i + j * self.ldc;
                let prior = if self.beta == 0.0 { 0.0 } else { self.beta * c[at] };
                let v = self.alpha * prod[i * self.n + j] + prior;
                c[at] = if self.c == Storage::Bf16 { swav_round_bf16(v) } else { v };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::ConvGeom;

    #[test]
    fn fp32_convolutions_never_allow_tensor_core_rounding() {
        let g = ConvGeom::new(&[2, 9, 9, 3], &[8, 3, 3, 3], 2, 1).unwrap();
        for pass in [ConvPass::Forward, ConvPass::BackwardData, ConvPass::BackwardFilter] {
            assert!(!ConvCall::new(&g, pass, Storage::F32).conv.tensor_ops, "{pass:?}");
            assert!(ConvCall::new(&g, pass, Storage::Bf16).conv.tensor_ops, "{pass:?}");
        }
    }
}
