//! Hostile datasets: records and manifests whose checksums are valid but whose contents lie (huge image
//! sizes, counts, labels, channels). Opening and reading them fails with the file and record named, never
//! with a panic, an abort or an allocation sized by the lie: a counting allocator measures every read.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use std::path::{Path, PathBuf};

use common::shard_edit::*;
use common::*;
use counting_alloc::measure;
use swav_data::{Codec, DataError, Dataset};

/// Peak heap a refused read of these small datasets may use (parsing the manifest, mapping the shards).
const SMALL: usize = 1 << 20;

fn dataset(root: &Path, name: &str, codec: Codec) -> PathBuf {
    let input = root.join(format!("{name}-in"));
    for c in 0..2 {
        let d = input.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..3 {
            save_png(&d.join(format!("{i}.png")), &photo((c * 10 + i) as u64, 48, 40));
        }
    }
    let out = root.join(name);
    let mut opts = options(&input, &out);
    opts.codec = codec;
    run(&opts).unwrap();
    out
}

fn shard_path(dir: &Path) -> PathBuf {
    dir.join("shard-00000.bin")
}

/// Opens the dataset and reads image `index`, measuring the peak heap.
fn read(dir: &Path, index: usize) -> (swav_data::Result<swav_data::Image>, usize) {
    measure(|| Dataset::open(dir).and_then(|ds| ds.image(index)))
}

fn expect_corrupt_record(r: swav_data::Result<swav_data::Image>, record: usize, what: &str) -> String {
    match r {
        Err(e @ DataError::CorruptRecord { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("shard-00000.bin record {record}")), "{what}: {msg}");
            msg
        }
        other => panic!(
            "{what}: expected a corrupt record error, got {:?}",
            other.map(|i| format!("an image of {}x{}x{}", i.width, i.height, i.channels))
        ),
    }
}

#[test]
fn records_claiming_huge_images_are_refused_before_allocating() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    for codec in [Codec::RawZstd, Codec::Jpeg] {
        let dir = dataset(tmp.path(), codec.name(), codec);
        let good = Shard::read(&shard_path(&dir));
        for (h, w) in [
            (5000, 5000),
            (65535, 65535),
            (u32::MAX, u32::MAX),
            (1, u32::MAX),
            (u32::MAX, 1),
            (65536, 1),
            (100_000, 100_000),
            (40, 65536 * 4),
        ] {
            let mut s = good.clone();
            s.set_record_u32(0, REC_HEIGHT, h);
            s.set_record_u32(0, REC_WIDTH, w);
            install_shard(&dir, 0, &s);
            let (r, peak) = read(&dir, 0);
            let what = format!("{} record claiming {w}x{h}", codec.name());
            let msg = expect_corrupt_record(r, 0, &what);
            assert!(peak < SMALL, "{what}: {peak} bytes allocated ({msg})");
        }
    }
}

#[test]
fn a_zstd_payload_must_announce_the_size_the_record_claims() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::RawZstd);
    let good = Shard::read(&shard_path(&dir));
    let pixels = Dataset::open(&dir).unwrap().image(0).unwrap().pixels;

    // The same pixels in a frame that does not state its size, with a record claiming a big image:
    // nothing may be allocated from the claim alone.
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.include_contentsize(false).unwrap();
    let unsized_frame = c.compress(&pixels).unwrap();
    let mut s = good.clone();
    s.replace_payload(0, &unsized_frame);
    s.set_record_u32(0, REC_HEIGHT, 4000);
    s.set_record_u32(0, REC_WIDTH, 4000);
    install_shard(&dir, 0, &s);
    let (r, peak) = read(&dir, 0);
    let msg = expect_corrupt_record(r, 0, "frame without a size");
    assert!(peak < SMALL, "{peak} bytes allocated ({msg})");

    // A frame announcing a size other than the record's.
    let mut s = good.clone();
    s.set_record_u32(0, REC_HEIGHT, 41);
    install_shard(&dir, 0, &s);
    let msg = expect_corrupt_record(read(&dir, 0).0, 0, "frame of another size");
    assert!(msg.contains("5760") && msg.contains("5904"), "{msg}");

    // Two frames, or bytes after the frame.
    let mut two = good.payload(0).to_vec();
    two.extend_from_slice(good.payload(0));
    let mut s = good.clone();
    s.replace_payload(0, &two);
    install_shard(&dir, 0, &s);
    expect_corrupt_record(read(&dir, 0).0, 0, "two frames");

    // An honest but huge image (all black, 20000x20000x3 = 1.2 GB in a few kilobytes) is refused by the
    // manifest's pixel limit, not allocated.
    let huge = {
        // 1.2 GB of zeros compressed without holding them: a streaming encoder fed by a reader.
        let zeros = std::io::Read::take(std::io::repeat(0), 1_200_000_000);
        let mut e = zstd::stream::read::Encoder::new(zeros, 1).unwrap();
        e.include_contentsize(true).unwrap();
        e.set_pledged_src_size(Some(1_200_000_000)).unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut out).unwrap();
        out
    };
    let mut s = good.clone();
    s.replace_payload(0, &huge);
    s.set_record_u32(0, REC_HEIGHT, 20000);
    s.set_record_u32(0, REC_WIDTH, 20000);
    install_shard(&dir, 0, &s);
    let (r, peak) = read(&dir, 0);
    let msg = expect_corrupt_record(r, 0, "honest huge image");
    assert!(msg.contains("pixel"), "{msg}");
    assert!(peak < SMALL, "{peak} bytes allocated ({msg})");
}

/// Position of the height field of the first SOF marker of a JPEG.
fn sof_height_at(jpeg: &[u8]) -> usize {
    (0..jpeg.len() - 1).find(|&i| jpeg[i] == 0xff && matches!(jpeg[i + 1], 0xc0..=0xc2)).expect("a SOF marker") + 5
}

#[test]
fn a_jpeg_header_lying_about_its_size_is_refused_before_allocating() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::Jpeg);
    let good = Shard::read(&shard_path(&dir));
    for (h, w) in [(4000u16, 4000u16), (65535, 65535), (30000, 60000)] {
        let mut jpeg = good.payload(0).to_vec();
        let at = sof_height_at(&jpeg);
        jpeg[at..at + 2].copy_from_slice(&h.to_be_bytes());
        jpeg[at + 2..at + 4].copy_from_slice(&w.to_be_bytes());
        let mut s = good.clone();
        s.replace_payload(0, &jpeg);
        s.set_record_u32(0, REC_HEIGHT, h as u32);
        s.set_record_u32(0, REC_WIDTH, w as u32);
        install_shard(&dir, 0, &s);
        let (r, peak) = read(&dir, 0);
        let msg = expect_corrupt_record(r, 0, &format!("JPEG claiming {w}x{h}"));
        assert!(peak < SMALL, "{w}x{h}: {peak} bytes allocated ({msg})");
    }
    // The JPEG's size disagreeing with the record's.
    let mut s = good.clone();
    s.set_record_u32(0, REC_WIDTH, 47);
    install_shard(&dir, 0, &s);
    let msg = expect_corrupt_record(read(&dir, 0).0, 0, "JPEG of another size");
    assert!(msg.contains("48x40") && msg.contains("47x40"), "{msg}");
}

fn not_a_dataset(dir: &Path) -> String {
    let (r, peak) = measure(|| Dataset::open(dir));
    assert!(peak < SMALL, "{peak} bytes allocated");
    match r {
        Err(e @ (DataError::NotADataset { .. } | DataError::CorruptShard { .. })) => e.to_string(),
        other => panic!("expected the dataset to be refused, got {other:?}"),
    }
}

#[test]
fn manifest_counts_and_sizes_are_checked_against_the_files_before_allocating() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::RawZstd);
    let original = std::fs::read(dir.join("manifest.json")).unwrap();
    let restore = || std::fs::write(dir.join("manifest.json"), &original).unwrap();

    for n in [1u64 << 60, u64::MAX, 7] {
        edit_manifest(&dir, |m| m["num_images"] = n.into());
        let msg = not_a_dataset(&dir);
        assert!(msg.contains(&n.to_string()), "{msg}");
        restore();
        edit_manifest(&dir, |m| {
            m["num_images"] = n.into();
            m["shards"][0]["records"] = n.into();
        });
        let msg = not_a_dataset(&dir);
        assert!(msg.contains(&n.to_string()) && msg.contains("shard-00000.bin"), "{msg}");
        restore();
    }
    edit_manifest(&dir, |m| m["shards"][0]["bytes"] = (1u64 << 60).into());
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("shard-00000.bin"), "{msg}");
    restore();

    // The same shard listed twice (the images would be counted twice).
    edit_manifest(&dir, |m| {
        let s = m["shards"][0].clone();
        m["shards"].as_array_mut().unwrap().push(s);
        m["num_images"] = 12.into();
    });
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("shard-00000.bin") && msg.contains("twice"), "{msg}");
    restore();

    // Many shard entries: refused by the listed names, without opening the file again and again.
    edit_manifest(&dir, |m| {
        let s = m["shards"][0].clone();
        m["shards"] = serde_json::Value::Array(vec![s; 100_000]);
        m["num_images"] = 600_000.into();
    });
    let (r, _) = measure(|| Dataset::open(&dir));
    assert!(r.is_err());
    restore();
    Dataset::open(&dir).unwrap();
}

#[test]
fn manifest_messages_say_what_is_wrong() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::RawZstd);
    let path = dir.join("manifest.json");
    let original = std::fs::read(&path).unwrap();

    std::fs::write(&path, "this is not { JSON").unwrap();
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("not valid JSON") && msg.contains("line 1"), "{msg}");
    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("not valid JSON"), "{msg}");
    std::fs::write(&path, "[1, 2, 3]").unwrap();
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("not a JSON object"), "{msg}");
    std::fs::write(&path, "").unwrap();
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("empty"), "{msg}");

    for channels in [0, 2, 4, 255] {
        std::fs::write(&path, &original).unwrap();
        edit_manifest(&dir, |m| m["channels"] = channels.into());
        let msg = not_a_dataset(&dir);
        assert!(msg.contains(&format!("channels {channels}")) && msg.contains("1 or 3"), "{msg}");
    }
    std::fs::write(&path, &original).unwrap();
    edit_manifest(&dir, |m| m["pixel_mean"] = serde_json::json!([0.5]));
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("pixel_mean") && msg.contains("3"), "{msg}");
    std::fs::write(&path, &original).unwrap();
    edit_manifest(&dir, |m| m["class_counts"] = serde_json::json!([3, 3, 0]));
    let msg = not_a_dataset(&dir);
    assert!(msg.contains("class_counts"), "{msg}");
    for max_pixels in [0u64, u64::MAX] {
        std::fs::write(&path, &original).unwrap();
        edit_manifest(&dir, |m| m["parameters"]["max_pixels"] = max_pixels.into());
        let msg = not_a_dataset(&dir);
        assert!(msg.contains("max_pixels"), "{msg}");
    }
    std::fs::write(&path, &original).unwrap();
    Dataset::open(&dir).unwrap();
}

#[test]
fn labels_past_the_class_list_are_refused_naming_the_record() {
    let _one_at_a_time = counting_alloc::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::RawZstd);
    let good = Shard::read(&shard_path(&dir));
    for label in [2u32, 7, u32::MAX - 1, u32::MAX] {
        let mut s = good.clone();
        let (off, len, _) = s.entry(4);
        s.set_entry(4, off as u64, len as u32, label);
        s.set_record_u32(4, REC_LABEL, label);
        install_shard(&dir, 0, &s);
        let msg = match measure(|| Dataset::open(&dir)).0 {
            Err(e @ DataError::CorruptRecord { .. }) => e.to_string(),
            other => panic!("label {label}: expected a corrupt record error, got {other:?}"),
        };
        assert!(msg.contains("shard-00000.bin record 4") && msg.contains("label"), "{msg}");
    }
}

#[cfg(unix)]
#[test]
fn special_files_in_a_dataset_do_not_hang_the_reader() {
    let _one_at_a_time = counting_alloc::exclusive();
    use std::ffi::CString;
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), "ds", Codec::RawZstd);
    let mkfifo = |p: &Path| {
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let opened = |dir: PathBuf| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Dataset::open(&dir).map(|_| ()).map_err(|e| e.to_string()));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20)).expect("opening a dataset with a FIFO hung")
    };
    let shard = shard_path(&dir);
    let good = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let msg = opened(dir.clone()).unwrap_err();
    assert!(msg.contains("shard-00000.bin") && msg.contains("regular file"), "{msg}");
    std::fs::remove_file(&shard).unwrap();
    std::fs::write(&shard, good).unwrap();
    let manifest = dir.join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    let msg = opened(dir.clone()).unwrap_err();
    assert!(msg.contains("manifest.json") && msg.contains("regular file"), "{msg}");
}

#[test]
fn the_most_compressible_honest_images_pass_the_payload_checks() {
    let _one_at_a_time = counting_alloc::exclusive();
    // Uniform images compress best: the payload checks (zstd's maximum ratio, the JPEG bytes-per-pixel
    // floor) must still accept them, whether preprocess encoded them or kept an input JPEG unchanged.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let white = image::RgbImage::from_pixel(2000, 1500, image::Rgb([255, 255, 255]));
    save_png(&input.join("a.png"), &white);
    save_jpeg(&input.join("b.jpg"), &image::RgbImage::from_pixel(1999, 1501, image::Rgb([0, 0, 0])), 50);
    image::GrayImage::from_pixel(3000, 1000, image::Luma([7])).save(input.join("c.png")).unwrap();
    for codec in [Codec::RawZstd, Codec::Jpeg] {
        let out = tmp.path().join(codec.name());
        let mut opts = options(&input, &out);
        opts.codec = codec;
        let report = run(&opts).unwrap();
        assert_eq!(report.written, 3, "{:?}", report.skipped);
        let ds = Dataset::open(&out).unwrap();
        for (i, (w, h, c)) in [(2000, 1500, 3), (1999, 1501, 3), (3000, 1000, 1)].into_iter().enumerate() {
            let img = ds.image(i).unwrap_or_else(|e| panic!("{}: image {i}: {e}", codec.name()));
            assert_eq!((img.width, img.height, img.channels), (w, h, c));
        }
        ds.verify().unwrap();
    }
}
