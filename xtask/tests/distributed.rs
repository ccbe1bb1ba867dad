//! Data-parallel training across real processes under `mpirun` (feature `mpi`; needs Open MPI):
//! `cargo test --release -p xtask --features mpi --test distributed`.
//!
//! - 2 ranks with SyncBN and batch b against 1 rank with batch 2b, 3 steps on the embedded images;
//! - a 2-rank run stopped at step 3 and resumed gives the same tensors at step 6 as one that never
//!   stopped (every rank's queue in use);
//! - the distributed Sinkhorn reference case of world size 3 across 3 processes;
//! - a killed rank stops the job (mpirun names it), leaves no partial checkpoint, and the same command
//!   resumes.
#![cfg(feature = "mpi")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn xtask() -> &'static str {
    env!("CARGO_BIN_EXE_xtask")
}

fn data(dir: &Path) -> PathBuf {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/fashion-mnist/t10k-images-idx3-ubyte.gz");
    let out = dir.join("data");
    let st = Command::new(xtask()).args(["preprocess", "--input"]).arg(&images).arg("--output").arg(&out).status();
    assert!(st.unwrap().success());
    out
}

/// `xtask train` on `ranks` processes (1: without mpirun) with the cpu-tiny preset.
fn train(ranks: usize, data: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = if ranks == 1 {
        Command::new(xtask())
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none", xtask()]);
        c
    };
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.args(["train", "--preset", "cpu-tiny", "--threads", "1", "--data"]).arg(data).arg("--run-dir").arg(run);
    cmd.args(extra).stdin(Stdio::null()).output().expect("mpirun on the PATH (apt-get install openmpi-bin)")
}

/// The f32 tensors of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out = BTreeMap::new();
    for (name, v) in header.as_object().unwrap() {
        if v.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
            continue;
        }
        let o = v["data_offsets"].as_array().unwrap();
        let (s, e) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
        let data = &bytes[8 + n + s..8 + n + e];
        out.insert(name.clone(), data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
    }
    out
}

fn checkpoint(run: &Path, step: usize, suffix: &str) -> PathBuf {
    run.join(format!("checkpoints/step-{step:08}.{suffix}"))
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn two_ranks_with_sync_bn_follow_one_rank_with_the_double_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let common = ["--set", "model.sync_bn=true", "--max-steps", "3"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(&train(1, &data, &one, &[&common[..], &["--set", "train.batch_size=16"]].concat()));
    ok(&train(2, &data, &two, &[&common[..], &["--set", "train.batch_size=8"]].concat()));
    let (a, b) = (tensors(&checkpoint(&one, 3, "safetensors")), tensors(&checkpoint(&two, 3, "safetensors")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = (0.0f64, String::new());
    for (name, x) in &a {
        // The bias of the linear layer before the head's batch norm has a gradient of exactly 0 in
        // exact arithmetic: what it gets is rounding noise, which LARS scales to a full step.
        if name == "projection_head.0.bias" {
            continue;
        }
        let y = &b[name];
        let d: f64 = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>().sqrt();
        let n: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let e = d / n.max(1e-30);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!("2 ranks vs 1 rank after 3 steps: worst relative error {:e} ({})", worst.0, worst.1);
    // Without SyncBN the two differ by far more (per-rank batch statistics).
    assert!(worst.0 < 1e-4, "{}: {:e}", worst.1, worst.0);
}

#[test]
fn a_stopped_two_rank_run_resumes_to_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let queue = ["--set", "train.queue_length=32", "--set", "train.epoch_queue_starts=0"];
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    ok(&train(2, &data, &whole, &[&queue[..], &["--max-steps", "6"]].concat()));
    ok(&train(2, &data, &parts, &[&queue[..], &["--max-steps", "3"]].concat()));
    ok(&train(2, &data, &parts, &[&queue[..], &["--max-steps", "6"]].concat()));
    for suffix in ["safetensors", "train.safetensors"] {
        assert_eq!(tensors(&checkpoint(&whole, 6, suffix)), tensors(&checkpoint(&parts, 6, suffix)), "{suffix}");
    }
}

#[test]
fn a_killed_rank_stops_the_job_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let run = tmp.path().join("run");
    ok(&train(2, &data, &run, &["--max-steps", "2"]));
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", "2", "--oversubscribe", "--bind-to", "none", xtask(), "train", "--preset", "cpu-tiny"]);
    cmd.args(["--threads", "1", "--data"]).arg(&data).arg("--run-dir").arg(&run);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Rank 1's heartbeat names its process once it trains past the checkpoint.
    let beat = run.join("ranks/rank-1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pid = loop {
        let text = std::fs::read_to_string(&beat).unwrap_or_default();
        let f: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        if f.len() == 3 && f[0] >= 4 {
            break f[1];
        }
        assert!(std::time::Instant::now() < deadline, "rank 1 never reached step 4");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1"), "{err}");
    let leftovers: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp") || n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let again = train(2, &data, &run, &["--max-steps", "5"]);
    ok(&again);
    assert!(checkpoint(&run, 5, "safetensors").exists());
}

#[test]
fn the_world_size_3_sinkhorn_case_passes_across_3_processes() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("../swav-sinkhorn/tests/cases/sinkhorn_3.safetensors");
    let out = Command::new("mpirun")
        .args(["-np", "3", "--oversubscribe", "--bind-to", "none", xtask(), "verify-reference"])
        .arg(&case)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 processes over MPI") && text.contains("PASS"), "{text}");
}
