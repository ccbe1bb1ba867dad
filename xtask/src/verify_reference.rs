//! `cargo xtask verify-reference <file.safetensors>...`: run PyTorch reference cases and print, per case,
//! its kind and every check with its error, its tolerance and the rule that judged it.

use anyhow::bail;
use swav_reference::verify_case_with;

#[derive(clap::Args)]
pub struct Args {
    /// Reference case files (safetensors with a `kind` in their metadata).
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    /// Where the network and the training iterations run: cpu, or cuda[:N] (float32; the sinkhorn and
    /// swav_loss kinds check host functions and run on the host).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (device, _) = crate::open_device(&args.device)?;
    let (mut failed, mut unreadable) = (0, 0);
    for file in &args.files {
        let report = match verify_case_with(file, device, &|_, _| {}) {
            Ok(r) => r,
            Err(e) => {
                println!("{}: CANNOT RUN: {e}", file.display());
                unreadable += 1;
                continue;
            }
        };
        println!("{} (kind {}, on {device})", file.display(), report.kind);
        for c in &report.checks {
            let verdict = if c.pass() { "PASS" } else { "FAIL" };
            println!("  {:<56} error {:>9.2e}  tol {:>9.2e}  {verdict}  [{}]", c.name, c.error, c.tolerance, c.rule);
        }
        let n = report.counts();
        println!(
            "  {} checks: {} failed; tolerance widened by float32 conditioning {}, float32 decisions {}, undetermined in float32 {}",
            n.checks, n.failed, n.widened, n.decisions, n.undetermined
        );
        failed += n.failed;
    }
    if failed > 0 {
        println!(
            "A check fails when our error exceeds what float32 rounding of this case explains (swav-reference/cases/README.md). \
             If PyTorch's own float32 run misses it too (scripts/make_*_cases.py --float32), the case is not float32-reproducible: regenerate it."
        );
    }
    match (unreadable, failed) {
        (0, 0) => {}
        (0, f) => bail!("{f} tensor(s) out of tolerance"),
        (u, 0) => bail!("{u} file(s) could not be run (unreadable, or not a reference case); every tensor of the others is within tolerance"),
        (u, f) => bail!("{u} file(s) could not be run (unreadable, or not a reference case) and {f} tensor(s) out of tolerance"),
    }
    println!("all reference checks pass");
    Ok(())
}
