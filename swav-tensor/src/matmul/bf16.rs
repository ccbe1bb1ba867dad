//! Matrix products whose factors are rounded to bfloat16, with fp32 accumulation: what PyTorch's CPU
//! autocast does for convolutions, here to use the `vdpbf16ps` instruction of CPUs with AVX512_BF16,
//! which multiplies twice as many values per cycle as an fp32 FMA.
//!
//! The product is packed and blocked like any GEMM (Goto's scheme), with one twist: `vdpbf16ps` takes
//! *pairs* of bf16 values along the inner dimension, so both factors are packed as pairs of consecutive
//! `k` indices in one 32-bit word (the low half holds the even `k`):
//! - the `b` panel, loaded as vectors: `[pair][32 columns]`, the 32 columns of a 12 x 32 tile of `c`;
//! - the `a` panel, broadcast a word at a time: `[row][pair]` when `a`'s rows are contiguous along `k`
//!   (a plain conversion), `[pair][row]` when its columns are (a plain interleave); the kernel takes
//!   both through strides, so no operand is ever transposed in memory but the weights of a forward
//!   convolution (`b` contiguous along `k`, small), which go through 16 x 16 register transposes.
//!
//! Rounding to bf16 is to nearest, ties to even (the instruction's and [`round_bf16`]'s). Machines
//! without AVX512_BF16, or a thread whose instruction-set ceiling is below AVX-512, compute the same
//! products from rounded copies through the fp32 GEMM: the same values up to the order of the fp32
//! additions.

use super::{matmul, MatMut, MatRef, Threads};

/// `x` rounded to the nearest bfloat16 (ties to even), as an f32. NaNs stay NaNs.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// The bfloat16 nearest `x` (ties to even), as its bits; a NaN becomes a quiet NaN of the same sign
/// and leading payload, as `vcvtne2ps2bf16` makes it.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        // A NaN: keep it one (quiet) whatever its payload's low bits.
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Whether this thread's products run on `vdpbf16ps` (AVX512_BF16, within the thread's instruction
/// set ceiling) rather than on rounded copies through the fp32 GEMM.
pub fn bf16_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let isa = swav_core::isa::active() == swav_core::isa::Isa::Avx512;
        if isa && has!("avx512bf16") && has!("avx512bw") && has!("avx512vl") {
            return true;
        }
    }
    false
}

/// `c = a b` or `c += a b` (when `accumulate`) with the factors rounded to bf16 and fp32 accumulation.
pub fn matmul_bf16(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
    assert_eq!(a.rows, c.rows, "matmul_bf16: rows of a and c");
    assert_eq!(b.cols, c.cols, "matmul_bf16: cols of b and c");
    assert_eq!(a.cols, b.rows, "matmul_bf16: inner dimensions");
    if c.rows == 0 || c.cols == 0 || a.cols == 0 {
        return matmul(c, a, b, accumulate, threads);
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_hardware() {
        swav_core::isa::note_used(concat!(module_path!(), "::matmul_bf16"), &LAST, swav_core::isa::Isa::Avx512);
        return x86::matmul(c, a, b, accumulate, threads);
    }
    swav_core::isa::note_used(concat!(module_path!(), "::matmul_bf16"), &LAST, swav_core::isa::Isa::Baseline);
    rounded_copies(c, a, b, accumulate, threads)
}

static LAST: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The portable path: dense rounded copies of both factors, multiplied by the fp32 GEMM.
fn rounded_copies(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
    let dense = |v: &MatRef<'_>| -> Vec<f32> {
        let mut out = crate::alloc::take(v.rows * v.cols);
        for i in 0..v.rows {
            for j in 0..v.cols {
                out[i * v.cols + j] = round_bf16(v.data[i * v.rs as usize + j * v.cs as usize]);
            }
        }
        out
    };
    let (ra, rb) = (dense(&a), dense(&b));
    matmul(c, MatRef::new(&ra, a.rows, a.cols), MatRef::new(&rb, b.rows, b.cols), accumulate, threads);
    crate::alloc::give(ra);
    crate::alloc::give(rb);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX512_BF16 path. Every pointer below is derived from a view whose constructor checked that
    //! all its elements lie in its buffer; loads and stores that could pass the end of a row are
    //! masked to the elements that exist (masked-off lanes are never accessed).

    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::super::{MatMut, MatRef, Threads};
    use super::bf16_bits;

    /// Rows of a tile of `c` (one broadcast each per pair).
    const MR: usize = 12;
    /// Columns of a tile of `c` (two vectors of 16).
    const NR: usize = 32;
    /// `k` pairs per block: a 32-column `b` panel of one block is 16 KiB, at home in L1.
    const KCP: usize = 128;
    /// Row panels of `a` packed together: 96 rows x one block is 48 KiB, at home in L2.
    const MB: usize = 8;

    /// A strided operand as the packers see it: element `(lane, kk)` at `lane * ls + kk * ks`.
    #[derive(Clone, Copy)]
    struct Operand<'a> {
        data: &'a [f32],
        ls: usize,
        ks: usize,
        lanes: usize,
        k: usize,
    }

    impl Operand<'_> {
        /// Address of element `(lane, kk)`, which may lie past the buffer: only dereferenced through
        /// masked accesses limited to elements that exist.
        fn at(&self, lane: usize, kk: usize) -> *const f32 {
            self.data.as_ptr().wrapping_add(lane * self.ls + kk * self.ks)
        }
    }

    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// Pairs `[p0, p0 + np)` of lanes `[l0, l0 + count)` as `[lane][KCP]` (a row's pairs contiguous),
    /// lanes past `count` up to `width` zero. Needs `ks == 1`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn pack_rows(dst: &mut [u32], v: Operand, l0: usize, width: usize, p0: usize, np: usize) {
        for l in 0..width {
            let d = &mut dst[l * KCP..l * KCP + np];
            if l0 + l >= v.lanes {
                d.fill(0);
                continue;
            }
            let mut p = 0;
            while p < np {
                let n = (np - p).min(16);
                let k0 = 2 * (p0 + p);
                // Values of this row left from k0 on, at most the 2n this chunk converts.
                let left = v.k.saturating_sub(k0).min(2 * n);
                let lo = _mm512_maskz_loadu_ps(mask(left), v.at(l0 + l, k0));
                let hi = _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), v.at(l0 + l, k0 + 16));
                // Converting 32 consecutive values yields their 16 pairs in order.
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(d.as_mut_ptr().add(p) as *mut i32, mask(n), pairs);
                p += n;
            }
        }
    }

    /// Pairs `[p0, p0 + np)` of lanes `[l0, l0 + width)` as `[pair][width]`, lanes past the operand's
    /// zero. Needs `ls == 1` (lanes contiguous): each pair is two row segments interleaved.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn pack_lanes(dst: &mut [u32], v: Operand, l0: usize, width: usize, p0: usize, np: usize) {
        // Word j of the result takes bf16 j of the even row and bf16 j of the odd one.
        let first: [i16; 32] = std::array::from_fn(|i| if i % 2 == 0 { (i / 2) as i16 } else { 32 + (i / 2) as i16 });
        let lo_idx = _mm512_loadu_si512(first.as_ptr() as *const _);
        let hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
        let count = v.lanes.saturating_sub(l0).min(width);
        for p in 0..np {
            let kk = 2 * (p0 + p);
            let d = dst[p * width..(p + 1) * width].as_mut_ptr();
            let mut l = 0;
            while l < width {
                let n = count.saturating_sub(l).min(32);
                let (m0, m1) = (mask(n), mask(n.saturating_sub(16)));
                let even = v.at(l0 + l, kk);
                let a0 = _mm512_maskz_loadu_ps(m0, even);
                let a1 = _mm512_maskz_loadu_ps(m1, even.wrapping_add(16));
                let (b0, b1) = if kk + 1 < v.k {
                    let odd = v.at(l0 + l, kk + 1);
                    (_mm512_maskz_loadu_ps(m0, odd), _mm512_maskz_loadu_ps(m1, odd.wrapping_add(16)))
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let ra: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(a1, a0));
                let rb: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b1, b0));
                let w = (width - l).min(32);
                _mm512_mask_storeu_epi32(d.add(l) as *mut i32, mask(w), _mm512_permutex2var_epi16(ra, lo_idx, rb));
                if w > 16 {
                    let hi = _mm512_permutex2var_epi16(ra, hi_idx, rb);
                    _mm512_mask_storeu_epi32(d.add(l + 16) as *mut i32, mask(w - 16), hi);
                }
                l += 32;
            }
        }
    }

    /// As [`pack_lanes`] for an operand contiguous along `k` (`ks == 1`): 16 lanes converted as rows,
    /// then turned by 16 x 16 register transposes.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn pack_lanes_transposed(dst: &mut [u32], v: Operand, l0: usize, width: usize, p0: usize, np: usize) {
        let mut rows = [0u32; 16 * KCP];
        let mut l = 0;
        while l < width {
            let w = (width - l).min(16);
            pack_rows(&mut rows, v, l0 + l, 16, p0, np);
            let mut p = 0;
            while p < np {
                let mut r: [__m512i; 16] =
                    std::array::from_fn(|i| _mm512_loadu_si512(rows[i * KCP + p..].as_ptr() as *const _));
                transpose16(&mut r);
                for (i, row) in r.iter().enumerate().take((np - p).min(16)) {
                    _mm512_mask_storeu_epi32(dst[(p + i) * width + l..].as_mut_ptr() as *mut i32, mask(w), *row);
                }
                p += 16;
            }
            l += 16;
        }
    }

    /// Any strides, one pair at a time: `[pair][width]`.
    fn pack_any(dst: &mut [u32], v: Operand, l0: usize, width: usize, p0: usize, np: usize) {
        for p in 0..np {
            let kk = 2 * (p0 + p);
            for l in 0..width {
                let lane = l0 + l;
                dst[p * width + l] = if lane >= v.lanes {
                    0
                } else {
                    let even = v.data[lane * v.ls + kk * v.ks];
                    let odd = if kk + 1 < v.k { v.data[lane * v.ls + (kk + 1) * v.ks] } else { 0.0 };
                    u32::from(bf16_bits(even)) | (u32::from(bf16_bits(odd)) << 16)
                };
            }
        }
    }

    /// Transposes a 16 x 16 block of words held in 16 vectors.
    #[inline(always)]
    unsafe fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for i in 0..2 {
            for j in 0..4 {
                t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(r[8 * i + j], r[8 * i + j + 4]);
                t[8 * i + j + 4] = _mm512_shuffle_i32x4::<0xdd>(r[8 * i + j], r[8 * i + j + 4]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
        }
    }

    /// One tile: `rows x cols` (at most 12 x 32) of `c` at `c`, row stride `ldc`, gets (or, when
    /// `add`, adds) the product of an `a` panel (pair `p` of row `r` at `a[r * ars + p * aps]`) and a
    /// `b` panel over `np` pairs.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn kernel(
        np: usize,
        a: *const u32,
        ars: usize,
        aps: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..np {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            let ap = a.add(p * aps);
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * ars) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
            }
        }
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let cp = c.add(r * ldc);
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.wrapping_add(16)));
            }
            _mm512_mask_storeu_ps(cp, m0, v0);
            _mm512_mask_storeu_ps(cp.wrapping_add(16), m1, v1);
        }
    }

    /// A mutable pointer that parallel units share; each unit writes its own tiles of `c`.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// View of a buffer of pooled f32 as words (same size and alignment; every bit pattern is valid
    /// for both).
    fn words(v: &mut [f32]) -> &mut [u32] {
        // SAFETY: as above; the borrow of `v` is carried over.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u32, v.len()) }
    }

    pub(super) fn matmul(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
        let (m, n, k) = (c.rows, c.cols, a.cols);
        let kp = k.div_ceil(2);
        let blocks = kp.div_ceil(KCP);
        let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
        let pool = threads == Threads::Pool && m * n * k >= 1 << 18 && rayon::current_num_threads() > 1;
        // `b`'s lanes are its columns; `a`'s its rows. Strides are non-negative (checked by the views).
        let bv = Operand { data: b.data, ls: b.cs as usize, ks: b.rs as usize, lanes: n, k };
        let av = Operand { data: a.data, ls: a.rs as usize, ks: a.cs as usize, lanes: m, k };

        // All of b, block by block: [block][column panel][KCP][NR].
        let panel = KCP * NR;
        let mut bbuf = crate::alloc::take(blocks * n_panels * panel);
        let pack_b = |(i, d): (usize, &mut [u32])| {
            let (block, j) = (i / n_panels, i % n_panels);
            let p0 = block * KCP;
            let np = KCP.min(kp - p0);
            // SAFETY: the CPU has AVX512_BF16 (checked by the caller) and the operand is a checked view.
            unsafe {
                if bv.ls == 1 {
                    pack_lanes(d, bv, j * NR, NR, p0, np)
                } else if bv.ks == 1 {
                    pack_lanes_transposed(d, bv, j * NR, NR, p0, np)
                } else {
                    pack_any(d, bv, j * NR, NR, p0, np)
                }
            }
        };
        if pool {
            words(&mut bbuf).par_chunks_mut(panel).enumerate().for_each(pack_b);
        } else {
            words(&mut bbuf).chunks_mut(panel).enumerate().for_each(pack_b);
        }
        let bp: &[u32] = words(&mut bbuf);

        // Units of work: MB row panels of c against a range of column panels, each packing its rows
        // of a block by block. With few row panels, the columns are split too so every thread works.
        let m_blocks = m_panels.div_ceil(MB);
        let threads_n = if pool { rayon::current_num_threads() } else { 1 };
        let n_parts = if m_blocks < 2 * threads_n { (2 * threads_n).div_ceil(m_blocks).min(n_panels) } else { 1 };
        let per_part = n_panels.div_ceil(n_parts);
        let a_rows = av.ks == 1;
        // Where the kernel finds pair p of row r in a packed panel.
        let (ars, aps) = if a_rows { (KCP, 1) } else { (1, MR) };
        let ldc = c.rs as usize;
        let out = Out(c.data.as_mut_ptr());
        let unit = |u: usize| {
            let (mb, part) = (u / n_parts, u % n_parts);
            let (i0, i1) = (mb * MB, ((mb + 1) * MB).min(m_panels));
            let (j0, j1) = (part * per_part, ((part + 1) * per_part).min(n_panels));
            if j0 >= j1 {
                return;
            }
            let mut abuf = crate::alloc::take(MB * KCP * MR);
            let ap = words(&mut abuf);
            for block in 0..blocks {
                let p0 = block * KCP;
                let np = KCP.min(kp - p0);
                for i in i0..i1 {
                    let d = &mut ap[(i - i0) * KCP * MR..(i - i0 + 1) * KCP * MR];
                    // SAFETY: as for b.
                    unsafe {
                        if a_rows {
                            pack_rows(d, av, i * MR, MR, p0, np)
                        } else if av.ls == 1 {
                            pack_lanes(d, av, i * MR, MR, p0, np)
                        } else {
                            pack_any(d, av, i * MR, MR, p0, np)
                        }
                    }
                }
                for j in j0..j1 {
                    let bpanel = bp[(block * n_panels + j) * panel..].as_ptr();
                    let cols = NR.min(n - j * NR);
                    for i in i0..i1 {
                        let rows = MR.min(m - i * MR);
                        let apanel = ap[(i - i0) * KCP * MR..].as_ptr();
                        // SAFETY: the tile's rows and columns lie inside c (checked by its view);
                        // units write disjoint tiles (rows [i0, i1) x columns [j0, j1) of panels).
                        unsafe {
                            let cp = out.get().add(i * MR * ldc + j * NR);
                            kernel(np, apanel, ars, aps, bpanel, cp, ldc, rows, cols, accumulate || block > 0)
                        }
                    }
                }
            }
            crate::alloc::give(abuf);
        };
        if pool {
            (0..m_blocks * n_parts).into_par_iter().for_each(unit);
        } else {
            (0..m_blocks * n_parts).for_each(unit);
        }
        crate::alloc::give(bbuf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swav_core::isa::{with_ceiling, Isa};

    /// The bf16 nearest `x` from the definition: of the two bf16 values around `x` (its truncation and
    /// the next one away from zero), the closer in exact arithmetic, the even one on a tie.
    fn nearest_bf16(x: f32) -> f32 {
        if x.to_bits() & 0xffff == 0 {
            return x; // a bf16 already (infinities included)
        }
        let low = f32::from_bits(x.to_bits() & 0xffff_0000);
        let high = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
        // Past the largest finite bf16 the next value is infinity, which IEEE rounding places at 2^128.
        let h = if high.is_infinite() { 2f64.powi(128).copysign(x as f64) } else { high as f64 };
        let (dl, dh) = ((x as f64 - low as f64).abs(), (h - x as f64).abs());
        if dl < dh || (dl == dh && (low.to_bits() >> 16) & 1 == 0) {
            low
        } else {
            high
        }
    }

    #[test]
    fn rounds_to_the_nearest_bf16_ties_to_even() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut values = vec![0.0f32, -0.0, 1.0, f32::MIN_POSITIVE, 1e-40, f32::MAX, -f32::MAX, f32::INFINITY];
        // Exact ties on both sides of an even and an odd mantissa, and the neighbours of each.
        for base in [0x3f80_0000u32, 0x3f81_0000, 0xbf80_0000, 0x4049_0000] {
            for off in [0x7fffu32, 0x8000, 0x8001] {
                values.push(f32::from_bits(base + off));
            }
        }
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let v = f32::from_bits(seed as u32);
            if v.is_finite() {
                values.push(v);
            }
        }
        for v in values {
            let want = nearest_bf16(v);
            let got = round_bf16(v);
            assert!(got.to_bits() == want.to_bits() || (got == 0.0 && want == 0.0), "{v:e}: {got:e} vs {want:e}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan(), "a NaN whose payload rounds away stays NaN");
    }

    /// `c = a b` in f64 from the rounded factors, and the sum of the products' magnitudes (the scale
    /// of fp32's accumulation error).
    fn reference(a: &MatRef<'_>, b: &MatRef<'_>) -> (Vec<f64>, Vec<f64>) {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        let at = |v: &MatRef<'_>, i: usize, j: usize| round_bf16(v.data[i * v.rs as usize + j * v.cs as usize]) as f64;
        let mut c = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let prod = at(a, i, p) * at(b, p, j);
                    c[i * n + j] += prod;
                    scale[i * n + j] += prod.abs();
                }
            }
        }
        (c, scale)
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every layout the packers tell apart (rows or columns contiguous, neither), edge sizes around
    /// the 12 x 32 tile and the 128-pair block, odd depths, accumulation, serial and pooled.
    fn check_all_layouts() {
        for &(m, n, k) in &[(1, 1, 1), (13, 35, 7), (12, 32, 256), (25, 65, 257), (97, 40, 300), (40, 70, 513)] {
            let a_data = values(m * k * 2, 1);
            let b_data = values(k * n * 2, 2);
            // Row-major, column-major, and neither (strides 2k and 2, or 2 and 2k).
            let a_views = [
                MatRef::new(&a_data[..m * k], m, k),
                MatRef::new(&a_data[..m * k], k, m).t(),
                MatRef::strided(&a_data, m, k, 2 * k as isize, 2),
            ];
            let b_views = [
                MatRef::new(&b_data[..k * n], k, n),
                MatRef::new(&b_data[..k * n], n, k).t(),
                MatRef::strided(&b_data, k, n, 2, 2 * k as isize),
            ];
            for (ai, a) in a_views.iter().enumerate() {
                for (bi, b) in b_views.iter().enumerate() {
                    let (want, scale) = reference(a, b);
                    for (accumulate, threads) in [(false, Threads::Pool), (true, Threads::Serial)] {
                        // The destination has a row stride past its width; the gap must stay untouched.
                        let ldc = n + 3;
                        let mut c = vec![0.25f32; m * ldc];
                        matmul_bf16(MatMut::strided(&mut c, m, n, ldc), *a, *b, accumulate, threads);
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j] as f64;
                                if j >= n {
                                    assert_eq!(got, 0.25, "gap written at {i},{j}");
                                    continue;
                                }
                                let want = want[i * n + j] + if accumulate { 0.25 } else { 0.0 };
                                let tol = 1e-6 + k as f64 * 6e-8 * scale[i * n + j];
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{m}x{n}x{k} a{ai} b{bi} acc {accumulate}: c[{i},{j}] = {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_of_rounded_factors_in_every_layout() {
        // On a CPU with AVX512_BF16 this runs the vdpbf16ps kernel and its packers; the second run
        // (a ceiling below AVX-512) the portable path, which every machine has.
        check_all_layouts();
        with_ceiling(Isa::Avx2, check_all_layouts);
    }

    #[test]
    fn the_hardware_path_reports_itself_only_where_it_exists() {
        let before = bf16_hardware();
        assert!(!with_ceiling(Isa::Avx2, bf16_hardware), "a ceiling below AVX-512 disables it");
        let support = swav_core::isa::bf16_support();
        if before {
            assert!(support.avx512_bf16, "bf16 products in hardware but no avx512_bf16 flag");
        }
    }
}
