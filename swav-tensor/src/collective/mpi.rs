//! [`Collective`] over MPI (rsmpi on Open MPI): the ranks are the processes `mpirun` or `srun` started.
//!
//! Every operation is a non-blocking MPI collective polled until it completes or the timeout passes.
//! A timeout leaves the ranks out of step, and MPI cannot cancel a collective: the rank prints the
//! error (with the description the run installed with [`MpiCollective::on_timeout`], which names the
//! ranks that fell behind) and aborts the job, so that every rank stops instead of waiting forever.
//! A rank that dies is seen by `mpirun`/`srun`, which terminate the others and name it.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED` and every MPI call of the process is made under one
//! mutex, held for a call and released between the polls of a pending collective: two threads (the
//! training thread and the gradient all-reduce thread) can each have a collective in progress on their
//! own communicator, and both progress.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::Threading;

use super::{check_group_size, Collective, CollectiveError};

/// What a rank prints when a collective times out, besides the operation: typically which ranks are
/// behind, read from the run's heartbeat files.
pub type TimeoutReport = Arc<dyn Fn() -> String + Send + Sync>;

/// Held for every MPI call of the process (MPI_THREAD_SERIALIZED allows one at a time).
static MPI_CALLS: Mutex<()> = Mutex::new(());

fn mpi_call<R>(call: impl FnOnce() -> R) -> R {
    let _serial = MPI_CALLS.lock().unwrap_or_else(|p| p.into_inner());
    call()
}

/// A communicator of MPI processes.
pub struct MpiCollective {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    report: Mutex<Option<TimeoutReport>>,
    /// The universe (MPI_Finalize on drop) lives in the world communicator, which must outlive its
    /// subgroups.
    _universe: Option<Universe>,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED and every MPI call goes through `mpi_call`
// (the communicator is freed and the universe finalised on drop, after the threads that use them have
// been joined), so calls from several threads never overlap.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

/// Whether this process was started by an MPI launcher (`mpirun`, `srun` with PMI): its environment
/// names a world size.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"].iter().any(|v| std::env::var_os(v).is_some())
}

/// The local rank (index of this process on its node) the launcher gives, for choosing a GPU.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

impl MpiCollective {
    /// Initialises MPI (once per process) and returns the world; operations wait at most `timeout`.
    pub fn init(timeout: Duration) -> Result<Arc<MpiCollective>, CollectiveError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| CollectiveError::Transport("MPI is already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(CollectiveError::Transport(format!(
                "the MPI library offers thread level {threading:?}; swav-rs needs Serialized"
            )));
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Ok(Arc::new(MpiCollective { comm, rank, size, timeout, report: Mutex::new(None), _universe: Some(universe) }))
    }

    /// Installs what a timed-out rank prints before it aborts the job.
    pub fn on_timeout(&self, report: TimeoutReport) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// Polls `request` until it completes; on timeout prints the error and aborts the job.
    fn wait<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        &self,
        comm: &SimpleCommunicator,
        op: &'static str,
        mut request: mpi::request::Request<'a, D, S>,
    ) {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            request = match mpi_call(|| request.test()) {
                Ok(_) => return,
                Err(pending) => pending,
            };
            spins += 1;
            if spins > 1000 {
                // Past the first microseconds, give the core to the compute threads.
                std::thread::sleep(Duration::from_micros(50));
            }
            if spins.is_multiple_of(64) && start.elapsed() > self.timeout {
                let err = CollectiveError::Timeout {
                    op,
                    rank: self.rank,
                    waited_s: start.elapsed().as_secs_f64(),
                    missing: None,
                };
                let report = self.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let detail = report.map(|r| r()).unwrap_or_default();
                eprintln!("error: {err}{}{detail}; aborting the job", if detail.is_empty() { "" } else { ": " });
                comm.abort(124);
            }
        }
    }

    fn all_reduce<T>(&self, values: &mut [T], op: SystemOperation, name: &'static str) -> Result<(), CollectiveError>
    where
        T: Copy + mpi::datatype::Equivalence,
    {
        if self.size == 1 || values.is_empty() {
            return Ok(());
        }
        let comm = &self.comm;
        let send_buffer = values.to_vec();
        let send = &send_buffer[..];
        mpi::request::scope(|scope| {
            let request = mpi_call(move || comm.immediate_all_reduce_into(scope, send, values, op));
            self.wait(comm, name, request);
        });
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn alone_in_process(&self) -> bool {
        true // one MPI rank per process
    }

    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(values, SystemOperation::sum(), "all_reduce_sum")
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CollectiveError> {
        self.all_reduce(values, SystemOperation::sum(), "all_reduce_sum_f64")
    }
    fn all_reduce_max(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(values, SystemOperation::max(), "all_reduce_max")
    }
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.size {
            return Err(CollectiveError::Mismatch {
                op: "broadcast",
                detail: format!("root {root} in a world of {}", self.size),
            });
        }
        if self.size == 1 || values.is_empty() {
            return Ok(());
        }
        let comm = &self.comm;
        mpi::request::scope(|scope| {
            let request = mpi_call(move || comm.process_at_rank(root as i32).immediate_broadcast_into(scope, values));
            self.wait(comm, "broadcast", request);
        });
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        let request = mpi_call(|| self.comm.immediate_barrier());
        self.wait(&self.comm, "barrier", request);
        Ok(())
    }
    fn abort(&self, reason: &str) {
        if self.size > 1 {
            eprintln!("error: rank {} aborts the job: {reason}", self.rank);
            // Not through `mpi_call`: the run is over, and another thread may be inside a call.
            mpi::topology::SimpleCommunicator::world().abort(1);
        }
    }
    fn subgroup(&self, group_size: usize) -> Result<Arc<dyn Collective>, CollectiveError> {
        check_group_size(group_size, self.size)?;
        let sub = mpi_call(|| self.comm.split_by_color(Color::with_value((self.rank / group_size) as i32)))
            .ok_or_else(|| CollectiveError::Transport("MPI_Comm_split gave no communicator".into()))?;
        Ok(self.child(sub))
    }
    fn duplicate(&self) -> Result<Arc<dyn Collective>, CollectiveError> {
        Ok(self.child(mpi_call(|| self.comm.duplicate())))
    }
}

impl MpiCollective {
    /// A communicator made from this one (a subgroup or a duplicate), with the same timeout and report.
    fn child(&self, comm: SimpleCommunicator) -> Arc<dyn Collective> {
        let (rank, size) = mpi_call(|| (comm.rank() as usize, comm.size() as usize));
        Arc::new(MpiCollective {
            comm,
            rank,
            size,
            timeout: self.timeout,
            report: Mutex::new(self.report.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            _universe: None,
        })
    }
}
