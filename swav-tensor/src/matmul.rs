//! Matrix multiplication on the CPU through the `gemm` crate, behind safe strided views.
//!
//! `matmul(c, a, b, accumulate)` computes `c = a b` (or `c += a b`). Views carry row and column
//! strides, so transposes are free (`.t()`): a weight stored `[out, in]` is used as `[in, out]` without
//! a copy. Bounds are checked once per call, which makes the unsafe call into `gemm` sound.

use gemm::Parallelism;

mod bf16;

pub use bf16::{bf16_bits, bf16_hardware, matmul_bf16, round_bf16};

/// What a product multiplies: the f32 factors as they are, or the factors rounded to bfloat16 with
/// fp32 accumulation (twice the products per cycle on CPUs with AVX512_BF16; see [`matmul_bf16`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MulPrecision {
    /// f32 factors.
    #[default]
    F32,
    /// Factors rounded to bf16 (to nearest, ties to even), products summed in f32.
    Bf16,
}

impl MulPrecision {
    /// The name in settings and reports (`fp32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            MulPrecision::F32 => "fp32",
            MulPrecision::Bf16 => "bf16",
        }
    }
}

/// [`matmul`] or [`matmul_bf16`], as `precision` says.
pub fn matmul_in(
    precision: MulPrecision,
    c: MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    threads: Threads,
) {
    match precision {
        MulPrecision::F32 => matmul(c, a, b, accumulate, threads),
        MulPrecision::Bf16 => matmul_bf16(c, a, b, accumulate, threads),
    }
}

/// A read-only `rows x cols` matrix view into a slice, element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

/// A writable row-major `rows x cols` matrix view into a slice, element `(i, j)` at `i * rs + j`: the
/// destination of [`matmul`].
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: isize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols as isize, 1)
    }

    /// A `rows x cols` view with element `(i, j)` at `data[i * rs + j * cs]` (strides in values, not
    /// negative). Panics if a reachable element lies outside `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: isize, cs: isize) -> Self {
        let view = MatRef { data, rows, cols, rs, cs };
        assert!(view.fits(), "matrix view {rows}x{cols} (strides {rs},{cs}) exceeds its buffer of {}", data.len());
        view
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        self.rs >= 0
            && self.cs >= 0
            && (self.rows - 1) * (self.rs as usize) + (self.cols - 1) * (self.cs as usize) < self.data.len()
    }
}

impl<'a> MatMut<'a> {
    /// A row-major `rows x cols` destination whose rows are `rs` values apart (`rs >= cols`).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(rs >= cols, "row stride {rs} shorter than the row {cols}");
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + cols <= data.len(),
            "destination {rows}x{cols} exceeds its buffer"
        );
        MatMut { data, rows, cols, rs: rs as isize }
    }

    /// A dense row-major `rows x cols` destination. Panics if `data` is shorter than `rows * cols`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }
}

/// The instruction set the `gemm` crate runs at on this CPU: it dispatches by itself (its AVX-512
/// kernels are built in through its `x86-v4` feature and need F, BW, CD, DQ and VL); the thread's
/// ceiling does not apply to it.
pub fn gemm_isa() -> swav_core::isa::Isa {
    use swav_core::isa::Isa;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v4 = has!("avx512f") && has!("avx512bw") && has!("avx512cd") && has!("avx512dq") && has!("avx512vl");
        if v4 && swav_core::isa::available() == Isa::Avx512 {
            return Isa::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// Whether a product is worth spreading over the thread pool (inside parallel loops, use `Serial`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// On the calling thread only: for products inside a parallel loop, which already uses the pool.
    Serial,
    /// Spread over the rayon pool when the product is large enough (`m n k >= 2^18`), otherwise serial.
    Pool,
}

/// `c = a b`, or `c += a b` when `accumulate`.
pub fn matmul(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
    assert_eq!(a.rows, c.rows, "matmul: rows of a and c");
    assert_eq!(b.cols, c.cols, "matmul: cols of b and c");
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions");
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                let start = r * c.rs as usize;
                c.data[start..start + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::Pool if m * n * k >= 1 << 18 => Parallelism::Rayon(rayon::current_num_threads()),
        _ => Parallelism::None,
    };
    // SAFETY: the constructors checked that every index reached through the strides lies inside the
    // borrowed buffers; `c` is borrowed mutably and cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            c.rs,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_product_with_transposes_and_accumulation() {
        let (m, n, k) = (37, 19, 53);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
        let want = naive(&a, &b, m, n, k);
        let mut c = vec![0.0; m * n];
        matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, Threads::Pool);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        // b stored transposed ([n, k]) and used through .t(); accumulate doubles the result.
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&bt, n, k).t(), true, Threads::Serial);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 2.0 * y).abs() < 2e-4, "{x} vs {}", 2.0 * y);
        }
    }

    #[test]
    #[should_panic]
    fn rejects_views_larger_than_their_buffer() {
        let a = vec![0.0; 10];
        let _ = MatRef::new(&a, 3, 4);
    }
}
