//! Compiles the training crate's kernel files (loss, LARS, prototypes) with the real NVRTC for sm_80
//! and sm_90 and prints each kernel's registers, spills and shared memory (see swav-tensor's
//! `cuda::nvrtc::compile_check`: SKIPPED without NVRTC unless SWAV_REQUIRE_NVRTC=1).

use std::io::Write;

use swav_tensor::cuda::nvrtc::{compile_check, CHECK_ARCHS};

#[test]
fn nvrtc_compiles_every_kernel_for_sm80_and_sm90() {
    match compile_check(&swav_train::cuda_sources(), &CHECK_ARCHS) {
        // Past the test harness' capture, so that the table is in the log.
        Ok(Some(report)) => {
            let _ = writeln!(std::io::stderr(), "{report}");
        }
        Ok(None) => {}
        Err(e) => panic!("{e}"),
    }
}
