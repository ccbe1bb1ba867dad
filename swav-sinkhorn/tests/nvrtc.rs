//! Compiles the Sinkhorn kernels with the real NVRTC for sm_80 and sm_90 (no GPU needed), exactly as
//! the runtime compiles them, and checks that every kernel the runtime loads is in the PTX. Without
//! NVRTC it prints SKIPPED, unless SWAV_REQUIRE_NVRTC=1 (CI), which makes the absence a failure.
#![cfg(feature = "cuda")]

use swav_sinkhorn::cuda::{compile_kernels, kernel_names};

#[test]
fn nvrtc_compiles_the_sinkhorn_kernels_for_sm80_and_sm90() {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !unsafe { swav_sinkhorn::cuda::cudarc::nvrtc::sys::is_culib_present() } {
        assert!(
            std::env::var("SWAV_REQUIRE_NVRTC").map_or(true, |v| v != "1"),
            "SWAV_REQUIRE_NVRTC=1 but NVRTC (libnvrtc.so) could not be loaded: `source scripts/nvrtc-env.sh`"
        );
        eprintln!("SKIPPED: NVRTC (libnvrtc.so) could not be loaded");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = compile_kernels(Some(arch)).unwrap_or_else(|e| panic!("{arch}: {e}")).to_src();
        assert!(ptx.contains(&format!(".target {arch}")), "{arch}: PTX for another target");
        for name in kernel_names() {
            assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: kernel {name} missing from the PTX");
        }
        eprintln!("{arch}: {} kernels, {} bytes of PTX", kernel_names().len(), ptx.len());
    }
}
