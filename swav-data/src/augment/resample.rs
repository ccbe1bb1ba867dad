//! Bilinear resampling with PIL's semantics (what torchvision's `Resize` and `RandomResizedCrop` do on PIL
//! images): a separable convolution with the triangle filter whose support is scaled by the reduction
//! factor when downscaling (so downscaling averages, i.e. antialiases), computed for each output pixel
//! centre `(x + 0.5) * scale` and normalised to sum 1, exactly like PIL's `precompute_coeffs`.
//! Differences from PIL, by design: we compute in f32 and do not round to 8 bits between the horizontal
//! and the vertical pass nor at the end (PIL does), so values differ from PIL's by at most about one grey level.
//!
//! The crop and the resize are one operation: the source box is read in place from the decoded image,
//! the horizontal pass writes only the rows the vertical pass needs, and a horizontal flip is folded into
//! the horizontal pass (it writes column `x` at `W - 1 - x`), so a crop costs two passes and no copy.

use crate::image::ImageView;
use swav_core::simd_fn;

/// Resampling weights of one axis: for output pixel `i`, taps `weights[i * ksize ..][.. lens[i]]` apply
/// to source pixels `starts[i] ..`.
#[derive(Default, Debug, Clone)]
pub struct Coeffs {
    /// Taps reserved per output pixel: `2 * ceil(support) + 1`, the support being the reduction factor
    /// (at least 1).
    pub ksize: usize,
    /// First source pixel of each output pixel's taps.
    pub starts: Vec<usize>,
    /// Number of taps of each output pixel (at most `ksize`).
    pub lens: Vec<usize>,
    /// `out_size * ksize` weights, row `i` for output pixel `i`; the first `lens[i]` are used (normalised
    /// to sum 1, then multiplied by the `gain` given to [`Coeffs::compute`]).
    pub weights: Vec<f32>,
    /// Every output has exactly `ksize` taps (see `compute`).
    pub fixed: bool,
    /// Scratch of `compute` (one output's unnormalised weights).
    k: Vec<f64>,
}

#[inline]
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

impl Coeffs {
    /// PIL's `precompute_coeffs` for the bilinear filter, box `[0, in_size)` to `out_size` pixels;
    /// every weight is multiplied by `gain` after normalisation.
    pub fn compute(&mut self, in_size: usize, out_size: usize, gain: f32) {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the triangle filter has support 1
        let ksize = support.ceil() as usize * 2 + 1;
        self.ksize = ksize;
        self.starts.clear();
        self.lens.clear();
        self.weights.clear();
        self.weights.resize(out_size * ksize, 0.0);
        let ss = 1.0 / filterscale;
        let mut k = std::mem::take(&mut self.k);
        k.clear();
        k.resize(ksize, 0.0);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero, as here.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let xmax = xmax.clamp(0, ksize as i64) as usize;
            let mut total = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(xmax) {
                let w = triangle((x as f64 + xmin as f64 - center + 0.5) * ss);
                *kx = w;
                total += w;
            }
            let row = &mut self.weights[xx * ksize..(xx + 1) * ksize];
            for x in 0..xmax {
                row[x] = if total != 0.0 { (k[x] / total) as f32 * gain } else { 0.0 };
            }
            self.starts.push(xmin as usize);
            self.lens.push(xmax);
        }
        self.k = k;
        // Give every output the same number of taps (`ksize`, zero weights at the ends) inside
        // [0, in_size), so that the inner loops have a fixed length; needs in_size >= ksize.
        self.fixed = in_size >= ksize;
        if self.fixed {
            for xx in 0..out_size {
                let (start, len) = (self.starts[xx], self.lens[xx]);
                let new_start = start.min(in_size - ksize);
                let shift = start - new_start;
                let row = &mut self.weights[xx * ksize..(xx + 1) * ksize];
                row.copy_within(0..len, shift);
                row[..shift].fill(0.0);
                row[shift + len..].fill(0.0);
                self.starts[xx] = new_start;
                self.lens[xx] = ksize;
            }
        }
    }
}

/// Where the output of a resampling goes: the full output is `out_h x out_w`; `window` selects the part
/// written (`y0, x0, h, w`, may reach outside the full output: those pixels are written as 0).
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Row of the full output written first (negative: rows above the output, written as 0).
    pub y0: isize,
    /// Column of the full output written first (negative: columns left of the output, written as 0).
    pub x0: isize,
    /// Rows written.
    pub h: usize,
    /// Columns written.
    pub w: usize,
}

/// Reusable resampling state (coefficient tables and the intermediate rows).
#[derive(Default)]
pub struct Resampler {
    hx: Coeffs,
    vy: Coeffs,
    tmp: Vec<f32>,
}

impl Resampler {
    /// Resamples the source box `(top, left, h, w)` of `src` to `out_h x out_w` pixels and writes the
    /// `window` of that result into `out` as HWC f32 scaled by `gain` (1/255 gives [0, 1]), mirrored left to
    /// right if `flip`. `out.len()` must be `window.h * window.w * src.channels`.
    #[allow(clippy::too_many_arguments)]
    pub fn resample(
        &mut self,
        src: ImageView<'_>,
        (top, left, h, w): (usize, usize, usize, usize),
        (out_h, out_w): (usize, usize),
        window: Window,
        flip: bool,
        gain: f32,
        out: &mut [f32],
    ) {
        assert!(top + h <= src.height && left + w <= src.width && h > 0 && w > 0, "source box inside the image");
        assert_eq!(out.len(), window.h * window.w * src.channels);
        self.hx.compute(w, out_w, gain);
        self.vy.compute(h, out_h, 1.0);
        dispatch(self, src, top, left, (out_h, out_w), window, flip, out);
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn run<const C: usize>(
        &mut self,
        src: ImageView<'_>,
        top: usize,
        left: usize,
        (out_h, out_w): (usize, usize),
        win: Window,
        flip: bool,
        out: &mut [f32],
    ) {
        // Output columns of the window that exist in the full output.
        let wx0 = win.x0.max(0) as usize;
        let wx1 = ((win.x0 + win.w as isize).min(out_w as isize)).max(0) as usize;
        let wy0 = win.y0.max(0) as usize;
        let wy1 = ((win.y0 + win.h as isize).min(out_h as isize)).max(0) as usize;
        out.fill(0.0);
        if wx0 >= wx1 || wy0 >= wy1 {
            return;
        }
        let cols = wx1 - wx0;
        // Source rows needed by the window's output rows.
        let ry0 = self.vy.starts[wy0];
        let ry1 = (wy0..wy1).map(|y| self.vy.starts[y] + self.vy.lens[y]).max().unwrap_or(ry0);
        let row_len = cols * C;
        self.tmp.clear();
        self.tmp.resize((ry1 - ry0) * row_len, 0.0);

        // Horizontal pass: source rows ry0..ry1 of the box -> tmp (window columns only, flipped if asked).
        let ksize = self.hx.ksize;
        if self.hx.fixed && ksize == 3 {
            // Enlarging (the common case): three taps, unrolled.
            self.horizontal_fixed::<C, 3>(src, top, left, ry0, ry1, wx0, wx1, flip);
        } else if self.hx.fixed && ksize == 5 {
            self.horizontal_fixed::<C, 5>(src, top, left, ry0, ry1, wx0, wx1, flip);
        } else {
            for r in ry0..ry1 {
                let srow = &src.pixels[((top + r) * src.width + left) * C..][..(src.width - left) * C];
                let trow = &mut self.tmp[(r - ry0) * row_len..][..row_len];
                for xx in wx0..wx1 {
                    let start = self.hx.starts[xx];
                    let taps = &self.hx.weights[xx * ksize..][..self.hx.lens[xx]];
                    let mut acc = [0.0f32; C];
                    let px = &srow[start * C..][..taps.len() * C];
                    for (t, &wt) in taps.iter().enumerate() {
                        for c in 0..C {
                            acc[c] += px[t * C + c] as f32 * wt;
                        }
                    }
                    let col = if flip { wx1 - 1 - xx } else { xx - wx0 };
                    trow[col * C..col * C + C].copy_from_slice(&acc);
                }
            }
        }

        self.vertical::<C>(out, win, (wx0, wx1), (wy0, wy1), ry0, flip);
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn horizontal_fixed<const C: usize, const K: usize>(
        &mut self,
        src: ImageView<'_>,
        top: usize,
        left: usize,
        ry0: usize,
        ry1: usize,
        wx0: usize,
        wx1: usize,
        flip: bool,
    ) {
        let row_len = (wx1 - wx0) * C;
        for r in ry0..ry1 {
            let srow = &src.pixels[((top + r) * src.width + left) * C..][..(src.width - left) * C];
            let trow = &mut self.tmp[(r - ry0) * row_len..][..row_len];
            for xx in wx0..wx1 {
                let start = self.hx.starts[xx];
                let taps: &[f32; K] = self.hx.weights[xx * K..(xx + 1) * K].try_into().expect("K taps");
                let col = if flip { wx1 - 1 - xx } else { xx - wx0 };
                let rest = &srow[start * C..];
                if C == 3 && rest.len() > K * 3 {
                    // RGB as a 4-lane vector (the 4th byte belongs to the next pixel and is
                    // dropped); each lane sees the same operations in the same order as below.
                    let mut acc = [0.0f32; 4];
                    for (t, &w) in taps.iter().enumerate() {
                        let p: &[u8; 4] = rest[t * 3..t * 3 + 4].try_into().expect("4 bytes");
                        for c in 0..4 {
                            acc[c] += p[c] as f32 * w;
                        }
                    }
                    trow[col * C..col * C + C].copy_from_slice(&acc[..C]);
                    continue;
                }
                let px: &[u8] = &rest[..K * C];
                let mut acc = [0.0f32; C];
                for t in 0..K {
                    for c in 0..C {
                        acc[c] += px[t * C + c] as f32 * taps[t];
                    }
                }
                trow[col * C..col * C + C].copy_from_slice(&acc);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn vertical<const C: usize>(
        &self,
        out: &mut [f32],
        win: Window,
        (wx0, wx1): (usize, usize),
        (wy0, wy1): (usize, usize),
        ry0: usize,
        flip: bool,
    ) {
        let row_len = (wx1 - wx0) * C;
        // Vertical pass: tmp -> out rows (window coordinates).
        let out_row_len = win.w * C;
        // Where the existing columns land inside the window row (flip mirrors the whole window).
        let col_off =
            if flip { (win.x0 + win.w as isize - wx1 as isize) as usize } else { (wx0 as isize - win.x0) as usize };
        let vk = self.vy.ksize;
        for yy in wy0..wy1 {
            let oy = (yy as isize - win.y0) as usize;
            let orow = &mut out[oy * out_row_len + col_off * C..][..row_len];
            let start = self.vy.starts[yy];
            let taps = &self.vy.weights[yy * vk..][..self.vy.lens[yy]];
            for (t, &wt) in taps.iter().enumerate() {
                let trow = &self.tmp[(start + t - ry0) * row_len..][..row_len];
                for (o, &v) in orow.iter_mut().zip(trow) {
                    *o += wt * v;
                }
            }
        }
    }
}

simd_fn! {
#[allow(clippy::too_many_arguments)]
fn dispatch(r: &mut Resampler, src: ImageView<'_>, top: usize, left: usize, out_size: (usize, usize), window: Window, flip: bool, out: &mut [f32]) {
    match src.channels {
        1 => r.run::<1>(src, top, left, out_size, window, flip, out),
        3 => r.run::<3>(src, top, left, out_size, window, flip, out),
        c => panic!("unsupported channel count {c}"),
    }
}
}
