//! Image batches in the two layouts of the system: NCHW (PyTorch, ONNX, the reference cases) and NHWC
//! (the engine's activations, what tensor cores want). Both functions take the shape of their input.

/// NCHW `[n, c, h, w]` -> NHWC `[n, h, w, c]`. `data.len()` must equal the product of `shape`.
pub fn nchw_to_nhwc(shape: [usize; 4], data: &[f32]) -> Vec<f32> {
    let [n, c, h, w] = shape;
    assert_eq!(data.len(), n * c * h * w, "nchw_to_nhwc: {} values for shape {shape:?}", data.len());
    let mut out = vec![0.0; data.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((b * h + y) * w + x) * c + ch] = data[((b * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// NHWC `[n, h, w, c]` -> NCHW `[n, c, h, w]`. `data.len()` must equal the product of `shape`.
pub fn nhwc_to_nchw(shape: [usize; 4], data: &[f32]) -> Vec<f32> {
    let [n, h, w, c] = shape;
    assert_eq!(data.len(), n * c * h * w, "nhwc_to_nchw: {} values for shape {shape:?}", data.len());
    let mut out = vec![0.0; data.len()];
    for b in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[((b * c + ch) * h + y) * w + x] = data[((b * h + y) * w + x) * c + ch];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_inverse_and_move_the_right_value() {
        let (n, c, h, w) = (2, 3, 4, 5);
        let nchw: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
        let nhwc = nchw_to_nhwc([n, c, h, w], &nchw);
        // Element (b=1, c=2, y=3, x=4) sits at the same logical place in both.
        assert_eq!(nhwc[((h + 3) * w + 4) * c + 2], nchw[((c + 2) * h + 3) * w + 4]);
        assert_eq!(nhwc_to_nchw([n, h, w, c], &nhwc), nchw);
    }
}
