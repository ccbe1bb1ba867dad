//! NumPy's `.npy` format, version 1.0 written, 1.0 to 3.0 read: the magic `\x93NUMPY`, two version
//! bytes, a little-endian header length (u16 in 1.0, u32 in 2.0/3.0), an ASCII Python dict
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (n, F), }` padded with spaces and ended by `\n`
//! so that the data starts at a multiple of 64 bytes, then the values in C order. `numpy.load` reads
//! what [`write`](fn@write) writes; [`read`] checks every size against the file before it allocates.

use std::path::{Path, PathBuf};

use crate::fs::{atomic_write, FsError};

/// What can go wrong with a `.npy` file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] FsError),
    /// The bytes are not a `.npy` array of the expected type.
    #[error("not a readable .npy array: {0}")]
    Invalid(String),
    /// A file that is not a `.npy` array of the expected type.
    #[error("{}: not a readable .npy array: {detail}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The values do not fill the shape.
    #[error("{values} values do not fill an array of shape {shape:?}")]
    Shape {
        /// The shape asked for.
        shape: Vec<usize>,
        /// How many values were given.
        values: usize,
    },
}

/// A value type `.npy` files hold here.
pub trait Element: Copy {
    /// NumPy's dtype string (little-endian).
    const DESCR: &'static str;
    /// Bytes per value.
    const SIZE: usize;
    /// Appends the little-endian bytes of `self`.
    fn write_le(self, out: &mut Vec<u8>);
    /// The value of `SIZE` little-endian bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for i64 {
    const DESCR: &'static str = "<i8";
    const SIZE: usize = 8;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// The bytes of a `.npy` file holding `data` with `shape` (C order).
pub fn to_bytes<T: Element>(shape: &[usize], data: &[T]) -> Result<Vec<u8>, NpyError> {
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(data.len()) {
        return Err(NpyError::Shape { shape: shape.to_vec(), values: data.len() });
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.extend(std::iter::repeat_n(' ', unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let len = u16::try_from(header.len())
        .map_err(|_| NpyError::Invalid(format!("shape {shape:?} makes a header too long for version 1.0")))?;
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

/// Parses the bytes of a C-order `.npy` array of element type `T`: its shape and values.
pub fn from_bytes<T: Element>(bytes: &[u8]) -> Result<(Vec<usize>, Vec<T>), NpyError> {
    parse(bytes).map_err(NpyError::Invalid)
}

fn parse<T: Element>(bytes: &[u8]) -> Result<(Vec<usize>, Vec<T>), String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("no NumPy magic".into());
    }
    let (len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported version {v}")),
    };
    let header = bytes.get(start..start.saturating_add(len)).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}':")).ok_or(format!("no '{key}' in the header"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    if !descr.starts_with(&format!("'{}'", T::DESCR)) {
        return Err(format!("dtype {} expected, header says {}", T::DESCR, descr.split(',').next().unwrap_or("")));
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let close = shape_text.find(')').ok_or("bad shape")?;
    let shape = shape_text
        .get(1..close)
        .ok_or("bad shape")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape entry `{s}`")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = &bytes[start + len..];
    // The shape is checked against the bytes present before anything is allocated for it.
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count.and_then(|c| c.checked_mul(T::SIZE)) != Some(data.len()) {
        return Err(format!("shape {shape:?} does not match the {} data bytes of the file", data.len()));
    }
    Ok((shape, data.chunks_exact(T::SIZE).map(T::read_le).collect()))
}

/// Writes a `.npy` file atomically.
pub fn write<T: Element>(path: &Path, shape: &[usize], data: &[T]) -> Result<(), NpyError> {
    atomic_write(path, &to_bytes(shape, data)?)?;
    Ok(())
}

/// Reads a C-order `.npy` file of element type `T`: its shape and values.
pub fn read<T: Element>(path: &Path) -> Result<(Vec<usize>, Vec<T>), NpyError> {
    let bytes = std::fs::read(path).map_err(|e| FsError::new(path, e))?;
    parse(&bytes).map_err(|detail| NpyError::InvalidFile { path: path.to_path_buf(), detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_to_64_bytes_and_round_trips() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let bytes = to_bytes(&[3, 4], &data).unwrap();
        assert_eq!((bytes.len() - 12 * 4) % 64, 0);
        assert_eq!(from_bytes::<f32>(&bytes).unwrap(), (vec![3, 4], data));
        let labels = vec![3i64, -1, 7];
        assert_eq!(from_bytes::<i64>(&to_bytes(&[3], &labels).unwrap()).unwrap(), (vec![3], labels));
    }

    #[test]
    fn refuses_wrong_type_short_data_and_absurd_shapes() {
        let bytes = to_bytes(&[2], &[1.0f32, 2.0]).unwrap();
        assert!(from_bytes::<i64>(&bytes).is_err());
        assert!(from_bytes::<f32>(&bytes[..bytes.len() - 1]).is_err());
        // A header claiming 2^62 x 2^62 values (or an overflowing product) fails before any
        // allocation, as does one whose product is larger than the data present.
        let forged = |shape: &str, data: &[u8]| {
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
            let mut out = b"\x93NUMPY\x01\x00".to_vec();
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out
        };
        assert!(from_bytes::<f32>(&forged("(2,)", &[0; 8])).is_ok());
        assert!(from_bytes::<f32>(&forged("(4611686018427387904, 4611686018427387904)", &[0; 8])).is_err());
        assert!(from_bytes::<f32>(&forged("(4611686018427387904,)", &[0; 8])).is_err());
        assert!(from_bytes::<f32>(&forged("(3,)", &[0; 8])).is_err());
        assert!(matches!(to_bytes(&[3], &[1.0f32]), Err(NpyError::Shape { .. })));
    }
}
