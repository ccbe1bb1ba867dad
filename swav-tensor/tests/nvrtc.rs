//! Compiles every kernel file of swav-tensor with the real NVRTC for sm_80 and sm_90 and prints each
//! kernel's registers, spills and shared memory. NVRTC needs no GPU: `python3 -m pip install
//! nvidia-cuda-nvrtc && source scripts/nvrtc-env.sh`. Without it the test prints SKIPPED and passes,
//! unless SWAV_REQUIRE_NVRTC=1.

use std::io::Write;

use swav_tensor::cuda::nvrtc::{compile_check, CHECK_ARCHS};
use swav_tensor::cuda::sources;

#[test]
fn nvrtc_compiles_every_kernel_for_sm80_and_sm90() {
    match compile_check(&sources(), &CHECK_ARCHS) {
        // Written to the process' stderr, past the test harness' capture, so that the table is in the log.
        Ok(Some(report)) => {
            let _ = writeln!(std::io::stderr(), "{report}");
        }
        Ok(None) => {}
        Err(e) => panic!("{e}"),
    }
}
