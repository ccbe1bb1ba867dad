//! The shard file format (version 1), its writer and its reader.
//!
//! A shard is a flat file of records followed by an index, all integers little-endian:
//!
//! ```text
//! header   16 B   "SWAVSHD1" | format version u32 | reserved u32 (0)
//! record   28 B   "SREC" | label u32 | height u32 | width u32 | channels u8 | codec u8 | reserved u16 |
//!                 payload length u32 | CRC-32 u32 (of the 24 header bytes before it, then the payload)
//!          ...    payload
//! index    16 B   per record: record offset u64 | record length u32 (header + payload) | label u32
//! footer   32 B   index offset u64 | record count u64 | CRC-32 of the index u32 | reserved u32 | "SWAVIDX1"
//! ```
//!
//! The label is `u32::MAX` for unlabelled images; it is stored in the record (so that a record describes
//! itself) and in the index (so that opening a dataset reads labels without touching the records).
//! The reader checks the footer and the index CRC when a shard is opened and every record's magic, CRC and
//! shape each time the record is read, so damage is reported with the shard and record named, never
//! returned as pixels.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::codec::Codec;
use crate::error::{DataError, Result};

pub(crate) const SHARD_MAGIC: &[u8; 8] = b"SWAVSHD1";
pub(crate) const SHARD_VERSION: u32 = 1;
pub(crate) const RECORD_MAGIC: &[u8; 4] = b"SREC";
pub(crate) const FOOTER_MAGIC: &[u8; 8] = b"SWAVIDX1";
pub(crate) const HEADER_LEN: usize = 16;
pub(crate) const RECORD_HEADER_LEN: usize = 28;
pub(crate) const INDEX_ENTRY_LEN: usize = 16;
pub(crate) const FOOTER_LEN: usize = 32;
/// Label value meaning "no label".
pub(crate) const NO_LABEL: u32 = u32::MAX;

/// What `ShardWriter::finish` reports (the manifest's shard entry).
#[derive(Clone, Debug)]
pub(crate) struct FinishedShard {
    pub records: usize,
    pub bytes: u64,
    pub crc32: u32,
}

/// Appends records to a new shard file; `finish` writes the index and footer and syncs the file.
pub(crate) struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    offset: u64,
    index: Vec<u8>,
    records: usize,
}

impl ShardWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        let mut w = ShardWriter {
            path: path.to_owned(),
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: crc32fast::Hasher::new(),
            offset: 0,
            index: Vec::new(),
            records: 0,
        };
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(SHARD_MAGIC);
        header[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    /// Bytes written so far (header and records; the index and footer come on `finish`).
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    pub fn records(&self) -> usize {
        self.records
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| DataError::io(&self.path, e))?;
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    pub fn append(
        &mut self,
        label: Option<u32>,
        height: u32,
        width: u32,
        channels: u8,
        codec: Codec,
        payload: &[u8],
    ) -> Result<()> {
        let payload_len = u32::try_from(payload.len()).map_err(|_| DataError::Output {
            path: self.path.clone(),
            problem: format!("an encoded image of {} bytes does not fit a record (4 GiB at most)", payload.len()),
        })?;
        let label = label.unwrap_or(NO_LABEL);
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(RECORD_MAGIC);
        h[4..8].copy_from_slice(&label.to_le_bytes());
        h[8..12].copy_from_slice(&height.to_le_bytes());
        h[12..16].copy_from_slice(&width.to_le_bytes());
        h[16] = channels;
        h[17] = codec.id();
        h[20..24].copy_from_slice(&payload_len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..24]);
        crc.update(payload);
        h[24..28].copy_from_slice(&crc.finalize().to_le_bytes());

        let offset = self.offset;
        self.write(&h)?;
        self.write(payload)?;
        self.index.extend_from_slice(&offset.to_le_bytes());
        self.index.extend_from_slice(&((RECORD_HEADER_LEN as u32) + payload_len).to_le_bytes());
        self.index.extend_from_slice(&label.to_le_bytes());
        self.records += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<FinishedShard> {
        let index_offset = self.offset;
        let index = std::mem::take(&mut self.index);
        self.write(&index)?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[0..8].copy_from_slice(&index_offset.to_le_bytes());
        footer[8..16].copy_from_slice(&(self.records as u64).to_le_bytes());
        footer[16..20].copy_from_slice(&crc32fast::hash(&index).to_le_bytes());
        footer[24..32].copy_from_slice(FOOTER_MAGIC);
        self.write(&footer)?;
        self.out.flush().map_err(|e| DataError::io(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| DataError::io(&self.path, e))?;
        Ok(FinishedShard { records: self.records, bytes: self.offset, crc32: self.hasher.clone().finalize() })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The header fields of one record, and its payload.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawRecord<'a> {
    pub height: u32,
    pub width: u32,
    pub channels: u8,
    pub codec: Codec,
    pub payload: &'a [u8],
}

/// A memory-mapped shard whose footer and index were checked.
pub(crate) struct ShardReader {
    pub path: PathBuf,
    map: memmap2::Mmap,
    index_offset: usize,
    records: usize,
}

impl ShardReader {
    /// Maps `path` and checks its size, header, footer and index CRC against what the manifest expects.
    pub fn open(path: &Path, expected_bytes: u64, expected_records: usize) -> Result<Self> {
        let corrupt = |problem: String| DataError::CorruptShard { shard: path.to_owned(), problem };
        // Look before opening: opening a FIFO would wait for a writer forever.
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        if !meta.is_file() {
            return Err(corrupt("is not a regular file".into()));
        }
        let len = meta.len();
        if len != expected_bytes {
            return Err(corrupt(format!("the file has {len} bytes but the manifest says {expected_bytes}")));
        }
        if len < (HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(corrupt(format!("the file is too short ({len} bytes) to be a shard")));
        }
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let now = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        if now != len {
            return Err(corrupt(format!("the file changed size while it was opened ({len} then {now} bytes)")));
        }
        // SAFETY: the map is read-only. Datasets are written once and then only read; if another process
        // truncates a shard while it is mapped, reads may fault, as with any memory-mapped file. Every
        // record is checked (CRC) before its bytes are used, so modified contents are detected.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        let b = &map[..];
        if &b[..8] != SHARD_MAGIC {
            return Err(corrupt("bad header magic (not a swav-data shard)".into()));
        }
        let version = u32_at(b, 8);
        if version != SHARD_VERSION {
            return Err(corrupt(format!("shard format version {version}, expected {SHARD_VERSION}")));
        }
        let f = &b[b.len() - FOOTER_LEN..];
        if &f[24..32] != FOOTER_MAGIC {
            return Err(corrupt("bad footer magic (the file is truncated or overwritten)".into()));
        }
        let index_offset = u64_at(f, 0);
        let records = u64_at(f, 8);
        let index_crc = u32_at(f, 16);
        let index_end = (b.len() - FOOTER_LEN) as u64;
        if records != expected_records as u64 {
            return Err(corrupt(format!("the footer says {records} records but the manifest says {expected_records}")));
        }
        if index_offset < HEADER_LEN as u64
            || index_offset > index_end
            || index_end - index_offset != records.saturating_mul(INDEX_ENTRY_LEN as u64)
        {
            return Err(corrupt(format!(
                "the footer's index position ({index_offset}) is inconsistent with the file size"
            )));
        }
        let index = &b[index_offset as usize..index_end as usize];
        let crc = crc32fast::hash(index);
        if crc != index_crc {
            return Err(corrupt(format!("index checksum mismatch (stored {index_crc:08x}, computed {crc:08x})")));
        }
        Ok(ShardReader { path: path.to_owned(), map, index_offset: index_offset as usize, records: records as usize })
    }

    pub fn records(&self) -> usize {
        self.records
    }

    fn entry(&self, record: usize) -> (u64, u32, u32) {
        let at = self.index_offset + record * INDEX_ENTRY_LEN;
        let e = &self.map[at..at + INDEX_ENTRY_LEN];
        (u64_at(e, 0), u32_at(e, 8), u32_at(e, 12))
    }

    /// The label stored in the index for `record` (`record < records()`).
    pub fn label(&self, record: usize) -> Option<u32> {
        let label = self.entry(record).2;
        (label != NO_LABEL).then_some(label)
    }

    /// Checks the labels of the index: each one names a class of the manifest, and every image of a
    /// labelled dataset has one. `first` is the dataset-wide number of record 0, for the messages.
    pub fn check_labels(&self, first: usize, labelled: bool, classes: usize) -> Result<()> {
        for record in 0..self.records {
            let label = self.entry(record).2;
            let problem = if label == NO_LABEL {
                if !labelled {
                    continue;
                }
                "has no label, but the manifest says the dataset is labelled".to_string()
            } else if (label as usize) < classes {
                continue;
            } else {
                format!("label {label} is past the manifest's {classes} classes")
            };
            return Err(DataError::CorruptRecord { shard: self.path.clone(), record, index: first + record, problem });
        }
        Ok(())
    }

    /// Reads and verifies one record; `index` is the dataset-wide image number, used in error messages.
    pub fn record(&self, record: usize, index: usize) -> Result<RawRecord<'_>> {
        let corrupt = |problem: String| DataError::CorruptRecord { shard: self.path.clone(), record, index, problem };
        let (offset, length, label) = self.entry(record);
        let end = offset.saturating_add(length as u64);
        if offset < HEADER_LEN as u64 || end > self.index_offset as u64 || (length as usize) < RECORD_HEADER_LEN {
            return Err(corrupt(format!("index entry points outside the records (offset {offset}, length {length})")));
        }
        let r = &self.map[offset as usize..end as usize];
        if &r[0..4] != RECORD_MAGIC {
            return Err(corrupt("bad record magic".into()));
        }
        let payload_len = u32_at(r, 20) as u64;
        if payload_len + RECORD_HEADER_LEN as u64 != length as u64 {
            return Err(corrupt(format!(
                "record length {} disagrees with the index ({length})",
                payload_len + RECORD_HEADER_LEN as u64
            )));
        }
        let payload = &r[RECORD_HEADER_LEN..];
        let stored = u32_at(r, 24);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&r[..24]);
        crc.update(payload);
        let computed = crc.finalize();
        if stored != computed {
            return Err(corrupt(format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})")));
        }
        let rec_label = u32_at(r, 4);
        if rec_label != label {
            return Err(corrupt(format!("label {rec_label} disagrees with the index ({label})")));
        }
        // The shape is checked against the payload and the dataset's limits when the record is decoded.
        let (height, width, channels) = (u32_at(r, 8), u32_at(r, 12), r[16]);
        let codec = Codec::from_id(r[17]).ok_or_else(|| corrupt(format!("unknown codec id {}", r[17])))?;
        Ok(RawRecord { height, width, channels, codec, payload })
    }

    /// CRC-32 of the whole file (compared with the manifest by `Dataset::verify`).
    pub fn file_crc32(&self) -> u32 {
        crc32fast::hash(&self.map[..])
    }
}
