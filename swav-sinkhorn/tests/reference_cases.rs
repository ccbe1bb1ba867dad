//! Every `sinkhorn` reference case (PyTorch, float64) in `tests/cases/` and `$SWAV_REFERENCE_DIR`.

mod common;

use swav_sinkhorn::{baseline, relative_error, sinkhorn, sinkhorn_ranks, Params};

const TOLERANCE: f64 = 1e-5;

#[test]
fn all_reference_cases_pass() {
    let cases = common::sinkhorn_cases();
    assert!(cases.len() >= 4, "expected the 4 sinkhorn cases of tests/cases/, found {}", cases.len());
    let mut distributed = 0;
    for case in &cases {
        let eps: f32 = case.param("epsilon");
        let iterations: usize = case.param("iterations");
        let world: usize = case.param("world_size");
        let rows: usize = case.param("rows");
        let k: usize = case.param("prototypes");
        let params = Params::new(eps, iterations);
        let inputs: Vec<&[f32]> = (0..world).map(|r| case.tensor(&format!("input.scores.rank{r}"))).collect();
        let got = sinkhorn_ranks(&inputs, rows, k, &params).unwrap();
        for (r, q) in got.iter().enumerate() {
            let want = case.tensor(&format!("expect.q.rank{r}"));
            let err = relative_error(q, want);
            println!("{} rank {r}: relative error {err:.2e}", case.path.display());
            assert!(err < TOLERANCE, "{} rank {r}: relative error {err:.2e}", case.path.display());
            common::assert_valid_assignments(q, k, &case.path.display().to_string());
        }
        if world == 1 {
            // The single-process entry point, one thread and several, gives the same bits.
            let one = sinkhorn(inputs[0], rows, k, &Params { threads: 1, ..params }).unwrap();
            let many = sinkhorn(inputs[0], rows, k, &Params { threads: 3, ..params }).unwrap();
            assert_eq!(one, got[0]);
            assert_eq!(many, got[0]);
            // The benchmark's baseline is the official algorithm too.
            let naive = baseline::official(inputs[0], rows, k, eps, iterations).unwrap();
            let err = relative_error(&naive, case.tensor("expect.q.rank0"));
            assert!(err < TOLERANCE, "{} baseline: relative error {err:.2e}", case.path.display());
        } else {
            distributed += 1;
        }
    }
    assert!(distributed >= 1, "no distributed case was checked");
}

#[test]
fn world_size_three_case_equals_single_process_on_stacked_rows() {
    let case = common::Case::load(&common::reference_dir().join("sinkhorn_3.safetensors"));
    let (rows, k): (usize, usize) = (case.param("rows"), case.param("prototypes"));
    let params = Params::new(case.param("epsilon"), case.param("iterations"));
    let stacked: Vec<f32> = (0..3).flat_map(|r| case.tensor(&format!("input.scores.rank{r}")).to_vec()).collect();
    let single = sinkhorn(&stacked, 3 * rows, k, &params).unwrap();
    for r in 0..3 {
        let want = case.tensor(&format!("expect.q.rank{r}"));
        let err = relative_error(&single[r * rows * k..(r + 1) * rows * k], want);
        assert!(err < TOLERANCE, "rank {r}: {err:.2e}");
    }
}

#[test]
fn verify_case_reports_every_rank() {
    for case in common::sinkhorn_cases() {
        let errors = swav_sinkhorn::reference::verify_case(&case.meta, |name| {
            case.tensors.get(name).map(|(_, data)| data.clone())
        })
        .unwrap();
        let world: usize = case.param("world_size");
        assert_eq!(errors.len(), world);
        for (name, err) in errors {
            assert!(err < TOLERANCE, "{} {name}: {err:.2e}", case.path.display());
        }
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("kind".to_string(), "sinkhorn".to_string());
    let err = swav_sinkhorn::reference::verify_case(&meta, |_| None).unwrap_err();
    assert!(err.to_string().contains("epsilon"), "{err}");
}
