//! `cargo xtask doctor`: what this machine offers the engine: the CPU instruction set, and for the CUDA
//! device the driver, NVRTC, cuBLAS, cuDNN and NCCL (version and the file each was loaded from), the
//! devices, and whether the engine's kernels compile for them. Exits with an error when `--device cuda`
//! cannot run here, so that scripts can ask.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    println!("swav-rs {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} instructions, {} threads", swav_core::isa::available().name(), swav_core::sys::cores());
    cuda()
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<()> {
    anyhow::bail!("this binary was built without the `cuda` feature: `--device cuda` cannot run (rebuild with it)")
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<()> {
    use swav_tensor::cuda::doctor;

    let report = doctor::report();
    println!("cuda libraries (LD_LIBRARY_PATH={}):", std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
    for lib in &report.libraries {
        match (&lib.version, &lib.problem) {
            (Some(v), _) => println!("  {:<22} {:<10} {}", lib.what, v, lib.files.join(", ")),
            (None, Some(p)) => println!("  {:<22} {:<10} {p}", lib.what, "missing"),
            (None, None) => unreachable!("a library has a version or a problem"),
        }
    }
    println!("cuda devices:");
    for d in &report.devices {
        println!("  cuda:{:<3} {} ({}, {})", d.ordinal, d.name, d.arch, swav_core::sys::human_bytes(d.memory as u128));
    }
    if let Some(p) = &report.device_problem {
        println!("  none: {p}");
    } else if report.devices.is_empty() {
        println!("  none: the driver is not loaded");
    }
    match &report.kernels {
        Some((arch, Ok(n))) => println!("kernels: {n} compiled for {arch} by NVRTC"),
        Some((arch, Err(e))) => println!("kernels: NVRTC failed for {arch}: {e}"),
        None => println!("kernels: not compiled (no NVRTC)"),
    }
    if report.usable() {
        println!("--device cuda can run here");
        Ok(())
    } else {
        if report.libraries.iter().any(|l| l.problem.is_some()) {
            println!(
                "hint: `source scripts/gpu-env.sh` finds the CUDA libraries of a system install, a toolkit or the \
                 nvidia-* Python wheels and puts them on the library path"
            );
        }
        anyhow::bail!("--device cuda cannot run here (see above for what is missing)")
    }
}
