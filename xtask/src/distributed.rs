//! How `cargo xtask train` finds its ranks: processes started by `mpirun` or `srun` (feature `mpi`), or
//! one process; and `--nproc-per-node N`, which starts N ranks on this machine through `mpirun`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use swav_tensor::collective::SingleProcess;
use swav_tensor::Collective;

/// Ranks the launcher announced in the environment (Open MPI, PMI, SLURM), when this process was
/// started by one.
fn announced_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The ranks of this run.
pub struct World {
    collective: Arc<dyn Collective>,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<swav_tensor::collective::mpi::MpiCollective>>,
}

/// The world this process belongs to: MPI's when a launcher started several ranks, else one process.
pub fn world(timeout: Duration) -> anyhow::Result<World> {
    let announced = announced_world_size().unwrap_or(1);
    #[cfg(feature = "mpi")]
    if announced > 1 {
        let mpi = swav_tensor::collective::mpi::MpiCollective::init(timeout).context("starting MPI")?;
        tracing::info!("rank {} of {}", mpi.rank(), mpi.world_size());
        return Ok(World { collective: mpi.clone(), mpi: Some(mpi) });
    }
    #[cfg(not(feature = "mpi"))]
    if announced > 1 {
        let _ = timeout;
        bail!(
            "started by an MPI launcher with {announced} ranks, but this xtask was built without MPI: build it with \
             `cargo build --release -p xtask --features mpi` (needs libopenmpi-dev) and launch that binary"
        );
    }
    Ok(World {
        collective: Arc::new(SingleProcess),
        #[cfg(feature = "mpi")]
        mpi: None,
    })
}

impl World {
    /// The host collective (MPI's ranks, or one process).
    pub fn collective(&self) -> Arc<dyn Collective> {
        self.collective.clone()
    }

    /// The collective for a run on `runtime`'s device: on GPUs with several ranks, NCCL reduces the
    /// gradients in device memory (`SWAV_NCCL=0` stages them through the host collective instead);
    /// otherwise the host collective.
    pub fn collective_on(
        &self,
        runtime: Option<&Arc<swav_tensor::cuda::runtime::DeviceRuntime>>,
    ) -> anyhow::Result<Arc<dyn Collective>> {
        #[cfg(feature = "cuda")]
        if let Some(rt) = runtime {
            let real = rt.backend().as_any().is::<swav_tensor::cuda::driver::DriverBackend>();
            if real && self.collective.world_size() > 1 && std::env::var("SWAV_NCCL").as_deref() != Ok("0") {
                let nccl = swav_tensor::collective::nccl::NcclCollective::new(self.collective.clone(), rt.clone())
                    .context("starting NCCL (SWAV_NCCL=0 stages the gradients through host memory instead)")?;
                tracing::info!("gradients through NCCL on cuda:{}", rt.ordinal());
                return Ok(Arc::new(nccl));
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = runtime;
        Ok(self.collective.clone())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// The device `--device` names for this rank: a bare `cuda` on several ranks is the GPU of this
    /// rank's local rank (one GPU per rank on each node, as `torch.distributed` launches do; the global
    /// rank when the launcher gives no local rank); anything else as given.
    pub fn device_spec(&self, spec: &str) -> String {
        #[cfg(feature = "mpi")]
        if spec == "cuda" && self.collective.world_size() > 1 {
            let local = swav_tensor::collective::mpi::local_rank().unwrap_or_else(|| self.rank());
            return format!("cuda:{local}");
        }
        spec.to_string()
    }

    /// What a rank that times out prints: which ranks fell behind, from the run's heartbeat files.
    pub fn on_timeout(&self, run_dir: &Path) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            let (rank, n, dir) = (mpi.rank(), mpi.world_size(), run_dir.to_path_buf());
            mpi.on_timeout(Arc::new(move || match swav_train::distributed::Heartbeat::new(&dir, rank, n) {
                Ok(h) => h.describe_others(),
                Err(e) => format!("(no heartbeats: {e})"),
            }));
        }
        #[cfg(not(feature = "mpi"))]
        let _ = run_dir;
    }

    /// Ends the job on every rank after this rank's error (the others may be waiting for it).
    pub fn fail(&self, error: anyhow::Error) -> anyhow::Error {
        if self.collective.world_size() > 1 {
            self.collective.abort(&format!("{error:#}"));
        }
        error
    }
}

/// `--nproc-per-node N`: runs this command again as N ranks under `mpirun` and returns its status.
pub fn launch_local(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--nproc-per-node 0: give at least 1 rank");
    }
    if !cfg!(feature = "mpi") {
        bail!("--nproc-per-node needs MPI: build xtask with `--features mpi` (needs libopenmpi-dev and openmpi-bin)");
    }
    if announced_world_size().is_some() {
        bail!("--nproc-per-node inside an MPI job: the launcher already started the ranks; drop --nproc-per-node");
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let mut args: Vec<String> = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--nproc-per-node" {
            skip = true;
        } else if !a.starts_with("--nproc-per-node=") {
            args.push(a);
        }
    }
    let cores = swav_core::sys::cores();
    let mut cmd = std::process::Command::new("mpirun");
    // Each rank runs its own compute threads: no binding to one core; more ranks than cores is allowed.
    cmd.args(["-np", &n.to_string(), "--bind-to", "none"]);
    if n > cores {
        cmd.arg("--oversubscribe");
    }
    cmd.arg(&exe).args(&args);
    tracing::info!("starting {n} ranks: mpirun -np {n} {} {}", exe.display(), args.join(" "));
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--nproc-per-node needs `mpirun` on the PATH (Debian: apt-get install openmpi-bin)")
        }
        Err(e) => return Err(e).context("starting mpirun"),
    };
    if !status.success() {
        bail!("the ranks stopped with {status} (see the messages above; run the same command to resume)");
    }
    Ok(())
}
