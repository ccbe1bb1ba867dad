//! `cargo xtask preprocess` as a careless or hostile user meets it: bad option values are refused naming
//! the option (no panic), `--overwrite` never deletes files it did not write, and the leftovers of a
//! killed run are removed with a message on the console.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A small unlabelled folder of PNG images.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3u32 {
        let img = image::RgbImage::from_fn(12 + i, 10, |x, y| image::Rgb([(x * 20) as u8, (y * 20) as u8, i as u8]));
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
}

#[test]
fn bad_values_are_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    images(&input);
    let out = tmp.path().join("out");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    for (flag, value) in [
        ("--resize", "0"),
        ("--shard-size", "17592186044416"),
        ("--shard-size", "0"),
        ("--workers", "0"),
        ("--max-pixels", "0"),
        ("--max-pixels", "18446744073709551615"),
    ] {
        let (ok, log) = run(&["preprocess", "--input", i, "--output", o, flag, value]);
        assert!(!ok, "{flag} {value} was accepted: {log}");
        assert!(log.contains(&format!("{flag} {value}")), "{flag} {value}: {log}");
        assert!(!log.contains("panicked"), "{flag} {value}: {log}");
        assert!(!out.exists());
    }
}

#[test]
fn overwrite_keeps_foreign_files_and_leftovers_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    images(&input);
    let out = tmp.path().join("out");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    let (ok, log) = run(&["preprocess", "--input", i, "--output", o]);
    assert!(ok, "{log}");

    std::fs::write(out.join("NOTES.txt"), "mine").unwrap();
    let (ok, log) = run(&["preprocess", "--input", i, "--output", o, "--overwrite"]);
    assert!(!ok && log.contains("NOTES.txt"), "{log}");
    assert_eq!(std::fs::read_to_string(out.join("NOTES.txt")).unwrap(), "mine");
    std::fs::remove_file(out.join("NOTES.txt")).unwrap();

    // The build folder of a killed run (a pid that has exited).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leftover = tmp.path().join(format!(".out.tmp-{dead}"));
    std::fs::create_dir(&leftover).unwrap();
    std::fs::write(leftover.join("shard-00000.bin"), "partial").unwrap();
    let (ok, log) = run(&["preprocess", "--input", i, "--output", o, "--overwrite"]);
    assert!(ok, "{log}");
    assert!(!leftover.exists());
    assert!(log.contains("removed") && log.contains(&format!(".out.tmp-{dead}")), "{log}");
}
