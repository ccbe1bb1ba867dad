//! scripts/gpu-check.sh is trusted with the few minutes a GPU is lent, so its own behaviour is tested
//! here with stand-in binaries: every stage is reported as soon as it ends, a failing or hanging stage
//! is reported with its exit status or its time limit and the rest still run, and the exit status
//! counts the failed stages (nothing lost in a pipe).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn stub(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check.sh")
}

/// Runs the quick mode on the stand-ins of `bin`, results in `out`, with `env` set.
fn run_quick(bin: &Path, out: &Path, env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(["quick", bin.to_str().unwrap(), out.to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn gpu_check_reports_every_stage_and_counts_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // xtask: doctor passes; verify-reference fails with status 3; bench hangs.
    stub(
        &bin,
        "xtask",
        r#"case "$1" in
  doctor) echo "doctor ok";;
  verify-reference) echo "reference broke" >&2; exit 3;;
  bench) sleep 30;;
esac"#,
    );
    stub(
        &bin,
        "device",
        r#"echo "SWAV_REQUIRE_CUDA=$SWAV_REQUIRE_CUDA SWAV_SKIP_EMULATOR=$SWAV_SKIP_EMULATOR cases in $SWAV_SOURCE_DIR""#,
    );
    stub(&bin, "device_ops", "echo ops ok");
    stub(&bin, "step_on_device", "echo step ops ok");
    stub(&bin, "sync_batchnorm", "echo sync bn ok");
    // The Sinkhorn parity tests fail; the NCCL one, run as its own stage, passes.
    stub(&bin, "cuda_parity", r#"if [ "$1" = nccl ]; then echo nccl ok; else echo parity failed; exit 101; fi"#);
    let out = tmp.path().join("out");
    let status = run_quick(&bin, &out, &[("SWAV_GPU_CHECK_LIMIT", "2".as_ref()), ("TMPDIR", tmp.path().as_os_str())]);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    let line =
        |stage: &str| summary.lines().find(|l| l.starts_with(stage)).unwrap_or_else(|| panic!("{stage}: {summary}"));
    assert!(line("doctor").contains(" ok "), "{summary}");
    assert!(line("tensors").contains(" ok "), "{summary}");
    assert!(line("ops-parity").contains(" ok "), "{summary}");
    assert!(line("step-ops-parity").contains(" ok "), "{summary}");
    assert!(line("sync-bn-parity").contains(" ok "), "{summary}");
    assert!(line("sinkhorn-parity").contains("FAILED: exit 101"), "{summary}");
    assert!(line("nccl-one-rank").contains(" ok "), "{summary}");
    assert!(line("nccl-gradients-one-rank").contains(" ok "), "{summary}");
    assert!(line("reference-on-cuda").contains("FAILED: exit 3"), "{summary}");
    assert!(line("bench-rn18-small-bf16").contains("FAILED: timed out after 2 s"), "{summary}");
    // The failing stage's output is quoted in the summary, and kept whole in its log.
    assert!(summary.contains("| reference broke"), "{summary}");
    assert!(std::fs::read_to_string(out.join("doctor.log")).unwrap().contains("doctor ok"));
    // Parity tests run with a missing device as a failure and without their emulated halves.
    let env = std::fs::read_to_string(out.join("tensors.log")).unwrap();
    assert!(env.contains("SWAV_REQUIRE_CUDA=1 SWAV_SKIP_EMULATOR=1"), "{env}");
    // Prebuilt test binaries read their reference cases from the checkout the script runs in.
    let checkout = script().parent().unwrap().parent().unwrap().canonicalize().unwrap();
    assert!(env.contains(&format!("cases in {}", checkout.display())), "{env}");
    assert!(summary.contains("3 stage(s) failed"), "{summary}");
    assert_eq!(status.status.code(), Some(3), "{}", String::from_utf8_lossy(&status.stderr));
}

#[test]
fn gpu_check_runs_only_the_named_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["xtask", "device", "device_ops", "cuda_parity"] {
        stub(&bin, name, "echo ran");
    }
    let out = tmp.path().join("out");
    let status = run_quick(&bin, &out, &[("SWAV_GPU_CHECK_STAGES", "doctor nccl-one-rank".as_ref())]);
    assert_eq!(status.status.code(), Some(0));
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    let ran: Vec<&str> = summary.lines().filter(|l| l.contains(" ok ")).map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(ran, ["doctor", "nccl-one-rank"], "{summary}");
}

#[test]
fn gpu_check_refuses_an_unknown_mode() {
    let out = Command::new("bash").arg(script()).arg("everything").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
