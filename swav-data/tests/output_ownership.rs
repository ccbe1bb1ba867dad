//! `preprocess` touches only what it owns: `--overwrite` replaces a dataset (its manifest and shard files)
//! but never deletes a file it did not write, two runs never write the same output at once, and the
//! leftovers of killed runs (`.NAME.tmp-PID`, `.NAME.old-PID`) are cleaned up, or restored, by the next run
//! on that output, and only those.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use swav_data::{DataError, Dataset};

const CHILD: &str = "SWAV_DATA_OWNERSHIP_CHILD";

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn small_input(root: &Path) -> PathBuf {
    photo_folder(root, 2, 2)
}

#[test]
fn overwrite_never_deletes_files_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let input = small_input(tmp.path());
    let out = tmp.path().join("out");
    run(&options(&input, &out)).unwrap();
    std::fs::write(out.join("NOTES.txt"), "my notes").unwrap();
    std::fs::create_dir(out.join("extra")).unwrap();
    std::fs::write(out.join("extra/keep.txt"), "keep").unwrap();
    std::fs::write(out.join(".hidden"), "hidden").unwrap();
    std::fs::create_dir(out.join("shard-00009.bin")).unwrap(); // an owned name, but not a file it writes
    let before = tree_bytes(&out);
    let around = names(tmp.path());

    let mut opts = options(&input, &out);
    opts.overwrite = true;
    let err = run(&opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Output { .. }), "{msg}");
    for name in ["NOTES.txt", "extra", ".hidden", "shard-00009.bin"] {
        assert!(msg.contains(name), "{name} is not listed: {msg}");
    }
    let listed = msg.split_once("does not write (").and_then(|(_, rest)| rest.split_once(')')).map(|(l, _)| l).unwrap();
    assert_eq!(listed, ".hidden, NOTES.txt, extra, shard-00009.bin", "{msg}");
    assert_eq!(tree_bytes(&out), before, "the refused run changed the output");
    assert_eq!(names(tmp.path()), around, "the refused run left something beside the output");

    // Without the foreign files it replaces the dataset, including shard files the new one does not have.
    for name in ["NOTES.txt", ".hidden"] {
        std::fs::remove_file(out.join(name)).unwrap();
    }
    std::fs::remove_dir_all(out.join("extra")).unwrap();
    std::fs::remove_dir(out.join("shard-00009.bin")).unwrap();
    std::fs::write(out.join("shard-00007.bin"), "a shard of an older, bigger dataset").unwrap();
    run(&opts).unwrap();
    assert_eq!(names(&out), ["manifest.json", "names.json", "shard-00000.bin"]);
    assert_eq!(Dataset::open(&out).unwrap().len(), 4);
}

#[test]
fn outputs_that_are_not_datasets_are_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let input = small_input(tmp.path());
    let mut opts = options(&input, &tmp.path().join("out"));
    opts.overwrite = true;

    // A folder of someone else's files.
    let other = tmp.path().join("out");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("thesis.tex"), "42").unwrap();
    let msg = run(&opts).unwrap_err().to_string();
    assert!(msg.contains("thesis.tex"), "{msg}");
    assert_eq!(names(&other), ["thesis.tex"]);
    std::fs::remove_dir_all(&other).unwrap();

    // A file.
    std::fs::write(&other, "a file").unwrap();
    assert!(run(&opts).is_err());
    assert_eq!(std::fs::read(&other).unwrap(), b"a file");
    std::fs::remove_file(&other).unwrap();

    // A symbolic link to a dataset: refused, the link and its target unchanged.
    #[cfg(unix)]
    {
        let target = tmp.path().join("real");
        run(&options(&input, &target)).unwrap();
        let before = tree_bytes(&target);
        std::os::unix::fs::symlink(&target, &other).unwrap();
        let msg = run(&opts).unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(std::fs::symlink_metadata(&other).unwrap().is_symlink());
        assert_eq!(tree_bytes(&target), before);
        std::fs::remove_file(&other).unwrap();
    }

    // An empty folder is fine.
    std::fs::create_dir(&other).unwrap();
    run(&opts).unwrap();
    assert_eq!(Dataset::open(&other).unwrap().len(), 4);
}

/// A process id that is not running: a child that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn leftovers_of_killed_runs_are_removed_at_the_next_start_and_only_those() {
    let tmp = tempfile::tempdir().unwrap();
    let input = small_input(tmp.path());
    let root = tmp.path().join("datasets");
    std::fs::create_dir(&root).unwrap();
    let out = root.join("out");
    let (dead, dead2) = (dead_pid(), dead_pid());
    let mut live = Command::new("sleep").arg("600").spawn().unwrap();

    let leftover = |name: String, files: &[&str]| {
        let d = root.join(name);
        std::fs::create_dir(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), "x").unwrap();
        }
        d
    };
    let stale = leftover(format!(".out.tmp-{dead}"), &["shard-00000.bin", "shard-00001.bin"]);
    // Without a manifest: not a dataset to restore (that case has its own test).
    let stale_old = leftover(format!(".out.old-{dead2}"), &["shard-00000.bin", "shard-00001.bin"]);
    let with_foreign = leftover(format!(".out.tmp-{dead2}"), &["shard-00000.bin", "NOTES.txt"]);
    let alive = leftover(format!(".out.tmp-{}", live.id()), &["shard-00000.bin"]);
    let keep = [
        leftover(format!(".out.tmp-{dead}x"), &["shard-00000.bin"]),
        leftover(format!(".out.tmp-x{dead}"), &["shard-00000.bin"]),
        leftover(".out.tmp-".into(), &["shard-00000.bin"]),
        leftover(format!(".other.tmp-{dead}"), &["shard-00000.bin"]),
        leftover(format!(".out.tmp-{dead}.tmp-{dead}"), &["shard-00000.bin"]),
        leftover(format!("out.tmp-{dead}"), &["shard-00000.bin"]),
    ];
    std::fs::write(root.join(format!(".out.tmp-{dead}0")), "a file, not ours").unwrap();

    run(&options(&input, &out)).unwrap();
    live.kill().unwrap();
    live.wait().unwrap();

    assert!(!stale.exists(), "the leftover of a dead run was kept");
    assert!(!stale_old.exists(), "the old dataset of a dead run was kept");
    assert_eq!(names(&with_foreign), ["NOTES.txt"], "a foreign file in a leftover was deleted");
    assert_eq!(names(&alive), ["shard-00000.bin"], "the folder of a running process was touched");
    for k in &keep {
        assert_eq!(names(k), ["shard-00000.bin"], "{} was touched", k.display());
    }
    assert!(root.join(format!(".out.tmp-{dead}0")).is_file());
    assert_eq!(Dataset::open(&out).unwrap().len(), 4);
}

#[test]
fn a_dataset_moved_aside_by_a_killed_run_is_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let input = small_input(tmp.path());
    let out = tmp.path().join("out");
    run(&options(&input, &out)).unwrap();
    let before = tree_bytes(&out);
    // A run killed between moving the old dataset aside and moving the new one in.
    let aside = tmp.path().join(format!(".out.old-{}", dead_pid()));
    std::fs::rename(&out, &aside).unwrap();
    let mut opts = options(&input, &out);
    opts.select = Some(0..2);
    let msg = run(&opts).unwrap_err().to_string();
    assert!(msg.contains("already exists"), "{msg}");
    assert!(!aside.exists());
    assert_eq!(tree_bytes(&out), before, "the old dataset was not restored");
}

/// The slow input of the child runs: noise images compressed at a high zstd level by one worker.
fn slow_input(root: &Path) -> PathBuf {
    let input = root.join("slow");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..150 {
        let img = image::RgbImage::from_raw(256, 256, noise(i, 256 * 256 * 3)).unwrap();
        save_png(&input.join(format!("{i:03}.png")), &img);
    }
    input
}

#[test]
fn two_runs_never_write_the_same_output() {
    if let Ok(dir) = std::env::var(CHILD) {
        let dir = Path::new(&dir);
        let mut opts = options(&dir.join("slow"), &dir.join("out"));
        opts.workers = 1;
        opts.zstd_level = 19;
        let _ = run(&opts);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = slow_input(tmp.path());
    let out = tmp.path().join("out");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["two_runs_never_write_the_same_output", "--exact", "--nocapture"])
        .env(CHILD, tmp.path())
        .spawn()
        .unwrap();
    let building = tmp.path().join(format!(".out.tmp-{}", child.id()));
    let start = Instant::now();
    while !building.join("shard-00000.bin").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the child never started writing");
        assert!(child.try_wait().unwrap().is_none(), "the child finished too early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second run on the same output, with or without --overwrite, stops at once naming the first.
    for overwrite in [false, true] {
        let mut opts = options(&input, &out);
        opts.overwrite = overwrite;
        opts.select = Some(0..1);
        let msg = run(&opts).unwrap_err().to_string();
        assert!(msg.contains(&format!("pid {}", child.id())), "{msg}");
        assert!(!out.exists());
        assert!(building.exists(), "the second run removed the first one's folder");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Once the first is gone, its lock is free and its leftover is cleaned up.
    let mut opts = options(&input, &out);
    opts.select = Some(0..3);
    run(&opts).unwrap();
    assert!(!building.exists());
    assert_eq!(Dataset::open(&out).unwrap().len(), 3);
    // And runs one after the other on the same output work (the lock is released).
    opts.overwrite = true;
    run(&opts).unwrap();
    run(&opts).unwrap();
}
