//! CUDA against the CPU on fresh random inputs. Runs where a GPU exists; elsewhere each test prints
//! "SKIPPED: no CUDA device (reason)" and passes (after checking that the failure is an error, not a
//! panic), unless `SWAV_REQUIRE_CUDA=1`.

mod common;

use common::{assert_valid_assignments, cosine_scores, random_scores};
use std::sync::Arc;
use swav_sinkhorn::cuda::{self, CudaSinkhorn, HostStaged};
use swav_sinkhorn::{relative_error, sinkhorn, sinkhorn_ranks, LocalGroup, Params, SingleProcess, SinkhornError};

/// The device's stream, or None (printing why) when there is no usable CUDA device. With
/// `SWAV_REQUIRE_CUDA=1` (the GPU check script) a missing device is a failure. A device whose kernels do
/// not compile or load always is.
fn device() -> Option<Arc<cuda::cudarc::driver::CudaStream>> {
    match cuda::open_stream(0) {
        Ok(stream) => {
            if let Err(e) = CudaSinkhorn::new(&stream) {
                panic!("a CUDA device is present but the Sinkhorn kernels do not load: {e}");
            }
            Some(stream)
        }
        Err(e) => {
            assert!(matches!(e, SinkhornError::Cuda(_)), "unexpected error kind: {e:?}");
            if std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SWAV_REQUIRE_CUDA=1 but there is no CUDA device: {e}");
            }
            eprintln!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn cuda_equals_cpu_on_random_inputs() {
    let Some(stream) = device() else { return };
    let mut sk = CudaSinkhorn::new(&stream).unwrap();
    // (rows, prototypes, epsilon, iterations)
    let cases = [
        (256, 3000, 0.05, 3),
        (4096, 3000, 0.05, 3),
        (37, 11, 0.05, 3),
        (1000, 4096, 0.05, 3),
        (64, 4097, 0.05, 3),
        (9, 30000, 0.05, 2),
        (5000, 3, 0.05, 3),
        (2, 5000, 0.05, 3),
        (1, 1, 0.05, 1),
        (128, 300, 0.01, 5),
    ];
    for (i, &(rows, k, eps, iters)) in cases.iter().enumerate() {
        let scores = if k <= 4096 && rows <= 1024 {
            cosine_scores(rows, k, 32, i as u64)
        } else {
            random_scores(rows * k, i as u64, 1.0)
        };
        let params = Params::new(eps, iters);
        let gpu = sk.run_host(&scores, rows, k, &params, &SingleProcess).unwrap();
        let cpu = sinkhorn(&scores, rows, k, &params).unwrap();
        let err = relative_error(&gpu, &cpu);
        println!("{rows} x {k}, eps {eps}, {iters} iterations: CUDA vs CPU relative error {err:.2e}");
        assert!(err < 1e-5, "{rows} x {k}: CUDA vs CPU relative error {err:.2e}");
        assert_valid_assignments(&gpu, k, "cuda");
    }
}

#[test]
fn cuda_reference_cases() {
    let Some(stream) = device() else { return };
    for case in common::sinkhorn_cases() {
        let world: usize = case.param("world_size");
        let (rows, k): (usize, usize) = (case.param("rows"), case.param("prototypes"));
        let params = Params::new(case.param("epsilon"), case.param("iterations"));
        let ranks = LocalGroup::new(world);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|rank| {
                    let stream = stream.clone();
                    let case = &case;
                    s.spawn(move || {
                        let r = rank.rank();
                        let stream = stream.fork().unwrap();
                        let mut sk = CudaSinkhorn::new(&stream).unwrap();
                        sk.run_host(case.tensor(&format!("input.scores.rank{r}")), rows, k, &params, &HostStaged(rank))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, q) in results.iter().enumerate() {
            let err = relative_error(q, case.tensor(&format!("expect.q.rank{r}")));
            println!("{} rank {r}: CUDA relative error {err:.2e}", case.path.display());
            assert!(err < 1e-5, "{} rank {r}: {err:.2e}", case.path.display());
        }
    }
}

#[test]
fn cuda_distributed_equals_cpu_distributed() {
    let Some(stream) = device() else { return };
    let (world, rows, k) = (3, 200, 700);
    let params = Params::new(0.03, 3);
    let per_rank: Vec<Vec<f32>> =
        (0..world).map(|r| random_scores(rows * k, 40 + r as u64, 0.3 + 0.3 * r as f32)).collect();
    let refs: Vec<&[f32]> = per_rank.iter().map(Vec::as_slice).collect();
    let cpu = sinkhorn_ranks(&refs, rows, k, &params).unwrap();
    let ranks = LocalGroup::new(world);
    let gpu: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .zip(&per_rank)
            .map(|(rank, scores)| {
                let stream = stream.clone();
                s.spawn(move || {
                    let stream = stream.fork().unwrap();
                    let mut sk = CudaSinkhorn::new(&stream).unwrap();
                    sk.run_host(scores, rows, k, &params, &HostStaged(rank)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in 0..world {
        let err = relative_error(&gpu[r], &cpu[r]);
        assert!(err < 1e-5, "rank {r}: {err:.2e}");
    }
}

#[test]
fn cuda_reports_non_finite_scores_and_bad_shapes() {
    let Some(stream) = device() else { return };
    let mut sk = CudaSinkhorn::new(&stream).unwrap();
    let mut scores = random_scores(64 * 100, 3, 1.0);
    scores[1234] = f32::NAN;
    let err = sk.run_host(&scores, 64, 100, &Params::default(), &SingleProcess).unwrap_err();
    assert_eq!(err, SinkhornError::NonFinite { this_rank: true });
    // Without the check, the output is finite anyway.
    sk.set_check_finite(false);
    let q = sk.run_host(&scores, 64, 100, &Params::default(), &SingleProcess).unwrap();
    assert!(q.iter().all(|x| x.is_finite()));
    sk.set_check_finite(true);
    let d = stream.clone_htod(&scores[..100]).unwrap();
    let mut q = stream.alloc_zeros::<f32>(100).unwrap();
    assert!(matches!(sk.run(&d, 2, 100, &Params::default(), &SingleProcess, &mut q), Err(SinkhornError::Shape { .. })));
    assert!(matches!(
        sk.run(&d, 1, 40000, &Params::default(), &SingleProcess, &mut q),
        Err(SinkhornError::Shape { .. }) | Err(SinkhornError::Unsupported(_))
    ));
}

#[test]
fn cuda_naive_baseline_matches_official_order() {
    let Some(stream) = device() else { return };
    let mut sk = CudaSinkhorn::new(&stream).unwrap();
    let (rows, k) = (256, 3000);
    let scores = random_scores(rows * k, 9, 1.0);
    let d = stream.clone_htod(&scores).unwrap();
    let mut q = stream.alloc_zeros::<f32>(rows * k).unwrap();
    sk.run_naive(&d, rows, k, &Params::default(), &mut q).unwrap();
    let gpu = stream.clone_dtoh(&q).unwrap();
    let cpu = swav_sinkhorn::baseline::official(&scores, rows, k, 0.05, 3).unwrap();
    let err = relative_error(&gpu, &cpu);
    assert!(err < 1e-5, "naive CUDA vs CPU official order: {err:.2e}");
}

#[test]
fn nccl_single_rank_runs_the_distributed_form() {
    let Some(stream) = device() else { return };
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cuda::cudarc::nccl::sys::is_culib_present() } {
        assert!(
            !std::env::var("SWAV_REQUIRE_CUDA").is_ok_and(|v| v == "1"),
            "SWAV_REQUIRE_CUDA=1 but libnccl.so is not on the library path"
        );
        eprintln!("SKIPPED: NCCL is not on the library path");
        return;
    }
    let id = cuda::cudarc::nccl::Id::new().expect("an NCCL unique id");
    let nccl = cuda::NcclReducer::from_rank(stream.clone(), 0, 1, id).expect("a one-rank NCCL communicator");
    let (rows, k) = (300, 500);
    let params = Params::new(0.05, 3);
    let scores = random_scores(rows * k, 77, 0.5);
    let cpu = sinkhorn(&scores, rows, k, &params).unwrap();
    let mut sk = CudaSinkhorn::new(&stream).unwrap();
    let gpu = sk.run_host(&scores, rows, k, &params, &nccl).unwrap();
    let err = relative_error(&gpu, &cpu);
    assert!(err < 1e-5, "NCCL one-rank Sinkhorn vs CPU: {err:.2e}");
}
