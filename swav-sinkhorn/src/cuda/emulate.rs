//! Runs `kernels.cu` and `naive.cu` without a GPU on the kernel emulator (`swav-cuda-emu`: host C++ with
//! an emulation of the CUDA built-ins), executing the very plans that drive the GPU (`plan.rs`),
//! all-reduces included, and compares with the CPU implementation. This checks the kernels' syntax,
//! indexing, synchronisation and argument order, leaving only NVRTC specifics and speed to the GPU
//! machine. Skipped (loudly) when no C++ compiler is installed.

use super::plan::{self, Arg, Buf, Plan, Step};
use super::{KERNELS_CU, NAIVE_CU};
use crate::{Params, Problem};
use std::collections::HashMap;
use std::sync::OnceLock;
use swav_cuda_emu::{Arg as EmuArg, Buffer, Elem, Emulator, Launch, Schedule, Source};

/// The emulation of both kernel files (compiled together, as NVRTC gets them), built once per test
/// binary and cached across runs by swav-cuda-emu; None (printing SKIPPED) without a C++ compiler.
fn emulator() -> Option<&'static Emulator> {
    static SOURCE: OnceLock<String> = OnceLock::new();
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    EMU.get_or_init(|| {
        let code = SOURCE.get_or_init(|| format!("{KERNELS_CU}\n{NAIVE_CU}"));
        Emulator::new_or_skip(&[Source { name: "swav_sinkhorn.cu", code }])
    })
    .as_ref()
}

/// Every buffer of a plan, in a fixed order (the emulator's buffer indices).
fn buffers() -> Vec<Buf> {
    [Buf::Scores, Buf::Q].into_iter().chain(Buf::SCRATCH).collect()
}

/// Runs `plan` with one score matrix per rank, all-reduces included, under one schedule.
fn run_schedule(plan: &Plan, scores: &[Vec<f32>], schedule: Schedule) -> Option<Vec<Vec<Buffer>>> {
    let emu = emulator()?;
    let order = buffers();
    let index = |b: Buf| order.iter().position(|&x| x == b).unwrap();
    // Everything but the scores starts as NaN: a value read before it is written shows up.
    let mut ranks: Vec<Vec<Buffer>> = scores
        .iter()
        .map(|s| {
            order
                .iter()
                .map(|&b| match b {
                    Buf::Scores => Buffer::from_f32(s),
                    _ => Buffer::poisoned(Elem::F32, plan.len(b)),
                })
                .collect()
        })
        .collect();
    for step in &plan.steps {
        match step {
            Step::Launch { kernel, grid, block, args } => {
                let args = args
                    .iter()
                    .map(|a| match *a {
                        Arg::Buf(b) => EmuArg::Buf(index(b)),
                        Arg::I32(v) => EmuArg::I32(v),
                        Arg::F32(v) => EmuArg::F32(v),
                    })
                    .collect();
                let launch = Launch::new(kernel.name(), [*grid, 1, 1], [*block, 1, 1], args);
                for bufs in ranks.iter_mut() {
                    emu.launch(&launch, bufs, schedule).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            Step::AllReduceMax(b) | Step::AllReduceSum(b) => {
                let max = matches!(step, Step::AllReduceMax(_));
                let i = index(*b);
                let mut acc = ranks[0][i].as_f32().to_vec();
                for r in &ranks[1..] {
                    for (a, &v) in acc.iter_mut().zip(r[i].as_f32()) {
                        *a = if max { a.max(v) } else { *a + v };
                    }
                }
                for r in ranks.iter_mut() {
                    r[i].as_f32_mut().copy_from_slice(&acc);
                }
            }
        }
    }
    Some(ranks)
}

/// Runs `plan` on the emulator with one score matrix per rank; returns every buffer of every rank. The
/// plan runs twice, threads and blocks in ascending then descending order, and must give the same bits.
fn run_plan(plan: &Plan, scores: &[Vec<f32>]) -> Option<Vec<HashMap<String, Vec<f32>>>> {
    let forward = run_schedule(plan, scores, Schedule::Forward)?;
    let reverse = run_schedule(plan, scores, Schedule::Reverse)?;
    let q = buffers().iter().position(|&b| b == Buf::Q).unwrap();
    for (r, (f, b)) in forward.iter().zip(&reverse).enumerate() {
        assert!(f[q].bytes() == b[q].bytes(), "rank {r}: Q differs between schedules");
    }
    Some(
        forward
            .into_iter()
            .map(|bufs| {
                buffers().iter().zip(bufs).map(|(b, data)| (format!("{b:?}"), data.as_f32().to_vec())).collect()
            })
            .collect(),
    )
}

fn random_scores(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn assert_rows_sum_to_one(q: &[f32], k: usize) {
    for row in q.chunks(k) {
        let s: f64 = row.iter().map(|&x| x as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
    }
}

#[test]
fn emulated_kernels_match_the_cpu() {
    // (rows, prototypes, epsilon, iterations, scale of scores, multiprocessors)
    let cases = [
        (37, 11, 0.05, 3, 0.7, 4),  // odd sizes, one warp
        (48, 300, 0.05, 3, 1.0, 4), // several warps, tiles of 6 rows
        (20, 100, 0.01, 5, 1.0, 3), // sharp: exp(2/0.01) overflows the official code
        (9, 5000, 0.05, 2, 1.0, 2), // the 32-columns-per-thread kernel
        (3, 1, 0.05, 1, 1.0, 1),    // one prototype, one iteration
        (1, 64, 0.03, 3, 1.0, 1),   // one row
    ];
    for (rows, k, eps, iters, scale, sms) in cases {
        let params = Params::new(eps, iters);
        let scores = random_scores(rows * k, (rows * 1000 + k) as u64, scale);
        let p = Problem::new(rows, k, &params, 1).unwrap();
        let Some(out) = run_plan(&plan::plan(&p, sms).unwrap(), std::slice::from_ref(&scores)) else {
            return;
        };
        let gpu = &out[0]["Q"];
        let cpu = crate::sinkhorn(&scores, rows, k, &params).unwrap();
        let err = crate::relative_error(gpu, &cpu);
        assert!(err < 1e-5, "{rows}x{k} eps {eps}: emulated CUDA vs CPU relative error {err}");
        assert_rows_sum_to_one(gpu, k);
        assert_eq!(out[0]["ColMax"][k], 0.0, "no non-finite flag");
    }
}

#[test]
fn emulated_distributed_run_matches_local_group() {
    let (rows, k, world) = (13, 40, 3);
    let params = Params::new(0.05, 3);
    let scores: Vec<Vec<f32>> = (0..world).map(|r| random_scores(rows * k, 77 + r as u64, 1.0)).collect();
    let p = Problem::new(rows, k, &params, world).unwrap();
    let Some(out) = run_plan(&plan::plan(&p, 2).unwrap(), &scores) else {
        return;
    };
    let refs: Vec<&[f32]> = scores.iter().map(|s| s.as_slice()).collect();
    let cpu = crate::sinkhorn_ranks(&refs, rows, k, &params).unwrap();
    for r in 0..world {
        let err = crate::relative_error(&out[r]["Q"], &cpu[r]);
        assert!(err < 1e-5, "rank {r}: relative error {err}");
    }
}

#[test]
fn emulated_kernels_flag_non_finite_scores_and_stay_finite() {
    let (rows, k) = (10, 50);
    let mut scores = random_scores(rows * k, 5, 1.0);
    scores[17] = f32::NAN;
    scores[230] = f32::INFINITY;
    scores[231] = f32::NEG_INFINITY;
    let p = Problem::new(rows, k, &Params::default(), 1).unwrap();
    let Some(out) = run_plan(&plan::plan(&p, 2).unwrap(), &[scores]) else {
        return;
    };
    assert_eq!(out[0]["ColMax"][k], 1.0, "non-finite flag");
    assert!(out[0]["Q"].iter().all(|x| x.is_finite()));
}

#[test]
fn emulated_naive_baseline_matches_the_official_order() {
    let (rows, k) = (24, 70);
    let params = Params::new(0.05, 3);
    let scores = random_scores(rows * k, 11, 1.0);
    let p = Problem::new(rows, k, &params, 1).unwrap();
    let Some(out) = run_plan(&plan::naive_plan(&p, 3).unwrap(), std::slice::from_ref(&scores)) else {
        return;
    };
    let official = crate::baseline::official(&scores, rows, k, 0.05, 3).unwrap();
    let err = crate::relative_error(&out[0]["Q"], &official);
    assert!(err < 1e-5, "naive kernels vs CPU official order: {err}");
}
