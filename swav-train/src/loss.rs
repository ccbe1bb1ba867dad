//! The swapped-prediction loss of SwAV (official `main_swav.py`):
//!
//! for each crop `a` in `crops_for_assign`, with codes `q_a` (Sinkhorn of crop a's scores):
//!   `loss_a = 1/(V-1) sum_{v != a} -mean_b sum_k q_a[b,k] log softmax(scores_v[b] / T)_k`
//! and `loss = mean_a loss_a`. Scores are crop-major: rows `[v*B, (v+1)*B)` belong to crop `v`.
//!
//! Gradient: `d/ds_v[b,k] = sum_{a != v} (softmax_k(s_v[b]/T) sum_j q_a[b,j] - q_a[b,k]) / (T B (V-1) A)`
//! (`A = |crops_for_assign|`); the codes are constants (computed without gradient).

use swav_tensor::parallel::{map_chunks, rows_per_chunk};

use crate::error::TrainError;

/// Loss value and its gradient with respect to every score.
pub struct LossOutput {
    /// The swapped-prediction loss, averaged over crops and images (the value `main_swav.py` logs).
    pub loss: f64,
    /// Gradient of the loss with respect to each score, in the layout of the scores passed in.
    pub dscores: Vec<f32>,
}

/// `scores`: `[crops * batch, k]` row-major; `codes[i]`: `[batch, k]` for `crops_for_assign[i]`.
pub fn swapped_prediction_loss(
    scores: &[f32],
    k: usize,
    batch: usize,
    crops: usize,
    crops_for_assign: &[usize],
    codes: &[Vec<f32>],
    temperature: f32,
) -> Result<LossOutput, TrainError> {
    if crops < 2 || batch == 0 || k == 0 || scores.len() != crops * batch * k {
        return Err(TrainError::Shape(format!("scores of length {} for {crops} crops x {batch} x {k}", scores.len())));
    }
    if codes.len() != crops_for_assign.len() || codes.iter().any(|c| c.len() != batch * k) {
        return Err(TrainError::Shape("one code matrix [batch, k] is needed per assigned crop".into()));
    }
    if let Some(&a) = crops_for_assign.iter().find(|&&a| a >= crops) {
        return Err(TrainError::Shape(format!("crop {a} in crops_for_assign but only {crops} crops")));
    }
    let inv_t = 1.0 / temperature as f64;
    let denom = (crops - 1) as f64 * crops_for_assign.len() as f64;
    let grad_scale = inv_t / (batch as f64 * denom);
    // Row by row (in parallel, chunks fixed by the sizes): the log softmax in f64, the gradient of the
    // row from every assigned crop that predicts it, and those crops' cross-entropy terms.
    let rows = crops * batch;
    let chunks = map_chunks(rows, rows_per_chunk(k, 1 << 15), |range| {
        let mut dscores = Vec::with_capacity(range.len() * k);
        let mut cross = Vec::new();
        let (mut log_p, mut p, mut d) = (vec![0.0f64; k], vec![0.0f64; k], vec![0.0f64; k]);
        for r in range {
            let (v, b) = (r / batch, r % batch);
            let row = &scores[r * k..(r + 1) * k];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64 * inv_t;
            let lse = row.iter().map(|&x| (x as f64 * inv_t - max).exp()).sum::<f64>().ln() + max;
            for ((l, e), &x) in log_p.iter_mut().zip(p.iter_mut()).zip(row) {
                *l = x as f64 * inv_t - lse;
                *e = l.exp();
            }
            d.fill(0.0);
            for (i, (&a, q)) in crops_for_assign.iter().zip(codes).enumerate() {
                if a == v {
                    continue;
                }
                let qr = &q[b * k..(b + 1) * k];
                let q_sum: f64 = qr.iter().map(|&x| x as f64).sum();
                cross.push((
                    (i * crops + v) * batch + b,
                    qr.iter().zip(&log_p).map(|(&x, &l)| x as f64 * l).sum::<f64>(),
                ));
                for ((dj, &qv), &pj) in d.iter_mut().zip(qr).zip(&p) {
                    *dj += (pj * q_sum - qv as f64) * grad_scale;
                }
            }
            dscores.extend(d.iter().map(|&x| x as f32));
        }
        (dscores, cross)
    });
    let mut dscores = Vec::with_capacity(scores.len());
    let mut cross = vec![0.0f64; crops_for_assign.len() * rows];
    for (d, c) in chunks {
        dscores.extend(d);
        for (at, value) in c {
            cross[at] = value;
        }
    }
    // Summed in a fixed order (assigned crop, predicting crop, image), whatever the chunks.
    let mut loss = 0.0f64;
    for (i, &a) in crops_for_assign.iter().enumerate() {
        for v in (0..crops).filter(|&v| v != a) {
            for b in 0..batch {
                loss -= cross[(i * crops + v) * batch + b] / (batch as f64 * denom);
            }
        }
    }
    Ok(LossOutput { loss, dscores })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let (k, batch, crops) = (5, 3, 3);
        let scores: Vec<f32> = (0..crops * batch * k).map(|i| ((i * 37 % 17) as f32 - 8.0) / 10.0).collect();
        let codes: Vec<Vec<f32>> = (0..2)
            .map(|a| {
                (0..batch * k)
                    .map(|i| ((i + a) % k) as f32 + 1.0)
                    .collect::<Vec<_>>()
                    .chunks(k)
                    .flat_map(|r| {
                        let s: f32 = r.iter().sum();
                        r.iter().map(move |v| v / s).collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect();
        let run = |s: &[f32]| swapped_prediction_loss(s, k, batch, crops, &[0, 1], &codes, 0.1).unwrap();
        let out = run(&scores);
        for i in 0..scores.len() {
            let h = 1e-3;
            let mut p = scores.clone();
            p[i] += h;
            let mut m = scores.clone();
            m[i] -= h;
            let fd = (run(&p).loss - run(&m).loss) / (2.0 * h as f64);
            assert!((fd - out.dscores[i] as f64).abs() < 1e-3, "score {i}: fd {fd} vs {}", out.dscores[i]);
        }
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        assert!(swapped_prediction_loss(&[0.0; 10], 5, 1, 2, &[0], &[vec![0.2; 5]], 0.1).is_ok());
        assert!(swapped_prediction_loss(&[0.0; 10], 5, 1, 2, &[2], &[vec![0.2; 5]], 0.1).is_err());
        assert!(swapped_prediction_loss(&[0.0; 9], 5, 1, 2, &[0], &[vec![0.2; 5]], 0.1).is_err());
        assert!(swapped_prediction_loss(&[0.0; 10], 5, 1, 2, &[0, 1], &[vec![0.2; 5]], 0.1).is_err());
    }
}
