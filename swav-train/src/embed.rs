//! Features for use outside swav-rs: pooled backbone features of a dataset as a NumPy `.npy` file.
//!
//! The `.npy` format (version 1.0): the magic `\x93NUMPY`, the version bytes `1 0`, a little-endian
//! u16 header length, then an ASCII Python dict `{'descr': '<f4', 'fortran_order': False, 'shape':
//! (n, F), }` padded with spaces and ended by `\n` so that the data starts at a multiple of 64 bytes,
//! then the values in C order. Features are `<f4` (float32) `[n, F]`; labels `<i8` (int64) `[n]`.
//! `np.load` reads both. Files are written atomically (temporary file, fsync, rename).

use std::path::Path;

use swav_data::Dataset;

use crate::eval::{
    extract_features, input_transform, load_model, ExtractOptions, Features, LoadedModel,
};
use crate::TrainError;

/// A value type `.npy` files can hold here.
pub trait NpyElement: Copy {
    /// NumPy's dtype string (little-endian).
    const DESCR: &'static str;
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    const SIZE: usize = 8;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        i64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// The bytes of a `.npy` file holding `data` with `shape` (C order).
pub fn npy_bytes<T: NpyElement>(shape: &[usize], data: &[T]) -> Result<Vec<u8>, TrainError> {
    if shape.iter().product::<usize>() != data.len() {
        return Err(TrainError::Shape(format!(
            "{} values do not fill an array of shape {shape:?}",
            data.len()
        )));
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}",
        T::DESCR
    );
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    header.push('\n');
    let len = u16::try_from(header.len()).map_err(|_| {
        TrainError::Shape(format!(
            "shape {shape:?} makes a .npy header too long for version 1.0"
        ))
    })?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len() * T::SIZE);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.write_le(&mut out);
    }
    Ok(out)
}

/// Writes a `.npy` file atomically.
pub fn write_npy<T: NpyElement>(
    path: &Path,
    shape: &[usize],
    data: &[T],
) -> Result<(), TrainError> {
    swav_model::checkpoint::atomic_write(path, &npy_bytes(shape, data)?)?;
    Ok(())
}

/// Reads a C-order `.npy` file (version 1.0 to 3.0) of element type `T`; returns its shape and values.
pub fn read_npy<T: NpyElement>(path: &Path) -> Result<(Vec<usize>, Vec<T>), TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_npy(&bytes).map_err(|why| {
        TrainError::Eval(format!(
            "{}: not a readable .npy file: {why}",
            path.display()
        ))
    })
}

/// Parses the bytes of a `.npy` file (see [`read_npy`]).
pub fn parse_npy<T: NpyElement>(bytes: &[u8]) -> Result<(Vec<usize>, Vec<T>), String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("no NumPy magic".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported version {v}")),
    };
    let header = bytes.get(start..start + len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or(format!("no '{key}' in the header"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    if !descr.starts_with(&format!("'{}'", T::DESCR)) {
        return Err(format!(
            "dtype {} expected, header says {}",
            T::DESCR,
            descr.split(',').next().unwrap_or("")
        ));
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let close = shape_text.find(')').ok_or("bad shape")?;
    let shape = shape_text[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry `{s}`"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + len..];
    if data.len() != count * T::SIZE {
        return Err(format!(
            "shape {shape:?} needs {} data bytes, the file has {}",
            count * T::SIZE,
            data.len()
        ));
    }
    Ok((shape, data.chunks_exact(T::SIZE).map(T::read_le).collect()))
}

/// What [`embed`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedSummary {
    pub images: usize,
    pub feature_dim: usize,
    /// Whether a labels file was written.
    pub labels: bool,
    pub resize: usize,
    pub crop: usize,
}

/// Writes the features of every image of `dataset` to `output` (`<f4`, `[n, F]`) and, when
/// `labels_output` is given, its labels (`<i8`, `[n]`; the dataset must be labelled).
/// `input_size` and the normalisation follow [`crate::eval::features`].
pub fn embed(
    checkpoint: &Path,
    dataset: &Dataset,
    output: &Path,
    labels_output: Option<&Path>,
    input_size: Option<usize>,
    opts: &ExtractOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<EmbedSummary, TrainError> {
    if labels_output.is_some() && !dataset.manifest().labelled {
        return Err(TrainError::Eval(format!(
            "the data in {} has no labels: leave out the labels output",
            dataset.dir().display()
        )));
    }
    let LoadedModel { model, metadata } = load_model(checkpoint)?;
    let transform = input_transform(&model, &metadata, dataset, input_size)?;
    let f: Features = extract_features(&model, dataset, &transform, opts, progress)?;
    write_npy(output, &[f.n, f.dim], &f.data)?;
    if let Some(path) = labels_output {
        let labels: Vec<i64> = f
            .labels_for("the labels file")?
            .iter()
            .map(|&l| l as i64)
            .collect();
        write_npy(path, &[f.n], &labels)?;
    }
    Ok(EmbedSummary {
        images: f.n,
        feature_dim: f.dim,
        labels: labels_output.is_some(),
        resize: transform.resize,
        crop: transform.crop,
    })
}
