//! The rule fails wrong implementations. Two kinds of deliberate faults, on the shipped cases:
//!
//! - an error added to one tensor our run produced (in every run, as a systematic bug would be),
//!   sized against that tensor's own allowance: half of it passes, 1.5 times it fails;
//! - a step run with a wrong hyper-parameter (the case's metadata altered by 1%), whose effect
//!   reaches the loss, the updates or the momentum.

use std::path::{Path, PathBuf};

use swav_model::checkpoint::NamedTensors;
use swav_reference::{verify_case, verify_case_with, Check};

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases").join(name)
}

fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"))
}

/// The norm the rule measures `name` against: its reference (an update: final - initial), or the
/// layer's norm times the tolerance when the check says so.
fn scale(path: &Path, c: &Check) -> f64 {
    if let Some((_, layer_norm)) = &c.rule.layer_scale {
        return c.rule.class.tolerance() * layer_norm;
    }
    let file = NamedTensors::read(path).unwrap();
    let want = file.f32(&c.name).unwrap().1;
    let initial =
        c.name.strip_prefix("expect.final.").filter(|n| !n.starts_with("momentum.") && !n.starts_with("queue."));
    let base = initial.map(|n| file.f32(&format!("param.{n}")).unwrap().1.to_vec());
    let sq: f64 =
        want.iter().enumerate().map(|(i, &w)| (w as f64 - base.as_ref().map_or(0.0, |b| b[i] as f64)).powi(2)).sum();
    sq.sqrt()
}

/// Verifies `file` with an error of `factor` x (the check's tolerance x its scale) added to each of
/// our `names` (independent checks), spread over its elements with alternating signs; returns their
/// checks.
fn with_errors(file: &str, names: &[&str], factor: f64) -> Vec<Check> {
    let path = case(file);
    let clean = verify_case(&path).unwrap();
    let mut amounts = std::collections::HashMap::new();
    for &name in names {
        let c = check(&clean.checks, name);
        assert!(c.pass(), "{file}: {name} must pass unaltered: {c:?}");
        amounts.insert(name.to_string(), factor * c.tolerance * scale(&path, c));
    }
    let fault = move |n: &str, got: &mut [f64]| {
        if let Some(amount) = amounts.get(n) {
            let each = amount / (got.len() as f64).sqrt();
            for (i, g) in got.iter_mut().enumerate() {
                *g += if i % 2 == 0 { each } else { -each };
            }
        }
    };
    let report = verify_case_with(&path, swav_reference::Device::Cpu, &fault).unwrap();
    names.iter().map(|&name| check(&report.checks, name).clone()).collect()
}

fn assert_threshold(file: &str, names: &[&str]) {
    for inside in with_errors(file, names, 0.5) {
        assert!(inside.pass(), "{file}: half its allowance added must pass: {inside:?}");
    }
    for beyond in with_errors(file, names, 1.5) {
        assert!(!beyond.pass(), "{file}: 1.5 x its allowance added must fail: {beyond:?}");
        assert!(beyond.rule.witness.is_none(), "a systematic error has no float32 witness: {beyond:?}");
    }
}

#[test]
fn a_gradient_slightly_beyond_its_tolerance_fails() {
    assert_threshold(
        "swav_model_small_1.safetensors",
        &["expect.grad.conv1.weight", "expect.grad.layer4.2.conv3.weight"],
    );
}

#[test]
fn a_zero_gradient_with_a_real_error_fails() {
    // The bias before the head's BatchNorm: zero in float64, judged against its layer.
    let name = "expect.grad.projection_head.0.bias";
    let clean = verify_case(&case("swav_model_small_0.safetensors")).unwrap();
    assert!(check(&clean.checks, name).rule.layer_scale.is_some());
    assert_threshold("swav_model_small_0.safetensors", &[name, "expect.grad.layer3.0.conv1.weight"]);
}

#[test]
fn a_weight_update_momentum_loss_or_queue_slightly_beyond_its_tolerance_fails() {
    let names = [
        "expect.final.layer2.0.conv1.weight",
        "expect.final.layer1.0.bn1.running_var",
        "expect.final.momentum.prototypes.weight",
        "expect.step3.loss",
        "expect.final.queue.0",
    ];
    assert_threshold("swav_train_assign0.safetensors", &names);
    assert_threshold("swav_train_sgd.safetensors", &["expect.final.layer4.1.bn2.bias", "expect.step2.loss"]);
    assert_threshold("swav_loss_0.safetensors", &["expect.loss", "expect.codes.0"]);
}

/// The failing checks of `file` run with one metadata value replaced (a step with a wrong setting).
fn failures_with(file: &str, key: &str, value: &str) -> Vec<String> {
    let mut case_file = NamedTensors::read(&case(file)).unwrap();
    assert!(case_file.metadata.insert(key.into(), value.into()).is_some(), "{file} has no `{key}`");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    case_file.write(&path).unwrap();
    let report = verify_case(&path).unwrap();
    report.checks.iter().filter(|c| !c.pass()).map(|c| c.name.clone()).collect()
}

#[test]
fn a_step_with_a_wrong_setting_fails() {
    let file = "swav_train_assign0.safetensors";
    let meta = NamedTensors::read(&case(file)).unwrap().metadata;
    let scaled = |key: &str, factor: f64| (factor * meta[key].parse::<f64>().unwrap()).to_string();
    // 1% more LARC trust: every update 1% larger.
    let f = failures_with(file, "trust_coefficient", &scaled("trust_coefficient", 1.01));
    assert!(f.iter().any(|n| n.starts_with("expect.final.layer")), "{f:?}");
    // 1% less momentum.
    let f = failures_with(file, "momentum", &scaled("momentum", 0.99));
    assert!(f.iter().any(|n| n.starts_with("expect.final.momentum.")), "{f:?}");
    // A softmax temperature 1% off changes the loss of the very first step.
    let f = failures_with(file, "temperature", &scaled("temperature", 1.01));
    assert!(f.contains(&"expect.step0.loss".to_string()), "{f:?}");
    // Sinkhorn's epsilon 1% off changes the codes, hence the loss.
    let f = failures_with(file, "epsilon", &scaled("epsilon", 1.01));
    assert!(f.contains(&"expect.step0.loss".to_string()), "{f:?}");
    // Prototypes frozen one iteration too long: their update and momentum differ.
    let freeze: usize = meta["freeze_prototypes_niters"].parse().unwrap();
    let f = failures_with(file, "freeze_prototypes_niters", &(freeze + 1).to_string());
    assert!(f.contains(&"expect.final.prototypes.weight".to_string()), "{f:?}");
    // Never released: PyTorch has a momentum buffer for them, we do not.
    let steps = &meta["steps"];
    let f = failures_with(file, "freeze_prototypes_niters", steps);
    assert!(f.contains(&"expect.final.momentum.prototypes.weight".to_string()), "{f:?}");
    // Plain SGD instead of LARC.
    let f = failures_with(file, "lars", "false");
    assert!(f.len() > 100, "{f:?}");
}
