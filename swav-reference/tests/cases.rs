//! Every reference case of this crate's `cases/` folder (and of `$SWAV_REFERENCE_DIR`, when set) must
//! pass under the one judging rule (`cases/README.md`): Sinkhorn, the SwAV loss, the whole model's
//! forward, gradients and statistics, and whole training iterations.

use std::path::PathBuf;

use swav_reference::verify_case;

/// The shipped cases: in the checkout named by `$SWAV_SOURCE_DIR` when set (prebuilt test binaries run
/// on another machine, as `scripts/gpu-check.sh` does), else in the source tree the test was built from.
fn shipped() -> PathBuf {
    match std::env::var_os("SWAV_SOURCE_DIR") {
        Some(root) => PathBuf::from(root).join("swav-reference/cases"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases"),
    }
}

fn case_files() -> Vec<PathBuf> {
    let mut dirs = vec![shipped()];
    match std::env::var_os("SWAV_REFERENCE_DIR") {
        Some(d) => dirs.push(PathBuf::from(d)),
        None => eprintln!("note: SWAV_REFERENCE_DIR is not set: only the cases shipped in cases/ run"),
    }
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display())))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

#[test]
fn all_reference_cases_pass() {
    let files = case_files();
    assert!(files.len() >= 10, "expected the cases of cases/, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let report = verify_case(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy();
        for c in &report.checks {
            let verdict = if c.pass() { "PASS" } else { "FAIL" };
            eprintln!(
                "{name} {:<56} {:.2e} (tol {:.2e}, sensitivity {:.1e}) {verdict} [{}]",
                c.name, c.error, c.tolerance, c.rule.sensitivity, c.rule
            );
            if !c.pass() {
                failures.push(format!("{}: {}", file.display(), c.name));
            }
        }
        assert!(!report.checks.is_empty(), "{}: nothing compared", file.display());
        let n = report.counts();
        eprintln!(
            "{name}: {} checks, {} failed, {} widened, {} float32 decisions, {} undetermined",
            n.checks, n.failed, n.widened, n.decisions, n.undetermined
        );
        // The shipped cases are float32-reproducible (their generators reject seeds where float32
        // takes a ReLU or max-pool decision the other way): none of their checks should need a
        // witness. One that does means our arithmetic drifted from float32 semantics.
        if file.starts_with(shipped()) && n.decisions > 0 {
            failures.push(format!("{}: {} checks pass only as float32 decisions", file.display(), n.decisions));
        }
    }
    assert!(failures.is_empty(), "failing: {failures:#?}");
}

/// The CUDA devices to run the cases on: the emulated one (kernels on the CPU through the emulation
/// of the CUDA built-ins, cuDNN and cuBLAS calls executed by the CPU ops), and device 0 where there is one.
fn cuda_devices() -> Vec<(swav_reference::Device, &'static str)> {
    use swav_reference::Device;
    static EMULATED: std::sync::OnceLock<Option<Device>> = std::sync::OnceLock::new();
    let emulated = *EMULATED.get_or_init(|| {
        let probe = swav_cuda_emu::Source { name: "probe.cu", code: "extern \"C\" __global__ void probe(int n) {}" };
        swav_cuda_emu::Emulator::new_or_skip(&[probe])?;
        let backend = swav_tensor::cuda::emulated::EmulatedBackend::new();
        swav_tensor::cuda::runtime::register(99, Box::new(backend)).expect("registered once");
        Some(Device::Cuda(99))
    });
    let real = match swav_tensor::cuda::runtime::runtime(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => {
            if std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SWAV_REQUIRE_CUDA=1 but there is no usable CUDA device: {e}");
            }
            eprintln!("SKIPPED on a GPU: {e}");
            None
        }
    };
    emulated.map(|d| (d, "emulated")).into_iter().chain(real.map(|d| (d, "gpu"))).collect()
}

#[test]
fn reference_cases_pass_on_cuda_devices() {
    for (device, what) in cuda_devices() {
        // The emulated device runs its kernels one simulated thread at a time, and each case runs a
        // dozen times (the perturbed reruns): one model case with its gradients covers the network's
        // kernels (whole iterations on the emulated device are compared with the CPU run in
        // swav-train's device_train test); a real device runs every case.
        let files: Vec<PathBuf> = case_files()
            .into_iter()
            .filter(|f| {
                let name = f.file_name().unwrap().to_string_lossy();
                what == "gpu" || name == "swav_model_small_0.safetensors"
            })
            .collect();
        for file in &files {
            let report = swav_reference::verify_case_with(file, device, &|_, _| {})
                .unwrap_or_else(|e| panic!("{} on {device}: {e}", file.display()));
            let failed: Vec<_> = report
                .checks
                .iter()
                .filter(|c| !c.pass())
                .map(|c| format!("{} {:.2e} > {:.2e}", c.name, c.error, c.tolerance))
                .collect();
            eprintln!(
                "{} on {device} ({what}): {} checks, {} failed",
                file.display(),
                report.checks.len(),
                failed.len()
            );
            assert!(!report.checks.is_empty() && failed.is_empty(), "{} on {device}: {failed:#?}", file.display());
        }
    }
}
