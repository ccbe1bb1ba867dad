//! Pixels in == pixels out: image folders and IDX files through `preprocess` and `Dataset`.

mod common;

use common::*;
use swav_data::{Codec, DataError, Dataset};

#[test]
fn folder_round_trip_is_lossless_with_raw_zstd() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for c in ["cats", "dogs"] {
        std::fs::create_dir_all(input.join(c).join("nested")).unwrap();
    }
    // RGB PNG, grayscale PNG (kept 1 channel), RGBA PNG (alpha dropped), BMP, nested file.
    let rgb = photo(1, 37, 23);
    save_png(&input.join("cats/a.png"), &rgb);
    let gray = image::GrayImage::from_fn(19, 31, |x, y| image::Luma([((x * 7 + y * 13) % 256) as u8]));
    gray.save(input.join("cats/b.png")).unwrap();
    let rgba = image::RgbaImage::from_fn(8, 9, |x, y| image::Rgba([x as u8 * 20, y as u8 * 20, 7, 100]));
    rgba.save(input.join("dogs/c.png")).unwrap();
    let bmp = photo(2, 16, 12);
    bmp.save_with_format(input.join("dogs/d.bmp"), image::ImageFormat::Bmp).unwrap();
    let nested = photo(3, 5, 7);
    save_png(&input.join("dogs/nested/e.png"), &nested);

    let out = tmp.path().join("ds");
    let report = run(&options(&input, &out)).unwrap();
    assert_eq!(report.written, 5);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);

    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.classes(), &["cats".to_string(), "dogs".to_string()]);
    assert_eq!(ds.channels(), 3);
    assert_eq!(ds.manifest().class_counts, vec![2, 3]);
    // Order: class, then path.
    let expect: Vec<(u32, u32, u8, Vec<u8>, u32)> = vec![
        (23, 37, 3, rgb.into_raw(), 0),
        (31, 19, 1, gray.into_raw(), 0),
        (9, 8, 3, rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect(), 1),
        (12, 16, 3, bmp.into_raw(), 1),
        (7, 5, 3, nested.into_raw(), 1),
    ];
    for (i, (h, w, c, px, label)) in expect.into_iter().enumerate() {
        let img = ds.image(i).unwrap();
        assert_eq!((img.height, img.width, img.channels), (h, w, c), "image {i}");
        assert_eq!(img.pixels, px, "image {i}");
        assert_eq!(ds.label(i), Some(label));
    }
    assert_eq!(ds.label(5), None);
    assert!(matches!(ds.image(5), Err(DataError::IndexOutOfRange { index: 5, len: 5 })));
    let v = ds.verify().unwrap();
    assert_eq!(v.images, 5);
}

#[test]
fn unlabelled_folder_and_many_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("flat");
    std::fs::create_dir_all(&input).unwrap();
    let mut originals = Vec::new();
    for i in 0..12 {
        // 200x200x3 noise = 120 KB raw, poorly compressible: 1 MiB shards hold ~8.
        let px = noise(i, 200 * 200 * 3);
        let img = image::RgbImage::from_raw(200, 200, px.clone()).unwrap();
        save_png(&input.join(format!("{i:02}.png")), &img);
        originals.push(px);
    }
    let out = tmp.path().join("ds");
    let report = run(&options(&input, &out)).unwrap();
    assert!(report.shards >= 2, "{} shards", report.shards);
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.classes().is_empty());
    assert!(!ds.manifest().labelled);
    assert_eq!(ds.manifest().shards.iter().map(|s| s.records).sum::<usize>(), 12);
    for (i, px) in originals.iter().enumerate() {
        assert_eq!(&ds.image(i).unwrap().pixels, px);
        assert_eq!(ds.label(i), None);
    }
}

#[test]
fn idx_round_trip_plain_and_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<Vec<u8>> = (0..50).map(|i| noise(i, 6 * 5)).collect();
    let labels: Vec<u8> = (0..50).map(|i| (i * 7 % 4) as u8).collect();
    for gz in [false, true] {
        let dir = tmp.path().join(format!("idx-{gz}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = write_idx(&dir, "train", &images, 6, 5, &labels, gz);
        // Both the file and its folder are accepted.
        for (k, input) in [file.clone(), dir.clone()].into_iter().enumerate() {
            let out = tmp.path().join(format!("ds-{gz}-{k}"));
            run(&options(&input, &out)).unwrap();
            let ds = Dataset::open(&out).unwrap();
            assert_eq!(ds.len(), 50);
            assert_eq!(ds.channels(), 1);
            assert_eq!(ds.classes(), &["0", "1", "2", "3"]);
            for i in 0..50 {
                let img = ds.image(i).unwrap();
                assert_eq!((img.height, img.width, img.channels), (6, 5, 1));
                assert_eq!(img.pixels, images[i]);
                assert_eq!(ds.label(i), Some(labels[i] as u32));
            }
        }
    }
}

#[test]
fn idx_defects_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<Vec<u8>> = (0..4).map(|i| noise(i, 9)).collect();
    let file = write_idx(tmp.path(), "t", &images, 3, 3, &[0, 1, 2, 3], false);
    // Truncated pixels.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
    let err = run(&options(&file, &tmp.path().join("o1"))).unwrap_err().to_string();
    assert!(err.contains("t-images-idx3-ubyte") && err.contains("truncated"), "{err}");
    // Missing labels.
    std::fs::write(&file, &bytes).unwrap();
    std::fs::remove_file(tmp.path().join("t-labels-idx1-ubyte")).unwrap();
    let err = run(&options(&file, &tmp.path().join("o2"))).unwrap_err().to_string();
    assert!(err.contains("labels"), "{err}");
    assert!(!tmp.path().join("o1").exists() && !tmp.path().join("o2").exists());
}

#[test]
fn embedded_fashion_mnist_split() {
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/fashion-mnist");
    let file = assets.join("t10k-images-idx3-ubyte.gz");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fmnist");
    let mut opts = options(&file, &out);
    opts.shard_size_mib = 2;
    let report = run(&opts).unwrap();
    assert_eq!(report.written, 10_000);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 10_000);
    assert_eq!(ds.classes().len(), 10);
    assert_eq!(ds.manifest().class_counts, vec![1000; 10]);
    // Independent decoding of the IDX file.
    let mut raw = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(std::fs::File::open(&file).unwrap()).read_to_end(&mut raw).unwrap();
    for i in [0usize, 1, 4_999, 9_999] {
        let px = &raw[16 + i * 784..16 + (i + 1) * 784];
        assert_eq!(ds.image(i).unwrap().pixels, px);
    }
    // Mean pixel of the split (a known property: about 0.286).
    let m = ds.manifest().pixel_mean[0];
    assert!((0.27..0.30).contains(&m), "{m}");
    assert_eq!(ds.manifest().parameters.codec, Codec::RawZstd);
}

#[test]
fn jpeg_codec_keeps_original_bytes_and_reencodes_resized() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    save_jpeg(&input.join("a.jpg"), &photo(5, 120, 80), 90);
    save_png(&input.join("b.png"), &photo(6, 64, 64));
    let out = tmp.path().join("ds");
    let mut opts = options(&input, &out);
    opts.codec = Codec::Jpeg;
    run(&opts).unwrap();
    let ds = Dataset::open(&out).unwrap();
    // The stored JPEG is the original file, so it decodes to what a JPEG decoder gives for the file.
    let direct = image::load_from_memory(&std::fs::read(input.join("a.jpg")).unwrap()).unwrap().into_rgb8();
    let a = ds.image(0).unwrap();
    let max_diff = a.pixels.iter().zip(direct.as_raw()).map(|(&x, &y)| (x as i32 - y as i32).abs()).max().unwrap();
    assert!(max_diff <= 1, "{max_diff}");
    let b = ds.image(1).unwrap();
    assert_eq!((b.height, b.width), (64, 64));

    // Resize: shorter side to 40, aspect kept (torchvision's size rule: int(40 * 120 / 80) = 60).
    let out2 = tmp.path().join("ds2");
    let mut opts = options(&input, &out2);
    opts.resize = Some(40);
    run(&opts).unwrap();
    let ds = Dataset::open(&out2).unwrap();
    let a = ds.image(0).unwrap();
    assert_eq!((a.height, a.width), (40, 60));
    let b = ds.image(1).unwrap();
    assert_eq!((b.height, b.width), (40, 40));
}
