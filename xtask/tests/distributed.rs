//! Data-parallel training across real processes under `mpirun` (feature `mpi`; needs Open MPI):
//! `cargo test --release -p xtask --features mpi --test distributed`.
//!
//! - 2 ranks with SyncBN and batch b against 1 rank with batch 2b, 3 steps on the embedded images
//!   (relative error < 1e-5 per tensor, each measured in the unit it acts in);
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

/// `xtask train` on `ranks` processes (1: without mpirun) with the cpu-tiny preset, unless `extra`
/// names a `--config`.
fn train(ranks: usize, data: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = if ranks == 1 {
        Command::new(xtask())
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none", xtask()]);
        c
    };
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.arg("train");
    if !extra.contains(&"--config") {
        cmd.args(["--preset", "cpu-tiny"]);
    }
    cmd.args(["--threads", "1", "--data"]).arg(data).arg("--run-dir").arg(run);
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

/// cpu-tiny's network at width 8 with larger crops: every batch norm sees enough values per channel
/// that its statistics are well-conditioned (on 8- and 12-pixel crops the deepest ones see a handful,
/// and their rounding differences grow past 1e-5 within 3 steps whatever the summation order).
const SYNC_BN_CONFIG: &str = r#"
[model]
arch = "resnet18"
width = 8
small_stem = true
in_channels = 1
hidden_mlp = 32
feat_dim = 16
prototypes = [12]
sync_bn = true

[[crops.groups]]
count = 2
size = 28
min_scale = 0.3
max_scale = 1.0

[[crops.groups]]
count = 1
size = 24
min_scale = 0.2
max_scale = 0.5

[crops.augment]
saturation = 0.0
hue = 0.0
grayscale_p = 0.0
blur_p = 0.0

[train]
epochs = 1
batch_size = 8
base_lr = 0.3
final_lr = 0.003
warmup_epochs = 0
crops_for_assign = [0, 1]
freeze_prototypes_niters = 0
seed = 7
workers = 1
"#;

#[test]
fn two_ranks_with_sync_bn_follow_one_rank_with_the_double_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let config = tmp.path().join("sync-bn.toml");
    std::fs::write(&config, SYNC_BN_CONFIG).unwrap();
    let common = ["--config", config.to_str().unwrap(), "--max-steps", "3"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(&train(1, &data, &one, &[&common[..], &["--set", "train.batch_size=16"]].concat()));
    ok(&train(2, &data, &two, &[&common[..], &["--set", "train.batch_size=8"]].concat()));
    let (a, b) = (tensors(&checkpoint(&one, 3, "safetensors")), tensors(&checkpoint(&two, 3, "safetensors")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    // Each tensor against the unit it acts in: a batch norm's shift (which starts at 0 and sums
    // gradients that nearly cancel) against its scale gamma; a running mean against the running
    // standard deviation; the bias of the linear layer before the head's batch norm (whose gradient is
    // 0 in exact arithmetic: it receives rounding noise, which LARS scales to a full step, and it has
    // no effect on a training-mode forward) against the standard deviation of that batch norm's
    // input; every other tensor against itself.
    let std_of = |bn: &str| -> Vec<f32> { a[&format!("{bn}.running_var")].iter().map(|v| v.sqrt()).collect() };
    let scale = |name: &str| -> Vec<f32> {
        if name == "projection_head.0.bias" {
            return std_of("projection_head.1");
        }
        match (name.strip_suffix(".bias"), name.strip_suffix(".running_mean")) {
            (Some(bn), _) if a.contains_key(&format!("{bn}.running_mean")) => a[&format!("{bn}.weight")].clone(),
            (_, Some(bn)) => std_of(bn),
            _ => a[name].clone(),
        }
    };
    let mut worst = Vec::new();
    for (name, x) in &a {
        let y = &b[name];
        let d: f64 = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>().sqrt();
        let n: f64 = scale(name).iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        worst.push((d / n.max(1e-30), name.clone()));
    }
    worst.sort_by(|p, q| q.0.total_cmp(&p.0));
    eprintln!("2 ranks vs 1 rank after 3 steps, worst relative errors: {:?}", &worst[..4]);
    let pre_bn_bias = worst.iter().find(|(_, n)| n == "projection_head.0.bias").unwrap().0;
    let (e, name) = worst.iter().find(|(_, n)| n != "projection_head.0.bias").unwrap();
    assert!(*e < 1e-5, "{name}: {e:e}");
    // The noise-driven bias is held to a looser bound, in its own unit.
    assert!(pre_bn_bias < 2e-4, "projection_head.0.bias: {pre_bn_bias:e}");
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
