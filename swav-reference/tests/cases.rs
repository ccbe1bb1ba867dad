//! Every reference case of this crate's `cases/` folder (and of `$SWAV_REFERENCE_DIR`, when set) must
//! pass: the SwAV loss and the whole model's forward, gradients and statistics (and any other kind a
//! case in `$SWAV_REFERENCE_DIR` holds).

use std::path::PathBuf;

use swav_reference::verify_case;

fn case_files() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases")];
    match std::env::var_os("SWAV_REFERENCE_DIR") {
        Some(d) => dirs.push(PathBuf::from(d)),
        None => eprintln!("note: SWAV_REFERENCE_DIR is not set: only the cases shipped in cases/ run"),
    }
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display())))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

#[test]
fn all_reference_cases_pass() {
    let files = case_files();
    assert!(files.len() >= 5, "expected the cases of cases/, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let report = verify_case(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for c in &report.checks {
            let verdict = match (c.pass(), c.float32_baseline) {
                (true, Some(b)) if c.by_baseline() => {
                    format!("PASS (float32 conditioning: PyTorch float32 error {b:.2e})")
                }
                (true, _) => "PASS".to_string(),
                (false, _) => "FAIL".to_string(),
            };
            eprintln!(
                "{} {:<56} {:.2e} (tol {:.0e}) {verdict}",
                file.file_name().unwrap().to_string_lossy(),
                c.name,
                c.rel_err,
                c.tol
            );
            if !c.pass() {
                failures.push(format!("{}: {}", file.display(), c.name));
            }
        }
        assert!(!report.checks.is_empty(), "{}: nothing compared", file.display());
    }
    assert!(failures.is_empty(), "failing tensors: {failures:#?}");
}
