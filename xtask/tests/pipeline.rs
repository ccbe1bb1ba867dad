//! The pipeline end to end on a tiny generated dataset: every step runs, a second run skips them all,
//! `--force` redoes a step and those after it, bad descriptions are refused.

use std::path::Path;
use std::process::Command;

fn write_idx(dir: &Path, n: usize, side: usize) -> std::path::PathBuf {
    let mut pixels = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 3) as u8;
        for y in 0..side {
            for x in 0..side {
                let on = match class {
                    0 => y == side / 2,
                    1 => x == side / 2,
                    _ => x == y,
                };
                pixels.push(if on { 220 } else { ((i * 31 + y * 7 + x * 13) % 50) as u8 });
            }
        }
        labels.push(class);
    }
    let images = dir.join("toy-images-idx3-ubyte");
    let mut b = 0x0803u32.to_be_bytes().to_vec();
    for d in [n as u32, side as u32, side as u32] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(&pixels);
    std::fs::write(&images, b).unwrap();
    let mut l = 0x0801u32.to_be_bytes().to_vec();
    l.extend_from_slice(&(n as u32).to_be_bytes());
    l.extend_from_slice(&labels);
    std::fs::write(dir.join("toy-labels-idx1-ubyte"), l).unwrap();
    images
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn pipeline_runs_every_step_then_skips_them_and_force_redoes_from_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let images = write_idx(tmp.path(), 96, 12);
    let desc = tmp.path().join("pipeline.toml");
    std::fs::write(
        &desc,
        format!(
            "out_dir = \"out\"\n[data]\ntrain = \"{}\"\nholdout = 32\n[train]\npreset = \"cpu-tiny\"\nset = [\"train.epochs=2\"]\n[eval]\nrandom_baseline = true\nk = 10\n",
            images.file_name().unwrap().to_string_lossy()
        ),
    )
    .unwrap();
    let d = desc.to_str().unwrap();
    let (ok, log) = run(&["pipeline", "--config", d]);
    assert!(ok, "{log}");
    let out = tmp.path().join("out");
    for f in [
        "data/train/manifest.json",
        "data/test/manifest.json",
        "run/config.toml",
        "eval.json",
        "model.onnx",
        "stamps/export.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing\n{log}");
    }
    assert!(log.contains("64 images") && log.contains("32 images"), "{log}");
    let eval: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["test_images"], 32);
    assert!(eval["baseline"]["knn_top1"].is_number());

    let (ok, log) = run(&["pipeline", "--config", d]);
    assert!(ok, "{log}");
    assert_eq!(log.matches("up to date").count(), 4, "a second run skips every step:\n{log}");

    let (ok, log) = run(&["pipeline", "--config", d, "--force", "eval"]);
    assert!(ok, "{log}");
    assert!(log.contains("[1/4] preprocess: up to date") && log.contains("[2/4] train: up to date"), "{log}");
    assert!(!log.contains("[3/4] eval: up to date") && !log.contains("[4/4] export: up to date"), "{log}");

    // A changed training configuration retrains (and re-evaluates) but keeps the data.
    std::fs::write(&desc, std::fs::read_to_string(&desc).unwrap().replace("train.epochs=2", "train.epochs=1")).unwrap();
    let (ok, log) = run(&["pipeline", "--config", d]);
    assert!(ok, "{log}");
    assert!(log.contains("[1/4] preprocess: up to date") && !log.contains("[2/4] train: up to date"), "{log}");
}

#[test]
fn bad_descriptions_are_refused_with_the_key_named() {
    let tmp = tempfile::tempdir().unwrap();
    let images = write_idx(tmp.path(), 20, 8);
    let desc = tmp.path().join("p.toml");
    std::fs::write(
        &desc,
        format!(
            "out_dir = \"o\"\n[data]\ntrain = \"{}\"\nholdout = 50\n[train]\npreset = \"cpu-tiny\"\n",
            images.display()
        ),
    )
    .unwrap();
    let (ok, log) = run(&["pipeline", "--config", desc.to_str().unwrap()]);
    assert!(!ok && log.contains("holdout"), "{log}");
    std::fs::write(
        &desc,
        format!(
            "out_dir = \"o\"\nbogus = 1\n[data]\ntrain = \"{}\"\n[train]\npreset = \"cpu-tiny\"\n",
            images.display()
        ),
    )
    .unwrap();
    let (ok, log) = run(&["pipeline", "--config", desc.to_str().unwrap()]);
    assert!(!ok && log.contains("bogus"), "{log}");
    std::fs::write(
        &desc,
        "out_dir = \"o\"\n[data]\ntrain = \"missing-file\"\ntest = \"missing-too\"\n[train]\npreset = \"cpu-tiny\"\n",
    )
    .unwrap();
    let (ok, log) = run(&["pipeline", "--config", desc.to_str().unwrap()]);
    assert!(!ok && log.contains("missing-file"), "{log}");
}
