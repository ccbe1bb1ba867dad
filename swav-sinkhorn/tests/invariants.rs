//! Properties that must hold on any input: agreement with an independent f64 implementation, finite
//! results with rows summing to 1 on extreme inputs, distributed == stacked, determinism, clear errors.

mod common;

use common::{assert_valid_assignments, cosine_scores, oracle, random_scores, relative_error_f64};
use swav_sinkhorn::{
    relative_error, sinkhorn, sinkhorn_into, sinkhorn_ranks, LocalGroup, Params, SingleProcess, SinkhornError,
};

#[test]
fn matches_independent_f64_implementation() {
    // (rows, prototypes, epsilon, iterations)
    for (i, &(rows, k, eps, iters)) in
        [(64, 300, 0.05, 3), (100, 7, 0.05, 3), (7, 100, 0.03, 5), (200, 50, 0.1, 1), (33, 33, 0.02, 10)]
            .iter()
            .enumerate()
    {
        let scores = cosine_scores(rows, k, 16, i as u64 + 1);
        let q = sinkhorn(&scores, rows, k, &Params::new(eps, iters)).unwrap();
        let want = oracle(&scores, rows, k, eps as f64, iters);
        let err = relative_error_f64(&q, &want);
        assert!(err < 1e-5, "{rows}x{k} eps {eps} iters {iters}: relative error {err:.2e}");
        assert_valid_assignments(&q, k, "random");
    }
}

#[test]
fn extreme_inputs_stay_finite_and_normalised() {
    let cases: Vec<(&str, usize, usize, f32, Vec<f32>)> = vec![
        (
            "eps 0.01, scores near +-1",
            64,
            300,
            0.01,
            random_scores(64 * 300, 1, 1.0).iter().map(|x| x.signum() * (0.98 + 0.02 * x.abs())).collect(),
        ),
        ("eps 0.01, cosine scores", 128, 300, 0.01, cosine_scores(128, 300, 8, 2)),
        ("1 x 1", 1, 1, 0.05, vec![0.3]),
        ("1 x K", 1, 500, 0.05, random_scores(500, 3, 1.0)),
        ("B x 1", 500, 1, 0.05, random_scores(500, 4, 1.0)),
        ("rows >> prototypes", 5000, 3, 0.05, random_scores(15000, 5, 1.0)),
        ("prototypes >> rows", 2, 5000, 0.05, random_scores(10000, 6, 1.0)),
        ("large scores (official overflows)", 50, 40, 0.05, random_scores(2000, 7, 50.0)),
        ("huge scores, tiny eps", 20, 30, 1e-6, random_scores(600, 8, 1e30)),
        ("all equal", 30, 20, 0.05, vec![0.7; 600]),
        ("one sample far below the rest", 40, 25, 0.01, {
            let mut s = random_scores(1000, 9, 0.1);
            s[..25].iter_mut().for_each(|x| *x -= 1.8);
            s
        }),
        (
            "f32 extremes",
            4,
            3,
            0.05,
            vec![
                f32::MAX,
                -f32::MAX,
                0.0,
                f32::MIN_POSITIVE,
                -f32::MAX,
                f32::MAX,
                1.0,
                -1.0,
                0.0,
                -f32::MAX,
                -f32::MAX,
                -f32::MAX,
            ],
        ),
    ];
    for (what, rows, k, eps, scores) in cases {
        for iters in [1, 3, 50] {
            let q = sinkhorn(&scores, rows, k, &Params::new(eps, iters)).unwrap();
            assert_valid_assignments(&q, k, what);
            // Where the f64 official algorithm is finite, agree with it.
            let want = oracle(&scores, rows, k, eps as f64, iters);
            if want.iter().all(|x| x.is_finite()) && iters <= 3 {
                let err = relative_error_f64(&q, &want);
                assert!(err < 1e-4, "{what}, {iters} iterations: relative error {err:.2e}");
            }
        }
    }
}

#[test]
fn uniform_scores_give_uniform_assignments() {
    let q = sinkhorn(&vec![0.25; 12 * 8], 12, 8, &Params::default()).unwrap();
    for &x in &q {
        assert!((x - 0.125).abs() < 1e-7, "{x}");
    }
}

#[test]
fn a_constant_per_prototype_does_not_change_the_result() {
    let (rows, k) = (50, 30);
    let scores = cosine_scores(rows, k, 8, 11);
    let shifted: Vec<f32> =
        scores.iter().enumerate().map(|(i, &s)| s + 0.5 * ((i % k) as f32 / k as f32 - 0.5)).collect();
    let params = Params::new(0.05, 3);
    let a = sinkhorn(&scores, rows, k, &params).unwrap();
    let b = sinkhorn(&shifted, rows, k, &params).unwrap();
    assert!(relative_error(&a, &b) < 1e-5);
}

#[test]
fn distributed_equals_single_process_on_stacked_rows() {
    for (world, rows, k, eps) in [(2, 40, 30, 0.05), (4, 16, 300, 0.03), (3, 7, 5, 0.01)] {
        // Ranks with very different score ranges: a per-rank max shift would give wrong answers here.
        let per_rank: Vec<Vec<f32>> = (0..world)
            .map(|r| random_scores(rows * k, 100 + r as u64, 1.0).iter().map(|x| x * (0.2 + 0.4 * r as f32)).collect())
            .collect();
        let refs: Vec<&[f32]> = per_rank.iter().map(Vec::as_slice).collect();
        let params = Params::new(eps, 3);
        let dist = sinkhorn_ranks(&refs, rows, k, &params).unwrap();
        let stacked: Vec<f32> = per_rank.concat();
        let single = sinkhorn(&stacked, world * rows, k, &params).unwrap();
        let want = oracle(&stacked, world * rows, k, eps as f64, 3);
        for r in 0..world {
            let part = &single[r * rows * k..(r + 1) * rows * k];
            assert!(relative_error(&dist[r], part) < 1e-5, "world {world} rank {r}");
            let err = relative_error_f64(&dist[r], &want[r * rows * k..(r + 1) * rows * k]);
            assert!(err < 1e-5, "world {world} rank {r} vs f64: {err:.2e}");
            assert_valid_assignments(&dist[r], k, "distributed");
        }
    }
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let (rows, k) = (300, 500);
    let scores = cosine_scores(rows, k, 16, 21);
    let one = sinkhorn(&scores, rows, k, &Params { threads: 1, ..Params::default() }).unwrap();
    for threads in [0, 2, 3, 7] {
        let q = sinkhorn(&scores, rows, k, &Params { threads, ..Params::default() }).unwrap();
        assert_eq!(q, one, "{threads} threads");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let s = vec![0.0f32; 12];
    let p = Params::default();
    let mut q = [0.0f32; 12];
    assert!(matches!(sinkhorn(&s, 3, 5, &p), Err(SinkhornError::Shape { buffer: "scores", expected: 15, actual: 12 })));
    assert!(matches!(
        sinkhorn_into(&s, 3, 4, &p, &SingleProcess, &mut q[..11]),
        Err(SinkhornError::Shape { buffer: "q", .. })
    ));
    assert!(matches!(sinkhorn(&[], 0, 5, &p), Err(SinkhornError::Size { .. })));
    assert!(matches!(sinkhorn(&[], 5, 0, &p), Err(SinkhornError::Size { .. })));
    assert!(matches!(sinkhorn(&s, usize::MAX, 2, &p), Err(SinkhornError::Size { .. })));
    for eps in [0.0, -0.05, f32::NAN, f32::INFINITY, 1e-45] {
        assert!(matches!(sinkhorn(&s, 3, 4, &Params::new(eps, 3)), Err(SinkhornError::Epsilon(_))), "eps {eps}");
    }
    assert!(matches!(sinkhorn(&s, 3, 4, &Params::new(0.05, 0)), Err(SinkhornError::Iterations)));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut s = vec![0.1f32; 12];
        s[7] = bad;
        assert!(matches!(sinkhorn(&s, 3, 4, &p), Err(SinkhornError::NonFinite { this_rank: true })));
    }
    // Messages say what to do.
    let msg = SinkhornError::NonFinite { this_rank: true }.to_string();
    assert!(msg.contains("NaN") && msg.contains("learning rate"), "{msg}");
    assert!(SinkhornError::Epsilon(0.0).to_string().contains("0.05"));
}

#[test]
fn non_finite_scores_on_one_rank_fail_every_rank_without_hanging() {
    let (rows, k, world) = (8, 6, 3);
    let ranks = LocalGroup::new(world);
    let results: Vec<Result<(), SinkhornError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|rank| {
                s.spawn(move || {
                    let mut scores = random_scores(rows * k, rank.rank() as u64, 1.0);
                    if rank.rank() == 1 {
                        scores[3] = f32::NAN;
                    }
                    let mut q = vec![0f32; rows * k];
                    sinkhorn_into(&scores, rows, k, &Params::default(), rank, &mut q)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, res) in results.iter().enumerate() {
        assert_eq!(*res, Err(SinkhornError::NonFinite { this_rank: r == 1 }), "rank {r}");
    }
}

#[test]
fn ranks_that_disagree_on_prototypes_get_an_error() {
    let ranks = LocalGroup::new(2);
    let results: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|rank| {
                s.spawn(move || {
                    let k = 5 + rank.rank();
                    let scores = random_scores(4 * k, 1, 1.0);
                    let mut q = vec![0f32; 4 * k];
                    matches!(
                        sinkhorn_into(&scores, 4, k, &Params::default(), rank, &mut q),
                        Err(SinkhornError::Reduce(_))
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![true, true]);
}
