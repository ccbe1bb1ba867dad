//! `SwavModel::backward_with` hands every parameter over exactly once, and only once its gradient is
//! final: a data-parallel run starts averaging what it is handed while the backward goes on.

use std::collections::BTreeMap;

use swav_core::rng::SplitMix64;
use swav_model::param::{Slot, Visit};
use swav_model::{Arch, ModelConfig, SwavModel};
use swav_tensor::Tensor;

fn small(arch: Arch, prototypes: Vec<usize>) -> ModelConfig {
    ModelConfig {
        arch,
        width: Some(8),
        small_stem: true,
        in_channels: 3,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes,
        sync_bn: false,
        sync_bn_group: 0,
    }
}

/// Reproducible values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
}

fn check(cfg: ModelConfig) {
    let batch = 2;
    let mut model = SwavModel::new(cfg, 5).unwrap();
    // Two crop groups, so the backbone runs backward twice and accumulates.
    let groups = || {
        vec![
            Tensor::from_vec(&[2 * batch, 16, 16, 3], values(2 * batch * 16 * 16 * 3, 1)).unwrap(),
            Tensor::from_vec(&[2 * batch, 8, 8, 3], values(2 * batch * 8 * 8 * 3, 2)).unwrap(),
        ]
    };
    model.zero_grad();
    let (out, acts) = model.forward_train(groups()).unwrap();
    let dscores: Vec<Tensor> = (out.scores.iter().enumerate())
        .map(|(h, s)| Tensor::from_vec(s.shape(), values(s.len(), 10 + h as u64)).unwrap())
        .collect();

    let mut handed: Vec<(String, Vec<f32>)> = Vec::new();
    model
        .backward_with(
            acts,
            &out,
            &dscores,
            Some(&mut |prefix: &str, part: &mut dyn Visit| {
                part.visit(prefix, &mut |name, slot| {
                    if let Slot::Param(p) = slot {
                        handed.push((name.to_string(), p.grad.to_vec()));
                    }
                })
            }),
        )
        .unwrap();

    let mut final_grads = BTreeMap::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            final_grads.insert(name.to_string(), p.grad.to_vec());
        }
    });
    assert_eq!(handed.len(), final_grads.len(), "every parameter handed over once");
    for (name, grad) in &handed {
        let last = final_grads.get(name).unwrap_or_else(|| panic!("{name} is not a parameter of the model"));
        assert_eq!(grad, last, "{name} changed after it was handed over");
    }
    let names: std::collections::BTreeSet<&String> = handed.iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), handed.len(), "a parameter was handed over twice");
    // The head's gradients are final long before the stem's: that is what lets the averaging overlap.
    assert!(handed[0].0.starts_with("prototypes."), "{}", handed[0].0);
    assert!(handed.last().unwrap().0.starts_with("conv1."), "{}", handed.last().unwrap().0);
    assert!(final_grads.values().any(|g| g.iter().any(|&v| v != 0.0)));

    // The same gradients as the plain backward.
    let mut again = SwavModel::new(model.config.clone(), 5).unwrap();
    again.zero_grad();
    let (out, acts) = again.forward_train(groups()).unwrap();
    again.backward(acts, &out, &dscores).unwrap();
    again.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            assert_eq!(p.grad.to_vec(), final_grads[name], "{name}");
        }
    });
}

#[test]
fn every_parameter_is_handed_over_once_with_its_final_gradient() {
    check(small(Arch::Resnet18, vec![10]));
    check(small(Arch::Resnet50, vec![10, 6]));
}
