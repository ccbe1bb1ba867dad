//! The paper's evaluation protocols from the command line: `eval-linear` writes its report and
//! refuses to overwrite inputs; `finetune` takes a subset list, stops and resumes, exits 130 on
//! SIGTERM after a checkpoint, and its fine-tuned network is evaluated by `eval`, whose report names
//! its linear number a proxy.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xtask")
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Training and validation shapes (12 px, 4 classes) and a model file trained for one step.
fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut data = Vec::new();
    for (name, n, seed) in [("train", 48, 1), ("val", 24, 2)] {
        let images = swav_data::synthetic::write_shapes_idx(&root.join(format!("raw-{name}")), n, 12, seed).unwrap();
        let out = root.join(name);
        let (code, log) = run(&["preprocess", "--input", s(&images), "--output", s(&out)]);
        assert_eq!(code, Some(0), "{log}");
        data.push(out);
    }
    let run_dir = root.join("pretrain");
    let (code, log) =
        run(&["train", "--data", s(&data[0]), "--run-dir", s(&run_dir), "--preset", "cpu-tiny", "--max-steps", "1"]);
    assert_eq!(code, Some(0), "{log}");
    let model = swav_train::checkpoint::latest(&run_dir).unwrap().unwrap().model_path();
    (data.remove(0), data.remove(0), model)
}

#[test]
fn eval_linear_reports_best_and_last_and_refuses_to_overwrite_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val, model) = setup(tmp.path());
    let out = tmp.path().join("linear.json");
    let common = ["--checkpoint", s(&model), "--train-data", s(&train), "--val-data", s(&val)];
    let (code, log) =
        run(&[&["eval-linear"], &common[..], &["--epochs", "2", "--batch", "16", "--output", s(&out)]].concat());
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("official eval_linear") && log.contains("best") && log.contains("last"), "{log}");
    let r = json(&out);
    assert_eq!(r["epochs"].as_array().unwrap().len(), 2);
    assert!(r["best"]["top1"].as_f64().unwrap() >= r["last"]["top1"].as_f64().unwrap());
    assert_eq!((r["config"]["lr"].as_f64(), r["config"]["weight_decay"].as_f64()), (Some(0.3), Some(1e-6)));

    let bytes = std::fs::read(&model).unwrap();
    let (code, log) = run(&[&["eval-linear"], &common[..], &["--output", s(&model)]].concat());
    assert!(code != Some(0) && log.contains("would overwrite"), "{log}");
    assert_eq!(std::fs::read(&model).unwrap(), bytes);
    let (code, log) = run(&[&["eval-linear"], &common[..], &["--lr=-1", "--output", s(&out)]].concat());
    assert!(code != Some(0) && log.contains("lr > 0"), "{log}");
}

#[test]
fn finetune_on_a_listed_subset_stops_resumes_and_its_network_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val, model) = setup(tmp.path());
    // Four images of each class (the shapes cycle through the 4 classes): by index, and by the name
    // the dataset records for an IDX record.
    let list = tmp.path().join("labelled.txt");
    let mut lines: Vec<String> = (1..16).map(|i| i.to_string()).collect();
    lines.push("#0".into());
    std::fs::write(&list, lines.join("\n")).unwrap();
    let run_dir = tmp.path().join("ft");
    let args = [
        "finetune",
        "--checkpoint",
        s(&model),
        "--train-data",
        s(&train),
        "--val-data",
        s(&val),
        "--run-dir",
        s(&run_dir),
        "--labels-list",
        s(&list),
        "--epochs",
        "2",
        "--batch",
        "8",
        "--decay-epochs",
        "1",
    ];
    let (code, log) = run(&[&args[..], &["--max-steps", "3"]].concat());
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped at step 3") && log.contains("resume"), "{log}");
    let (code, log) = run(&args);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("official eval_semisup") && log.contains("best"), "{log}");
    let r = json(&run_dir.join("finetune.json"));
    assert_eq!(
        (r["train_images"].as_u64(), r["subset"]["per_class"].clone()),
        (Some(16), serde_json::json!([4, 4, 4, 4]))
    );
    let lrs: Vec<f64> = r["epochs"].as_array().unwrap().iter().map(|e| e["lr_head"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [0.2, 0.2 * 0.2]);

    // The fine-tuned network is a model file for `eval`; eval.json names its probe a proxy.
    let finetuned = r["model_file"].as_str().unwrap().to_string();
    let eval = tmp.path().join("eval.json");
    let (code, log) = run(&[
        "eval",
        "--checkpoint",
        &finetuned,
        "--train-data",
        s(&train),
        "--test-data",
        s(&val),
        "--k",
        "5",
        "--probe-epochs",
        "2",
        "--output",
        s(&eval),
    ]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("proxy") && log.contains("eval-linear"), "{log}");
    assert_eq!(json(&eval)["linear_protocol"], "linear probe (proxy: cached centre-crop features)");

    // Another subset in the same folder is another run.
    let other = ["--labels-fraction", "0.5", "--epochs", "2", "--batch", "8", "--decay-epochs", "1"];
    let (code, log) = run(&[&args[..9], &other[..]].concat());
    assert!(code != Some(0) && log.contains("another fine-tuning run"), "{log}");
}

#[test]
fn sigterm_during_finetuning_saves_a_checkpoint_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val, model) = setup(tmp.path());
    let run_dir = tmp.path().join("ft");
    let args = [
        "finetune",
        "--checkpoint",
        s(&model),
        "--train-data",
        s(&train),
        "--val-data",
        s(&val),
        "--run-dir",
        s(&run_dir),
        "--epochs",
        "500",
        "--batch",
        "16",
    ];
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log += &line;
        log.push('\n');
        if line.contains("epoch 1/500:") {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            break;
        }
    }
    log.extend(lines.map_while(Result::ok).map(|l| l + "\n"));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    let side: serde_json::Value = {
        let newest = std::fs::read_dir(run_dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .max()
            .expect("a checkpoint");
        json(&newest)
    };
    assert!(side["step"].as_u64().unwrap() >= 3, "{side}");
}
