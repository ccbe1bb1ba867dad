//! A small labelled image set made on the fly, for examples, smoke tests and benchmarks that must not
//! depend on downloaded data: grayscale images of four shapes (horizontal bar, vertical bar, square,
//! disc) at random places with noise, written as IDX files (the MNIST format) that [`crate::preprocess()`]
//! reads like Fashion-MNIST.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::rng::SplitMix64;

/// Names of the files [`write_shapes_idx`] writes (images, labels).
pub const SHAPES_IMAGES: &str = "shapes-images-idx3-ubyte";
/// See [`SHAPES_IMAGES`].
pub const SHAPES_LABELS: &str = "shapes-labels-idx1-ubyte";

fn write_idx(path: &Path, magic: u32, dims: &[u32], data: &[u8]) -> Result<()> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

/// Writes `n` images of `size x size` pixels (`size >= 5`) in 4 classes (`i % 4`) into `dir`, drawn from
/// `seed`; returns the path of the images file (the labels file is beside it, as IDX readers expect).
pub fn write_shapes_idx(dir: &Path, n: usize, size: usize, seed: u64) -> Result<PathBuf> {
    if size < 5 || n == 0 || u32::try_from(n).is_err() || u32::try_from(size).is_err() {
        return Err(DataError::Config(format!("synthetic shapes: {n} images of {size} px (need n >= 1, size >= 5)")));
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut rng = SplitMix64::from_key(&[seed, 0x5348_4150_4553]);
    let mut pixels = Vec::with_capacity(n * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 4;
        let (cx, cy) = (2 + rng.below((size - 4) as u64) as usize, 2 + rng.below((size - 4) as u64) as usize);
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x.abs_diff(cx), y.abs_diff(cy));
                let on = match class {
                    0 => dy <= 1,
                    1 => dx <= 1,
                    2 => dx <= 2 && dy <= 2,
                    _ => dx * dx + dy * dy <= 6,
                };
                let noise = rng.below(40) as u8;
                pixels.push(if on { 200 + noise / 2 } else { noise });
            }
        }
        labels.push(class as u8);
    }
    let images = dir.join(SHAPES_IMAGES);
    write_idx(&images, 0x0803, &[n as u32, size as u32, size as u32], &pixels)?;
    write_idx(&dir.join(SHAPES_LABELS), 0x0801, &[n as u32], &labels)?;
    Ok(images)
}
