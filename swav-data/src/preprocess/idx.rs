//! IDX files (the format of MNIST and Fashion-MNIST): `*-images-idx3-ubyte[.gz]` with the matching
//! `*-labels-idx1-ubyte[.gz]`. Big-endian header: magic `00 00 08 03` (unsigned bytes, 3 dimensions),
//! count, rows, columns, then the pixels; labels: magic `00 00 08 01`, count, then one byte per image.
//! An IDX file is one input: any defect is an error naming the file, not a skipped image.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

pub(crate) struct IdxData {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

/// Whether a file name looks like an IDX images file.
pub(crate) fn is_idx_images(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.ends_with("images-idx3-ubyte") || name.ends_with("images-idx3-ubyte.gz")
}

/// The labels file that goes with an images file (`images-idx3` -> `labels-idx1`, with or without `.gz`).
pub(crate) fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_string_lossy().into_owned();
    let base = name.strip_suffix(".gz").unwrap_or(&name).replace("images-idx3-ubyte", "labels-idx1-ubyte");
    let dir = images.parent().unwrap_or(Path::new("."));
    [dir.join(format!("{base}.gz")), dir.join(&base)].into_iter().find(|p| p.is_file())
}

fn open(path: &Path) -> Result<Box<dyn Read>> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))))
    } else {
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}

/// Reads exactly `n` bytes and checks that nothing follows.
fn read_exact_all(path: &Path, r: &mut dyn Read, n: usize, what: &str) -> Result<Vec<u8>> {
    let bad = |problem: String| DataError::Input { path: path.to_owned(), problem };
    let mut buf = Vec::new();
    buf.try_reserve_exact(n).map_err(|_| bad(format!("cannot allocate {n} bytes for the {what}")))?;
    r.take(n as u64 + 1).read_to_end(&mut buf).map_err(|e| bad(format!("corrupt or truncated file: {e}")))?;
    if buf.len() < n {
        return Err(bad(format!("truncated: the header announces {n} bytes of {what}, the file holds {}", buf.len())));
    }
    if buf.len() > n {
        return Err(bad(format!("more data than the header announces ({n} bytes of {what}): not an IDX file?")));
    }
    Ok(buf)
}

fn header(path: &Path, r: &mut dyn Read, magic: [u8; 4], dims: usize) -> Result<Vec<usize>> {
    let bad = |problem: String| DataError::Input { path: path.to_owned(), problem };
    let mut h = vec![0u8; 4 + 4 * dims];
    r.read_exact(&mut h).map_err(|e| bad(format!("cannot read the IDX header: {e}")))?;
    if h[..4] != magic {
        return Err(bad(format!(
            "bad IDX magic {:02x} {:02x} {:02x} {:02x} (expected {:02x} {:02x} {:02x} {:02x})",
            h[0], h[1], h[2], h[3], magic[0], magic[1], magic[2], magic[3]
        )));
    }
    Ok((0..dims).map(|i| u32::from_be_bytes(h[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize).collect())
}

/// The number of images an IDX images file announces in its header (checked to be non-zero), without
/// reading the pixels: what a caller needs to split the file into ranges.
pub fn idx_image_count(images: &Path) -> Result<usize> {
    let mut r = open(images)?;
    let d = header(images, &mut *r, [0, 0, 8, 3], 3)?;
    if d.contains(&0) {
        return Err(DataError::Input {
            path: images.to_owned(),
            problem: format!("empty IDX images file ({} images of {}x{})", d[0], d[1], d[2]),
        });
    }
    Ok(d[0])
}

/// Reads an images file and its labels file.
pub(crate) fn read_idx(images: &Path, max_pixels: u64) -> Result<IdxData> {
    let bad = |p: &Path, problem: String| DataError::Input { path: p.to_owned(), problem };
    let mut r = open(images)?;
    let d = header(images, &mut *r, [0, 0, 8, 3], 3)?;
    let (count, rows, cols) = (d[0], d[1], d[2]);
    if count == 0 || rows == 0 || cols == 0 {
        return Err(bad(images, format!("empty IDX images file ({count} images of {rows}x{cols})")));
    }
    if (rows as u64) * (cols as u64) > max_pixels {
        return Err(bad(images, format!("images of {rows}x{cols} exceed the limit of {max_pixels} pixels")));
    }
    let total = (count as u64) * (rows as u64) * (cols as u64);
    if total > (1u64 << 36) {
        return Err(bad(images, format!("{count} images of {rows}x{cols} is more than this reader accepts (64 GiB)")));
    }
    let pixels = read_exact_all(images, &mut *r, total as usize, "pixels")?;
    let lp = labels_path(images).ok_or_else(|| {
        bad(
            images,
            "the matching labels file (same name with labels-idx1-ubyte, optionally .gz) is missing next to it".into(),
        )
    })?;
    let mut r = open(&lp)?;
    let d = header(&lp, &mut *r, [0, 0, 8, 1], 1)?;
    if d[0] != count {
        return Err(bad(&lp, format!("{} labels for {count} images in {}", d[0], images.display())));
    }
    let labels = read_exact_all(&lp, &mut *r, count, "labels")?;
    Ok(IdxData { count, rows, cols, pixels, labels })
}
