//! Editing shard files and manifests the way a hostile user would: change fields and then repair the
//! checksums, so that the reader's deeper checks (not only its CRCs) are exercised. The layout is read
//! from the documented format (see `swav_data::shard`), independently of the reader.

use std::path::Path;

pub const HEADER_LEN: usize = 16;
pub const RECORD_HEADER_LEN: usize = 28;
pub const INDEX_ENTRY_LEN: usize = 16;
pub const FOOTER_LEN: usize = 32;

/// Record header fields, by byte offset in the record.
pub const REC_LABEL: usize = 4;
pub const REC_HEIGHT: usize = 8;
pub const REC_WIDTH: usize = 12;
pub const REC_CHANNELS: usize = 16;
pub const REC_CODEC: usize = 17;
pub const REC_PAYLOAD_LEN: usize = 20;
pub const REC_CRC: usize = 24;

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The bytes of one shard file.
#[derive(Clone)]
pub struct Shard {
    pub bytes: Vec<u8>,
}

impl Shard {
    pub fn read(path: &Path) -> Shard {
        Shard { bytes: std::fs::read(path).unwrap() }
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.bytes).unwrap();
    }

    fn footer_at(&self) -> usize {
        self.bytes.len() - FOOTER_LEN
    }

    pub fn index_offset(&self) -> usize {
        u64_at(&self.bytes, self.footer_at()) as usize
    }

    pub fn count(&self) -> usize {
        u64_at(&self.bytes, self.footer_at() + 8) as usize
    }

    /// Byte position of index entry `r`.
    pub fn entry_at(&self, r: usize) -> usize {
        self.index_offset() + r * INDEX_ENTRY_LEN
    }

    /// (record offset, record length, label) of index entry `r`.
    pub fn entry(&self, r: usize) -> (usize, usize, u32) {
        let at = self.entry_at(r);
        (u64_at(&self.bytes, at) as usize, u32_at(&self.bytes, at + 8) as usize, u32_at(&self.bytes, at + 12))
    }

    /// Offset of record `r` in the file.
    pub fn record_at(&self, r: usize) -> usize {
        self.entry(r).0
    }

    /// The payload of record `r` (as the index delimits it).
    pub fn payload(&self, r: usize) -> &[u8] {
        let (off, len, _) = self.entry(r);
        &self.bytes[off + RECORD_HEADER_LEN..off + len]
    }

    /// Reads a u32 field of record `r`'s header.
    pub fn record_u32(&self, r: usize, field: usize) -> u32 {
        u32_at(&self.bytes, self.record_at(r) + field)
    }

    /// Sets a u32 field of record `r`'s header and repairs its CRC.
    pub fn set_record_u32(&mut self, r: usize, field: usize, v: u32) {
        let at = self.record_at(r) + field;
        put_u32(&mut self.bytes, at, v);
        self.fix_record_crc(r);
    }

    /// Recomputes record `r`'s CRC over its header and the payload the index delimits (as far as the
    /// file goes).
    pub fn fix_record_crc(&mut self, r: usize) {
        let (off, len, _) = self.entry(r);
        let end = off.saturating_add(len).min(self.bytes.len());
        if off + RECORD_HEADER_LEN > self.bytes.len() || end < off + RECORD_HEADER_LEN {
            return;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&self.bytes[off..off + 24]);
        h.update(&self.bytes[off + RECORD_HEADER_LEN..end]);
        let crc = h.finalize();
        put_u32(&mut self.bytes, off + REC_CRC, crc);
    }

    /// Replaces record `r`'s payload (the record and everything after it move; the index, the footer and
    /// the record's CRC are repaired).
    pub fn replace_payload(&mut self, r: usize, payload: &[u8]) {
        let (off, len, label) = self.entry(r);
        let old_end = off + len;
        let new_len = RECORD_HEADER_LEN + payload.len();
        let delta = new_len as i64 - len as i64;
        let count = self.count();
        let mut entries: Vec<(usize, usize, u32)> = (0..count).map(|i| self.entry(i)).collect();
        let mut bytes = self.bytes[..off + RECORD_HEADER_LEN].to_vec();
        put_u32(&mut bytes, off + REC_PAYLOAD_LEN, payload.len() as u32);
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&self.bytes[old_end..self.index_offset()]);
        let index_offset = bytes.len();
        for (i, e) in entries.iter_mut().enumerate() {
            if e.0 > off {
                e.0 = (e.0 as i64 + delta) as usize;
            }
            if i == r {
                *e = (off, new_len, label);
            }
        }
        for e in &entries {
            bytes.extend_from_slice(&(e.0 as u64).to_le_bytes());
            bytes.extend_from_slice(&(e.1 as u32).to_le_bytes());
            bytes.extend_from_slice(&e.2.to_le_bytes());
        }
        let mut footer = [0u8; FOOTER_LEN];
        put_u64(&mut footer, 0, index_offset as u64);
        put_u64(&mut footer, 8, count as u64);
        footer[24..32].copy_from_slice(b"SWAVIDX1");
        bytes.extend_from_slice(&footer);
        self.bytes = bytes;
        self.fix_record_crc(r);
        self.fix_index_crc();
    }

    /// Sets index entry `r` and repairs the index CRC.
    pub fn set_entry(&mut self, r: usize, offset: u64, len: u32, label: u32) {
        let at = self.entry_at(r);
        put_u64(&mut self.bytes, at, offset);
        put_u32(&mut self.bytes, at + 8, len);
        put_u32(&mut self.bytes, at + 12, label);
        self.fix_index_crc();
    }

    /// Recomputes the index CRC in the footer (if the footer's index position is inside the file).
    pub fn fix_index_crc(&mut self) {
        if self.bytes.len() < FOOTER_LEN {
            return;
        }
        let f = self.footer_at();
        let (io, n) = (u64_at(&self.bytes, f), u64_at(&self.bytes, f + 8));
        let end = (io as u128) + (n as u128) * INDEX_ENTRY_LEN as u128;
        if io as usize > f || end > f as u128 {
            return;
        }
        let crc = crc32fast::hash(&self.bytes[io as usize..end as usize]);
        put_u32(&mut self.bytes, f + 16, crc);
    }

    /// The `crc32:xxxxxxxx` checksum the manifest records for this file.
    pub fn checksum(&self) -> String {
        format!("crc32:{:08x}", crc32fast::hash(&self.bytes))
    }
}

/// Rewrites `dir/manifest.json` through `edit` (on its JSON value).
pub fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Writes `shard` as shard `s` of the dataset in `dir` and records its new size and checksum in the
/// manifest, so that only the shard's contents can be blamed.
pub fn install_shard(dir: &Path, s: usize, shard: &Shard) {
    let name = format!("shard-{s:05}.bin");
    shard.write(&dir.join(&name));
    let (len, sum) = (shard.bytes.len(), shard.checksum());
    edit_manifest(dir, |m| {
        m["shards"][s]["bytes"] = len.into();
        m["shards"][s]["checksum"] = sum.into();
    });
}
