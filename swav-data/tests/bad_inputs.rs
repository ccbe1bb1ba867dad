//! A folder of good images mixed with many kinds of bad input: exactly the good images are imported,
//! every bad one is listed with the right reason, nothing in the input changes, and failures leave no
//! output behind.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use swav_data::Dataset;

/// A PNG whose header claims `w x h` pixels, with a tiny (valid) zlib stream: a decompression bomb.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend(data);
        out.extend(&c);
        out.extend(crc32fast::hash(&c).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grayscale
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Contents of the regular files of a tree, plus the kinds of everything else (read without following
/// links and without opening FIFOs).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(base, &p, out);
                "dir".into()
            } else if m.is_file() {
                format!("{:x}", crc32fast::hash(&std::fs::read(&p).unwrap()))
            } else {
                "special".into()
            };
            out.insert(rel, format!("{v} {:?}", m.modified().ok()));
        }
    }
    walk(dir, dir, &mut out);
    out
}

#[test]
fn bad_files_are_skipped_with_their_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let a = input.join("apples");
    let b = input.join("bananas");
    std::fs::create_dir_all(a.join("deeper")).unwrap();
    std::fs::create_dir_all(&b).unwrap();

    // Good images.
    let good = [photo(1, 30, 20), photo(2, 25, 25), photo(3, 20, 33), photo(4, 17, 18)];
    save_png(&a.join("good1.png"), &good[0]);
    save_png(&a.join("deeper/good2.png"), &good[1]);
    save_png(&b.join("good3.png"), &good[2]);
    save_png(&b.join("good4.PNG.renamed"), &good[3]); // format found from the contents, not the name

    // Bad ones.
    std::fs::write(a.join("empty.jpg"), b"").unwrap();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90).encode_image(&photo(9, 64, 64)).unwrap();
    std::fs::write(a.join("truncated.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    let mut png = Vec::new();
    photo(8, 64, 64).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    std::fs::write(a.join("truncated.png"), &png[..png.len() / 2]).unwrap();
    let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    garbage.extend(noise(7, 500));
    std::fs::write(b.join("corrupt.png"), garbage).unwrap();
    std::fs::write(b.join("notes.txt"), b"not a picture\n").unwrap();
    std::fs::write(b.join("bomb.png"), png_claiming(100_000, 100_000)).unwrap();
    std::fs::write(b.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink("..", a.join("deeper/loop")).unwrap(); // directory loop
        symlink("missing.png", b.join("broken.png")).unwrap();
        symlink("self2.png", b.join("self1.png")).unwrap(); // file loop
        symlink("self1.png", b.join("self2.png")).unwrap();
        let fifo = std::ffi::CString::new(b.join("pipe.png").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    }
    let before = snapshot(&input);

    let out = tmp.path().join("ds");
    let report = run(&options(&input, &out)).unwrap();
    assert_eq!(snapshot(&input), before, "the input changed");

    // Exactly the good images, in order, labels by class folder.
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 4);
    // Order: class, then path bytes ("deeper/good2.png" < "good1.png").
    for (i, g) in [&good[1], &good[0], &good[2], &good[3]].into_iter().enumerate() {
        assert!(ds.image(i).unwrap().pixels == g.as_raw().as_slice(), "image {i} differs");
    }
    assert_eq!((0..4).map(|i| ds.label(i).unwrap()).collect::<Vec<_>>(), [0, 0, 1, 1]);

    let reasons: BTreeMap<&str, &str> = report.skipped.iter().map(|s| (s.path.as_str(), s.reason.as_str())).collect();
    let mut expected = vec![
        ("apples/empty.jpg", "empty file"),
        ("apples/truncated.jpg", "corrupt or truncated JPEG"),
        ("apples/truncated.png", "corrupt or truncated image"),
        ("bananas/corrupt.png", "corrupt"),
        ("bananas/notes.txt", "not an image"),
        ("bananas/bomb.png", "exceed the limit"),
        ("bananas/.DS_Store", "hidden"),
    ];
    if cfg!(unix) {
        expected.extend([
            ("apples/deeper/loop", "symlink loop"),
            ("bananas/broken.png", "broken symlink"),
            ("bananas/self1.png", "symlink loop"),
            ("bananas/self2.png", "symlink loop"),
            ("bananas/pipe.png", "not a regular file"),
        ]);
    }
    for (path, why) in &expected {
        let got = reasons.get(path).unwrap_or_else(|| panic!("{path} not listed as skipped: {reasons:?}"));
        assert!(got.contains(why), "{path}: expected `{why}`, got `{got}`");
    }
    assert_eq!(reasons.len(), expected.len(), "unexpected skips: {reasons:?}");
    // The manifest lists the same, sorted.
    let mut listed = ds.manifest().skipped.clone();
    assert_eq!(listed.len(), expected.len());
    listed.sort();
    assert_eq!(listed, ds.manifest().skipped);
}

#[test]
fn pixel_limit_is_configurable() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    save_png(&input.join("small.png"), &photo(1, 10, 10));
    save_png(&input.join("large.png"), &photo(2, 50, 50));
    let mut opts = options(&input, &tmp.path().join("ds"));
    opts.max_pixels = 1_000;
    let report = run(&opts).unwrap();
    assert_eq!(report.written, 1);
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].reason.contains("50x50 exceed the limit of 1000 pixels"), "{:?}", report.skipped);
}

#[test]
fn failures_are_clear_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    // Input missing.
    let err = run(&options(&tmp.path().join("nope"), &tmp.path().join("o"))).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("does not exist"), "{err}");

    // Nothing importable.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a.txt"), b"hello").unwrap();
    std::fs::write(bad.join("b.png"), b"").unwrap();
    let out = tmp.path().join("o");
    let err = run(&options(&bad, &out)).unwrap_err().to_string();
    assert!(err.contains("no image could be imported") && err.contains("a.txt"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains(".tmp-")), "{leftovers:?}");

    // Empty folder.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run(&options(&empty, &out)).unwrap_err().to_string();
    assert!(err.contains("no image found"), "{err}");

    // Output exists: refused without --overwrite, replaced with it; a foreign directory is never replaced.
    let good = tmp.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    save_png(&good.join("x.png"), &photo(1, 8, 8));
    run(&options(&good, &out)).unwrap();
    let err = run(&options(&good, &out)).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("--overwrite"), "{err}");
    save_png(&good.join("y.png"), &photo(2, 8, 8));
    let mut opts = options(&good, &out);
    opts.overwrite = true;
    run(&opts).unwrap();
    assert_eq!(Dataset::open(&out).unwrap().len(), 2);

    let foreign = tmp.path().join("my-photos");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), b"keep me").unwrap();
    let mut opts = options(&good, &foreign);
    opts.overwrite = true;
    let err = run(&opts).unwrap_err().to_string();
    assert!(err.contains("not a swav-data dataset"), "{err}");
    assert_eq!(std::fs::read(foreign.join("precious.txt")).unwrap(), b"keep me");

    // Output inside the input.
    let err = run(&options(&good, &good.join("ds"))).unwrap_err().to_string();
    assert!(err.contains("must not contain each other"), "{err}");

    // A file that is not IDX.
    let err = run(&options(&good.join("x.png"), &tmp.path().join("o3"))).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
}
