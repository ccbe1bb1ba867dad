//! The zip container of PyTorch >= 1.6: `<folder>/data.pkl` (the pickle), `<folder>/data/<key>` (one
//! entry per storage, raw elements), `<folder>/byteorder` (`little` or `big`; absent before PyTorch
//! 2.1, meaning little) and a few version records that the reader does not need. The folder is the
//! file's stem or `archive`, so any single folder name is accepted.
//!
//! PyTorch stores every entry uncompressed (and aligns storages to 64 bytes), so each entry is a
//! zero-copy slice of the file; compressed entries are refused. [`rawzip`] parses the directory (zip64
//! included); this module checks that entries do not overlap (so reading them all touches each byte of
//! the file at most once, whatever the directory claims) and verifies every entry's CRC-32.

use std::collections::HashMap;

use super::tensor::DType;
use super::TorchError;

/// The first four bytes of a zip archive (a local file header).
pub(crate) const MAGIC: &[u8; 4] = b"PK\x03\x04";

/// A PyTorch zip archive: the pickle and the storages, as slices of the file.
#[derive(Debug)]
pub(crate) struct Archive<'a> {
    /// The bytes of `<folder>/data.pkl`.
    pub pickle: &'a [u8],
    /// Whether storages hold big-endian elements.
    pub big_endian: bool,
    /// `<folder>/data/`, for messages.
    data_dir: String,
    /// Storage key -> bytes.
    storages: HashMap<String, &'a [u8]>,
}

impl<'a> Archive<'a> {
    /// Reads the directory of `bytes`, a zip archive written by `torch.save`.
    pub(crate) fn open(bytes: &'a [u8]) -> Result<Archive<'a>, TorchError> {
        let entries = stored_entries(bytes)?;
        let pickles: Vec<&String> = entries.keys().filter(|n| is_top_level_pickle(n)).collect();
        let pickle_name = match pickles.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(zip_err("no `<folder>/data.pkl` entry: not a PyTorch checkpoint".into())),
            _ => return Err(zip_err(format!("{} `<folder>/data.pkl` entries; expected one", pickles.len()))),
        };
        let folder = &pickle_name[..pickle_name.len() - "data.pkl".len()];
        let data_dir = format!("{folder}data/");
        let big_endian = match entries.get(&format!("{folder}byteorder")) {
            None => false,
            Some(b) if b.trim_ascii() == b"little" => false,
            Some(b) if b.trim_ascii() == b"big" => true,
            Some(b) => {
                return Err(zip_err(format!("unknown byteorder {:?}", String::from_utf8_lossy(&b[..b.len().min(16)]))))
            }
        };
        let pickle = entries.get(&pickle_name).copied().unwrap_or_default();
        let storages = entries
            .into_iter()
            .filter_map(|(name, data)| Some((name.strip_prefix(&data_dir)?.to_string(), data)))
            .collect();
        Ok(Archive { pickle, big_endian, data_dir, storages })
    }

    /// Exactly the bytes of `numel` elements of storage `key`; the entry must hold at least that many.
    pub(crate) fn storage(&self, key: &str, dtype: DType, numel: u64) -> Result<&'a [u8], TorchError> {
        let bytes = self.storages.get(key).ok_or_else(|| TorchError::Storage {
            key: key.to_string(),
            detail: format!("no entry `{}{key}` in the archive", self.data_dir),
        })?;
        take_elements(key, bytes, dtype, numel)
    }
}

/// The first `numel` elements of `bytes`, or an error naming the storage if it holds fewer.
pub(crate) fn take_elements<'a>(key: &str, bytes: &'a [u8], dtype: DType, numel: u64) -> Result<&'a [u8], TorchError> {
    let need = numel.checked_mul(dtype.size() as u64);
    match need {
        Some(need) if need <= bytes.len() as u64 => Ok(&bytes[..need as usize]),
        _ => Err(TorchError::Storage {
            key: key.to_string(),
            detail: format!(
                "the pickle claims {numel} {} elements but the file holds {} bytes for it",
                dtype.storage_name(),
                bytes.len()
            ),
        }),
    }
}

fn zip_err(detail: String) -> TorchError {
    TorchError::Zip(detail)
}

/// `folder/data.pkl`: one folder level, as `torch.save` writes.
fn is_top_level_pickle(name: &str) -> bool {
    name.strip_suffix("/data.pkl").is_some_and(|folder| !folder.is_empty() && !folder.contains('/'))
}

/// Every file entry, by name, as a checked slice of `bytes`.
fn stored_entries(bytes: &[u8]) -> Result<HashMap<String, &[u8]>, TorchError> {
    let located = locate_entries(bytes)?;
    let mut ranges: Vec<(usize, usize)> = located.iter().map(|e| (e.start, e.start + e.data.len())).collect();
    check_disjoint(&mut ranges)?;
    // Only now, with each byte in at most one entry, is checking every CRC linear in the file's size.
    let mut entries = HashMap::with_capacity(located.len());
    for e in located {
        if rawzip::crc32(e.data) != e.crc {
            return Err(zip_err(format!("entry `{}`: CRC-32 mismatch: the file is corrupted", e.name)));
        }
        if entries.contains_key(&e.name) {
            return Err(zip_err(format!("entry `{}` appears twice", e.name)));
        }
        entries.insert(e.name, e.data);
    }
    Ok(entries)
}

/// A file entry found through the central directory.
struct Located<'a> {
    name: String,
    start: usize,
    data: &'a [u8],
    crc: u32,
}

/// Walks the central directory: names, data slices (checked against the file) and CRCs.
fn locate_entries(bytes: &[u8]) -> Result<Vec<Located<'_>>, TorchError> {
    let archive = rawzip::ZipArchive::from_slice(bytes)
        .map_err(|e| zip_err(format!("cannot read the directory ({e}); truncated or not a zip archive")))?;
    let mut located = Vec::new();
    let mut records = archive.entries();
    while let Some(record) = records.next_entry().map_err(|e| zip_err(format!("bad directory entry: {e}")))? {
        if record.is_dir() {
            continue;
        }
        let name = String::from_utf8_lossy(record.file_path().as_bytes()).into_owned();
        let bad = |detail: String| zip_err(format!("entry `{name}`: {detail}"));
        if record.compression_method() != rawzip::CompressionMethod::STORE {
            return Err(bad(format!(
                "compressed (method {:?}); PyTorch stores entries uncompressed",
                record.compression_method()
            )));
        }
        let entry = archive
            .get_entry(record.wayfinder())
            .map_err(|e| bad(format!("{e}; the archive is truncated or damaged")))?;
        let (start, end) = entry.compressed_data_range();
        let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
        let (start, data) =
            range.and_then(|(s, e)| Some((s, bytes.get(s..e)?))).ok_or_else(|| bad("data outside the file".into()))?;
        let claim = entry.claim_verifier();
        if data.len() as u64 != claim.uncompressed_size {
            return Err(bad(format!("stored size {} differs from its size {}", data.len(), claim.uncompressed_size)));
        }
        located.push(Located { name, start, data, crc: claim.crc });
    }
    Ok(located)
}

/// Entries that share bytes would let a small file pose as many large storages.
fn check_disjoint(ranges: &mut [(usize, usize)]) -> Result<(), TorchError> {
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
        return Err(zip_err("entries overlap: not an archive written by PyTorch".into()));
    }
    Ok(())
}
