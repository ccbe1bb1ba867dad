//! Helpers shared by the integration tests: synthetic images and small datasets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod shard_edit;

use swav_data::{Codec, PreprocessOptions, PreprocessReport};

/// Deterministic pseudo-random bytes (xorshift), so the tests need no RNG crate.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A smooth RGB test image with some noise (compresses like a photo).
pub fn photo(seed: u64, w: u32, h: u32) -> image::RgbImage {
    let n = noise(seed, (w * h * 3) as usize);
    let f = 1.0 + (seed % 5) as f32;
    image::RgbImage::from_fn(w, h, |x, y| {
        let i = ((y * w + x) * 3) as usize;
        let base = |c: usize, ph: f32| {
            let v = ((x as f32 / w as f32 * f + ph).sin() * 0.5 + 0.5) * 200.0 + (y as f32 / h as f32) * 40.0;
            (v + (n[i + c] as f32 - 128.0) / 16.0).clamp(0.0, 255.0) as u8
        };
        image::Rgb([base(0, 0.0), base(1, 2.0), base(2, 4.0)])
    })
}

pub fn save_png(path: &Path, img: &image::RgbImage) {
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

pub fn save_jpeg(path: &Path, img: &image::RgbImage, quality: u8) {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
    std::fs::write(path, out).unwrap();
}

pub fn options(input: &Path, output: &Path) -> PreprocessOptions {
    PreprocessOptions {
        input: input.to_owned(),
        output: output.to_owned(),
        codec: Codec::RawZstd,
        workers: 2,
        shard_size_mib: 1,
        ..PreprocessOptions::default()
    }
}

pub fn run(opts: &PreprocessOptions) -> swav_data::Result<PreprocessReport> {
    swav_data::preprocess(opts, &|_| {})
}

/// A labelled folder of `per_class` PNG photos in each of `classes` classes, sizes varying.
pub fn photo_folder(root: &Path, classes: usize, per_class: usize) -> PathBuf {
    let dir = root.join("photos");
    for c in 0..classes {
        let d = dir.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let seed = (c * 1000 + i) as u64;
            let (w, h) = if i % 2 == 0 { (48 + i as u32, 40) } else { (36, 52 + c as u32) };
            save_png(&d.join(format!("img{i:03}.png")), &photo(seed, w, h));
        }
    }
    dir
}

/// Preprocessed dataset of `photo_folder`.
pub fn photo_dataset(root: &Path, classes: usize, per_class: usize) -> swav_data::Dataset {
    let input = photo_folder(root, classes, per_class);
    let out = root.join("ds");
    run(&options(&input, &out)).unwrap();
    swav_data::Dataset::open(&out).unwrap()
}

/// Every file of a directory tree with its bytes, sorted by relative path.
pub fn tree_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push((p.strip_prefix(base).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Writes IDX images (and labels) files, gzipped if `gz`.
pub fn write_idx(
    dir: &Path,
    prefix: &str,
    images: &[Vec<u8>],
    rows: u32,
    cols: u32,
    labels: &[u8],
    gz: bool,
) -> PathBuf {
    use std::io::Write;
    let mut img = vec![0, 0, 8, 3];
    img.extend((images.len() as u32).to_be_bytes());
    img.extend(rows.to_be_bytes());
    img.extend(cols.to_be_bytes());
    for i in images {
        img.extend(i);
    }
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((labels.len() as u32).to_be_bytes());
    lab.extend(labels);
    let write = |name: String, bytes: &[u8]| {
        let p = dir.join(name);
        if gz {
            let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(&p, bytes).unwrap();
        }
        p
    };
    let ext = if gz { ".gz" } else { "" };
    write(format!("{prefix}-labels-idx1-ubyte{ext}"), &lab);
    write(format!("{prefix}-images-idx3-ubyte{ext}"), &img)
}
