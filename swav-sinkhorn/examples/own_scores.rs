//! Sinkhorn-Knopp on scores of your own: balanced soft assignments of samples to prototypes, as SwAV
//! computes its codes. Each row of the result sums to 1 and every prototype gets about B / K of the mass.
//!
//! ```text
//! cargo run --release -p swav-sinkhorn --example own_scores
//! ```

use swav_sinkhorn::{sinkhorn, Params};

fn main() -> Result<(), swav_sinkhorn::SinkhornError> {
    let (b, k) = (256, 10);
    // Scores that favour prototype 0 for every sample: a plain softmax would put most mass there.
    let mut state = 12345u64;
    let scores: Vec<f32> = (0..b * k)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % k == 0 {
                0.5 + noise * 0.2
            } else {
                noise * 0.2
            }
        })
        .collect();
    let codes = sinkhorn(&scores, b, k, &Params::new(0.05, 3))?;
    let mass: Vec<f32> = (0..k).map(|j| codes.iter().skip(j).step_by(k).sum()).collect();
    println!("mass per prototype (balanced at {:.1}): {mass:.1?}", b as f32 / k as f32);
    let worst_row = codes.chunks(k).map(|r| (r.iter().sum::<f32>() - 1.0).abs()).fold(0.0, f32::max);
    println!("largest deviation of a row sum from 1: {worst_row:.2e}");
    Ok(())
}
