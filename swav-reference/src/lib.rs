//! Runs the PyTorch reference cases (safetensors files with a `kind` in their metadata: `sinkhorn`,
//! `swav_loss`, `swav_model`, `swav_train`) through swav-rs and judges every tensor it produces.
//! Used by `cargo xtask verify-reference` and by the test suite.
//!
//! Each case runs on its own inputs and again on its inputs moved by a few ulps ([`judge::reruns`]):
//! what those moves do to each tensor is how much float32 rounding alone can explain, and a ReLU or
//! max-pool decision that float32 takes the other way than float64 shows as a moved run that agrees
//! with the reference. Every check follows one rule, [`judge::judge`], written out in
//! `cases/README.md`; a case that cannot be run at all (unreadable, malformed, an unknown kind) is a
//! [`ReferenceError`], never a failed check.
//!
//! ```no_run
//! let report = swav_reference::verify_case(std::path::Path::new("cases/swav_train_0.safetensors"))?;
//! for c in &report.checks {
//!     println!("{} {:.2e} <= {:.2e}? {} [{}]", c.name, c.error, c.tolerance, c.pass(), c.rule);
//! }
//! # Ok::<(), swav_reference::ReferenceError>(())
//! ```

#![warn(missing_docs)]

use std::path::Path;

use swav_model::checkpoint::NamedTensors;
pub use swav_tensor::Device;

pub use error::ReferenceError;
pub use judge::{Allowance, Check, Class, Rule, Witness};

mod case;
mod error;
pub mod judge;
mod kinds;

/// The verdict on one case file.
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case's `kind`.
    pub kind: String,
    /// Every tensor of the case that was compared, in the order the run produced them.
    pub checks: Vec<Check>,
}

impl CaseReport {
    /// Something was compared, and every check passed.
    pub fn pass(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(Check::pass)
    }

    /// How the checks were judged, for a one-line summary.
    pub fn counts(&self) -> Counts {
        let mut n = Counts { checks: self.checks.len(), ..Counts::default() };
        for c in &self.checks {
            n.failed += usize::from(!c.pass());
            n.widened += usize::from(c.rule.allowance == Allowance::Conditioned);
            n.undetermined += usize::from(c.rule.allowance == Allowance::Undetermined);
            n.decisions += usize::from(c.rule.witness.is_some() && c.pass());
        }
        n
    }
}

/// Checks of a case by how they were judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every check.
    pub checks: usize,
    /// Out of tolerance.
    pub failed: usize,
    /// Tolerance widened by the measured float32 conditioning.
    pub widened: usize,
    /// Not determined by float32 (checked for size and direction only).
    pub undetermined: usize,
    /// Passed as a float32 decision, witnessed by a perturbed run.
    pub decisions: usize,
}

/// A deliberate error in our results, for testing that the rule catches a wrong implementation:
/// called on every tensor our runs produce (the name of the case tensor it is compared with, our
/// values; an update for weights of a `swav_train` case), in both runs, as a systematic bug would be.
pub type Fault<'a> = &'a dyn Fn(&str, &mut [f64]);

/// Runs one reference case file on the CPU and judges every tensor.
pub fn verify_case(path: &Path) -> Result<CaseReport, ReferenceError> {
    verify_case_with(path, Device::Cpu, &|_, _| {})
}

/// [`verify_case`] on `device`, with `fault` applied to our results before they are judged. On a
/// CUDA device the network (`swav_model`) and the whole iteration (`swav_train`) run there in float32;
/// the `sinkhorn` and `swav_loss` kinds check host functions and run on the host whatever the device
/// (swav-sinkhorn's and swav-train's CUDA kernels have parity tests of their own).
pub fn verify_case_with(path: &Path, device: Device, fault: Fault<'_>) -> Result<CaseReport, ReferenceError> {
    let file = NamedTensors::read(path)?;
    let case = case::Case { path, file: &file, device };
    let kind: String = case.meta("kind")?;
    let run: fn(&case::Case<'_>) -> Result<Vec<judge::Output>, ReferenceError> = match kind.as_str() {
        "sinkhorn" => kinds::sinkhorn::run,
        "swav_loss" => kinds::loss::run,
        "swav_model" => kinds::model::run,
        "swav_train" => kinds::train::run,
        other => return Err(case.err(format!("unknown kind `{other}`"))),
    };
    let mut outputs = run(&case)?;
    let mut reruns = Vec::new();
    for (ulps, pattern) in judge::reruns() {
        let moved = case::perturbed(&file, ulps, pattern);
        reruns.push(judge::Rerun { ulps, pattern, outputs: run(&case::Case { path, file: &moved, device })? });
    }
    for o in outputs.iter_mut().chain(reruns.iter_mut().flat_map(|r| r.outputs.iter_mut())) {
        if let Some(got) = &mut o.got {
            fault(&o.name, got);
        }
    }
    let checks = judge::judge(&outputs, &reruns, &case)
        .map_err(|name| case.err(format!("tensor `{name}` missing from the case")))?;
    Ok(CaseReport { kind, checks })
}
