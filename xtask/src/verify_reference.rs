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
    let world = crate::distributed::world(std::time::Duration::from_secs(120))?;
    if world.collective().world_size() > 1 {
        return match distributed_sinkhorn(&args.files, world.collective().as_ref()) {
            Ok(()) => Ok(()),
            Err(e) => Err(world.fail(e)),
        };
    }
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

/// Under `mpirun -np W`: each process is one rank of the `sinkhorn` cases with `world_size = W`, runs
/// its own rows with the sums all-reduced over MPI, and checks its codes; rank 0 prints the worst error.
fn distributed_sinkhorn(files: &[std::path::PathBuf], world: &dyn swav_tensor::Collective) -> anyhow::Result<()> {
    use anyhow::Context;
    // The same bound as the single-process check of these cases (float32 against float64 PyTorch).
    const TOLERANCE: f64 = 1e-5;
    let (rank, n) = (world.rank(), world.world_size());
    for file in files {
        let case = swav_model::checkpoint::NamedTensors::read(file).with_context(|| file.display().to_string())?;
        let meta = |k: &str| -> anyhow::Result<String> {
            case.metadata.get(k).cloned().with_context(|| format!("{}: no `{k}` in the metadata", file.display()))
        };
        if meta("kind")? != "sinkhorn" || meta("world_size")?.parse::<usize>()? != n {
            bail!("{}: under mpirun -np {n} only `sinkhorn` cases with world_size {n} can run", file.display());
        }
        let (rows, k): (usize, usize) = (meta("rows")?.parse()?, meta("prototypes")?.parse()?);
        let params = swav_sinkhorn::Params::new(meta("epsilon")?.parse()?, meta("iterations")?.parse()?);
        let scores = case.tensor(&format!("input.scores.rank{rank}"))?;
        let want = case.tensor(&format!("expect.q.rank{rank}"))?;
        if scores.len() != rows * k || want.len() != rows * k {
            bail!("{}: rank {rank}'s tensors are not {rows} x {k}", file.display());
        }
        let mut q = vec![0f32; rows * k];
        let reducer = swav_train::distributed::CollectiveReducer(world);
        swav_sinkhorn::sinkhorn_into(scores.as_slice(), rows, k, &params, &reducer, &mut q)?;
        let mut error = [swav_sinkhorn::relative_error(&q, want.as_slice()) as f32];
        world.all_reduce_max(&mut error)?;
        // A NaN error fails too.
        let pass = (error[0] as f64) < TOLERANCE;
        if rank == 0 {
            let verdict = if pass { "PASS" } else { "FAIL" };
            println!("{} (kind sinkhorn, {n} processes over MPI)", file.display());
            println!("  expect.q of every rank: worst relative error {:.2e}  tol {TOLERANCE:.0e}  {verdict}", error[0]);
        }
        if !pass {
            bail!("{}: relative error {:.2e} over the ranks", file.display(), error[0]);
        }
    }
    Ok(())
}
