//! A preprocessing run killed half-way leaves no output that looks complete, and the next run works.
//! The test runs itself again as a child process (selected by an environment variable) and kills it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CHILD: &str = "SWAV_DATA_INTERRUPTED_CHILD";

#[test]
fn killed_run_leaves_no_complete_looking_output() {
    if let Ok(dir) = std::env::var(CHILD) {
        // Child: a long run (it is killed before it ends).
        let dir = Path::new(&dir);
        let mut opts = options(&dir.join("in"), &dir.join("out"));
        opts.workers = 1;
        opts.zstd_level = 19;
        let _ = run(&opts);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..150 {
        let img = image::RgbImage::from_raw(256, 256, noise(i, 256 * 256 * 3)).unwrap();
        save_png(&input.join(format!("{i:03}.png")), &img);
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["killed_run_leaves_no_complete_looking_output", "--exact", "--nocapture"])
        .env(CHILD, tmp.path())
        .spawn()
        .unwrap();
    // Wait until the child has written part of a shard into its temporary directory.
    let start = Instant::now();
    let building = loop {
        let found = std::fs::read_dir(tmp.path()).unwrap().filter_map(|e| e.ok()).find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".out.tmp-")
                && std::fs::metadata(e.path().join("shard-00000.bin")).is_ok_and(|m| m.len() > 0)
        });
        if let Some(e) = found {
            break e.path();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the child never started writing");
        assert!(child.try_wait().unwrap().is_none(), "the child finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();

    let out = tmp.path().join("out");
    assert!(!out.exists(), "a killed run left {}", out.display());
    assert!(!building.join("manifest.json").exists());
    assert!(swav_data::Dataset::open(&building).is_err());

    // A new run is not disturbed by the leftover and produces a complete dataset.
    let mut opts = options(&input, &out);
    opts.workers = 2;
    let report = run(&opts).unwrap();
    assert_eq!(report.written, 150);
    assert_eq!(swav_data::Dataset::open(&out).unwrap().len(), 150);
}
