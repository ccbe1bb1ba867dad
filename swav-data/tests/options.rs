//! Every preprocessing option is checked before anything is written: a bad value is refused with a
//! message naming the option, never a panic, an overflow or an output that silently differs.

mod common;

use std::path::Path;

use common::*;
use swav_data::{DataError, PreprocessOptions};

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn every_bad_option_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let input = photo_folder(tmp.path(), 1, 2);
    let out = tmp.path().join("out");
    type Edit = fn(&mut PreprocessOptions);
    let cases: [(&str, Edit); 10] = [
        ("--resize", |o| o.resize = Some(0)),
        ("--shard-size", |o| o.shard_size_mib = 0),
        ("--shard-size", |o| o.shard_size_mib = 1 << 44),
        ("--shard-size", |o| o.shard_size_mib = u64::MAX),
        ("--max-pixels", |o| o.max_pixels = 0),
        ("--max-pixels", |o| o.max_pixels = u64::MAX),
        ("zstd level", |o| o.zstd_level = 99),
        ("JPEG quality", |o| o.jpeg_quality = 0),
        ("--workers", |o| o.workers = 0),
        ("--workers", |o| o.workers = 1 << 40),
    ];
    let before = names(tmp.path());
    for (option, edit) in cases {
        let mut opts = options(&input, &out);
        edit(&mut opts);
        let result = std::panic::catch_unwind(|| run(&opts));
        let msg = match result {
            Ok(Err(e @ DataError::Config(_))) => e.to_string(),
            Ok(other) => panic!("{option} ({opts:?}): expected a configuration error, got {other:?}"),
            Err(_) => panic!("{option} ({opts:?}) panicked"),
        };
        assert!(msg.contains(option), "{option}: {msg}");
        assert_eq!(names(tmp.path()), before, "{option}: something was written");
    }
}

#[test]
fn an_idx_file_without_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    let images = write_idx(&idx, "empty", &[], 28, 28, &[], false);
    let out = tmp.path().join("out");
    for input in [images.clone(), idx.clone()] {
        let msg = run(&options(&input, &out)).unwrap_err().to_string();
        assert!(msg.contains("empty IDX images file") && msg.contains("empty-images-idx3-ubyte"), "{msg}");
        assert!(!out.exists());
    }
    let mut opts = options(&images, &out);
    opts.select = Some(0..1);
    assert!(run(&opts).is_err());
    assert!(swav_data::preprocess::idx_image_count(&images).is_err());
}
