//! `cargo xtask verify-reference <file.safetensors>...`: run PyTorch reference cases, print relative errors.

use anyhow::bail;
use swav_reference::verify_case;

#[derive(clap::Args)]
pub struct Args {
    /// Reference case files (safetensors with a `kind` in their metadata).
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (mut failed, mut unreadable) = (0, 0);
    for file in &args.files {
        let report = match verify_case(file) {
            Ok(r) => r,
            Err(e) => {
                println!("{}: CANNOT RUN: {e}", file.display());
                unreadable += 1;
                continue;
            }
        };
        println!("{} ({})", file.display(), report.kind);
        for c in &report.checks {
            let verdict = if !c.pass() {
                "FAIL".to_string()
            } else if c.by_baseline() {
                format!(
                    "PASS (float32 conditioning: PyTorch float32 error {:.2e})",
                    c.float32_baseline.unwrap_or(f64::NAN)
                )
            } else {
                "PASS".to_string()
            };
            println!("  {:<56} {:>10.3e}  tol {:.0e}  {verdict}", c.name, c.rel_err, c.tol);
        }
        failed += report.checks.iter().filter(|c| !c.pass()).count();
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
