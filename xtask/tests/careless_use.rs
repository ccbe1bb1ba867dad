//! Outputs never overwrite inputs, bad numbers are refused before work starts, and each message says
//! what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A labelled dataset and a model file trained for one step on it.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let images = swav_data::synthetic::write_shapes_idx(&root.join("raw"), 32, 12, 1).unwrap();
    let data = root.join("data");
    let (ok, log) = run(&["preprocess", "--input", s(&images), "--output", s(&data)]);
    assert!(ok, "{log}");
    let run_dir = root.join("run");
    let (ok, log) =
        run(&["train", "--data", s(&data), "--run-dir", s(&run_dir), "--preset", "cpu-tiny", "--max-steps", "1"]);
    assert!(ok, "{log}");
    let model = swav_train::checkpoint::latest(&run_dir).unwrap().unwrap().model_path();
    (data, model)
}

#[test]
fn outputs_that_would_overwrite_inputs_are_refused_and_the_inputs_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model) = setup(tmp.path());
    let model_bytes = std::fs::read(&model).unwrap();
    let manifest = data.join("manifest.json");
    let manifest_bytes = std::fs::read(&manifest).unwrap();
    let f = tmp.path().join("f.npy");
    let cases: Vec<Vec<&str>> = vec![
        vec!["export", "--checkpoint", s(&model), "--output", s(&model)],
        vec!["embed", "--checkpoint", s(&model), "--data", s(&data), "--output", s(&model)],
        vec!["embed", "--checkpoint", s(&model), "--data", s(&data), "--output", s(&manifest)],
        vec!["embed", "--checkpoint", s(&model), "--data", s(&data), "--output", s(&f), "--labels", s(&f)],
        vec![
            "eval",
            "--checkpoint",
            s(&model),
            "--train-data",
            s(&data),
            "--test-data",
            s(&data),
            "--output",
            s(&model),
        ],
    ];
    for args in cases {
        let (ok, log) = run(&args);
        assert!(!ok && log.contains("would overwrite"), "{args:?}: {log}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), model_bytes);
    assert_eq!(std::fs::read(&manifest).unwrap(), manifest_bytes);
    assert!(!f.exists());
}

#[test]
fn bad_numbers_are_refused_with_the_setting_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model) = setup(tmp.path());
    // k-NN settings are checked before features are extracted.
    let (ok, log) =
        run(&["eval", "--checkpoint", s(&model), "--train-data", s(&data), "--test-data", s(&data), "--k", "0"]);
    assert!(!ok && log.contains("k >= 1"), "{log}");
    assert!(!log.contains("features done"), "{log}");
    let onnx = tmp.path().join("m.onnx");
    let (ok, log) = run(&["export", "--checkpoint", s(&model), "--output", s(&onnx), "--batch", "9223372036854775808"]);
    assert!(!ok && log.contains("batch"), "{log}");
    // An absurd thread count is capped by the machine, not fatal.
    let (ok, log) = run(&[
        "train",
        "--data",
        s(&data),
        "--run-dir",
        s(&tmp.path().join("run2")),
        "--preset",
        "cpu-tiny",
        "--max-steps",
        "1",
        "--threads",
        "100000",
        "--set",
        "train.workers=100000",
    ]);
    assert!(ok && log.contains("100000 threads requested"), "{log}");
    let (ok, log) = run(&[
        "train",
        "--data",
        s(&data),
        "--run-dir",
        s(&tmp.path().join("run3")),
        "--preset",
        "cpu-tiny",
        "--max-steps",
        "0",
    ]);
    assert!(!ok && log.contains("max-steps"), "{log}");
}

#[test]
fn verify_reference_tells_an_unreadable_file_from_a_tolerance_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a case").unwrap();
    let (ok, log) = run(&["verify-reference", s(&junk)]);
    assert!(!ok && log.contains("CANNOT RUN") && log.contains("could not be run"), "{log}");
    assert!(!log.contains("out of tolerance"), "{log}");
}

#[test]
fn verify_reference_prints_the_kind_and_the_rule_of_every_check_and_fails_a_wrong_step() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../swav-reference/cases");
    let good = cases.join("swav_train_sgd.safetensors");
    let (ok, log) = run(&["verify-reference", s(&good)]);
    assert!(ok && log.contains("(kind swav_train, on cpu)") && log.contains("all reference checks pass"), "{log}");
    assert!(log.contains("expect.final.momentum.conv1.weight") && log.contains("update 1e-3 relative"), "{log}");
    // The same case with a momentum 1% off: a tolerance failure, not an unreadable file.
    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong_momentum.safetensors");
    let mut case = swav_model::checkpoint::NamedTensors::read(&good).unwrap();
    case.metadata.insert("momentum".into(), "0.891".into());
    case.write(&wrong).unwrap();
    let (ok, log) = run(&["verify-reference", s(&wrong)]);
    assert!(!ok && log.contains("FAIL") && log.contains("out of tolerance"), "{log}");
    assert!(!log.contains("CANNOT RUN") && !log.contains("could not be run"), "{log}");
}
