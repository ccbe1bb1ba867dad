//! Damaged shards are reported with the shard and record named: never a panic, never garbage pixels.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use swav_data::{DataError, Dataset, LoaderConfig, MultiCropConfig, MultiCropLoader};

fn dataset(root: &Path) -> PathBuf {
    let input = photo_folder(root, 2, 6);
    let out = root.join("ds");
    run(&options(&input, &out)).unwrap();
    out
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

/// Offset of record `r`'s payload in a shard (read from the index, independently of the reader).
fn record_offset(shard: &[u8], r: usize) -> usize {
    let f = &shard[shard.len() - 32..];
    let index = u64::from_le_bytes(f[0..8].try_into().unwrap()) as usize;
    u64::from_le_bytes(shard[index + 16 * r..index + 16 * r + 8].try_into().unwrap()) as usize
}

#[test]
fn a_flipped_payload_byte_names_shard_and_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path());
    let shard = dir.join("shard-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    let off = record_offset(&bytes, 3);
    flip_byte(&shard, off + 28 + 5);

    let ds = Dataset::open(&dir).unwrap(); // the index is intact: opening works
    for i in [0, 1, 2, 4] {
        ds.image(i).unwrap();
    }
    match ds.image(3) {
        Err(DataError::CorruptRecord { shard, record, index, problem }) => {
            assert!(shard.ends_with("shard-00000.bin"));
            assert_eq!((record, index), (3, 3));
            assert!(problem.contains("checksum"), "{problem}");
        }
        other => panic!("expected a corrupt record error, got {other:?}"),
    }
    let msg = ds.image(3).unwrap_err().to_string();
    assert!(msg.contains("shard-00000.bin record 3") && msg.contains("preprocess"), "{msg}");
    assert!(matches!(ds.verify(), Err(DataError::CorruptShard { .. })));

    // The loader reports the batch holding the damaged image and goes on with the others.
    let cfg = LoaderConfig { batch_size: 4, workers: 2, shuffle: false, ..LoaderConfig::default() };
    let mut loader = MultiCropLoader::new(&ds, &MultiCropConfig::small(16, 8), &cfg).unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 3);
    assert!(matches!(results[0], Err(DataError::CorruptRecord { record: 3, .. })));
    assert!(results[1].is_ok() && results[2].is_ok());
}

#[test]
fn damaged_headers_index_and_sizes_are_detected_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path());
    let shard = dir.join("shard-00000.bin");
    let good = std::fs::read(&shard).unwrap();

    // Record header magic.
    let off = record_offset(&good, 2);
    flip_byte(&shard, off);
    let ds = Dataset::open(&dir).unwrap();
    let msg = ds.image(2).unwrap_err().to_string();
    assert!(msg.contains("record 2") && msg.contains("magic"), "{msg}");

    // The index.
    std::fs::write(&shard, &good).unwrap();
    let index = u64::from_le_bytes(good[good.len() - 32..good.len() - 24].try_into().unwrap()) as usize;
    flip_byte(&shard, index + 3);
    let msg = Dataset::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("shard-00000.bin") && msg.contains("index checksum"), "{msg}");

    // Truncation.
    std::fs::write(&shard, &good[..good.len() - 100]).unwrap();
    let msg = Dataset::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("shard-00000.bin") && msg.contains("bytes"), "{msg}");

    // Missing shard, missing or foreign manifest, future version.
    std::fs::remove_file(&shard).unwrap();
    assert!(matches!(Dataset::open(&dir), Err(DataError::Io { .. })));
    std::fs::write(&shard, &good).unwrap();
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.replace("\"format_version\": 1", "\"format_version\": 7"))
        .unwrap();
    assert!(matches!(Dataset::open(&dir), Err(DataError::UnsupportedVersion { found: 7, .. })));
    std::fs::write(dir.join("manifest.json"), "{}").unwrap();
    assert!(matches!(Dataset::open(&dir), Err(DataError::NotADataset { .. })));
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let msg = Dataset::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("manifest.json is missing") && msg.contains("cargo xtask preprocess"), "{msg}");
}

#[test]
fn every_single_byte_flip_is_caught() {
    // Flip each byte of a small shard in turn: opening or reading must fail, or (for the reserved
    // bytes nobody reads) give the exact original pixels. Never a panic, never different pixels.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    save_png(&input.join("a.png"), &photo(1, 6, 5));
    save_png(&input.join("b.png"), &photo(2, 4, 7));
    let dir = tmp.path().join("ds");
    run(&options(&input, &dir)).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    let originals: Vec<_> = (0..2).map(|i| ds.image(i).unwrap()).collect();
    drop(ds);
    let shard = dir.join("shard-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    let mut caught = 0;
    for at in 0..good.len() {
        let mut b = good.clone();
        b[at] ^= 0xff;
        std::fs::write(&shard, &b).unwrap();
        let outcome = Dataset::open(&dir).and_then(|ds| (0..2).map(|i| ds.image(i)).collect::<Result<Vec<_>, _>>());
        match outcome {
            Err(_) => caught += 1,
            Ok(images) => assert_eq!(images, originals, "byte {at} changed the pixels undetected"),
        }
    }
    // Only the reserved bytes (header 4, record 2 x 2, footer 4) may go unnoticed.
    assert!(caught >= good.len() - 12, "{caught} of {}", good.len());
}
