//! SwAV training steps on a model of your own configuration and crops from your own pipeline: the
//! official iteration (prototype normalisation, Sinkhorn codes, swapped prediction, LARS) without the
//! trainer's run folder, loader or checkpoints.
//!
//! ```text
//! cargo run --release -p swav-train --example train_step
//! ```

use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::Tensor;
use swav_train::lars::Lars;
use swav_train::schedule::LrSchedule;
use swav_train::step::{swav_step, SwavState};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A narrow ResNet-18 with the small-image stem, for 1-channel 24-px crops.
    let model = SwavModel::new(
        ModelConfig {
            arch: Arch::Resnet18,
            width: Some(8),
            small_stem: true,
            in_channels: 1,
            hidden_mlp: 64,
            head_bn: true,
            feat_dim: 32,
            prototypes: vec![20],
            sync_bn: false,
            sync_bn_group: 0,
        },
        31,
    )?;
    let config = swav_train::config::load(
        swav_train::config::preset("cpu-tiny")?.toml,
        &["train.freeze_prototypes_niters=2".into()],
    )?;
    let train = config.train;
    let optimizer = Lars::new(train.momentum, train.weight_decay, train.trust_coefficient, train.lars);
    let mut state = SwavState::new(model, optimizer);
    let (batch, steps) = (16, 6);
    let schedule = LrSchedule::new(0.3, 0.003, 0.0, 0, 1, steps);
    let mut rng = swav_core::rng::SplitMix64::new(7);
    for step in 0..steps {
        // Two views of each image, crop-major: rows [0, batch) are view 0, [batch, 2 batch) view 1.
        // Here random pixels stand in for your augmented crops.
        let views: Vec<f32> = (0..2 * batch * 24 * 24).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let groups = vec![Tensor::from_vec(&[2 * batch, 24, 24, 1], views)?];
        let stats = swav_step(&mut state, &train, groups, batch, step, schedule.lr(step))?;
        println!(
            "step {step}: loss {:.4}, {} of 20 prototypes in use, lr {:.3}",
            stats.loss,
            stats.clusters_used,
            schedule.lr(step)
        );
    }
    Ok(())
}
