//! Bounded fuzzing of the dataset reader, run in CI: valid datasets are mutated (bit flips, truncations,
//! length and size fields set to huge values, swapped records, lying zstd and JPEG headers, broken and
//! twisted manifests), with checksums repaired in most cases so that the checks behind them are reached,
//! and every mutant is opened and read in full. For each one:
//!
//! - nothing panics (every mutant is read inside `catch_unwind`);
//! - every read gives an error or a valid image (pixel count = height x width x channels, 1 or 3
//!   channels, labels within the class list);
//! - the peak heap of opening and reading it, measured by a counting global allocator, stays below
//!   `ALLOC_PER_INPUT_BYTE` x (manifest + shard bytes) + `ALLOC_CONSTANT`.
//!
//! The cases come from a fixed seed (`SplitMix64`), so a failure is reproducible: the message names the
//! case and its mutations. `SWAV_FUZZ_CASES=N` runs more cases (default 1000 per target),
//! `SWAV_FUZZ_SEED=S` other ones; `SWAV_FUZZ_FIRST=K` starts at case K (to replay a failure) and
//! `SWAV_FUZZ_DEBUG=1` prints what opening each mutant gave. Run it with `--nocapture` to see the
//! measured peaks.
//! (zstd's own decompression context is allocated by C code the counter does not see: one constant
//! context per decoder, never sized by the input.)

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use common::shard_edit::{put_u32, put_u64, u32_at, u64_at, FOOTER_LEN, INDEX_ENTRY_LEN, RECORD_HEADER_LEN};
use common::*;
use counting_alloc::measure;
use swav_data::{Codec, Dataset, SplitMix64};

/// Heap bytes one input byte may cost at most, and a constant on top (decoder tables, the manifest's
/// structures, the dataset's bookkeeping). The decoded images of the seed datasets cost about 2 bytes per
/// input byte; the bound leaves room, and an allocation sized by a lie (megabytes to gigabytes) fails it.
const ALLOC_PER_INPUT_BYTE: usize = 16;
const ALLOC_CONSTANT: usize = 512 << 10;

fn cases() -> u64 {
    std::env::var("SWAV_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn seed() -> u64 {
    std::env::var("SWAV_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_DA7A)
}

/// A valid dataset held in memory: its manifest and shard files.
#[derive(Clone)]
struct Files {
    manifest: Vec<u8>,
    shards: Vec<(String, Vec<u8>)>,
    /// `names.json`, when the dataset has one.
    names: Option<Vec<u8>>,
}

impl Files {
    fn read(dir: &Path) -> Files {
        let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
        let mut shards: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("shard-"))
            .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
            .collect();
        shards.sort();
        let names = std::fs::read(dir.join("names.json")).ok();
        Files { manifest, shards, names }
    }

    fn write(&self, dir: &Path) {
        if dir.exists() {
            std::fs::remove_dir_all(dir).unwrap();
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("manifest.json"), &self.manifest).unwrap();
        for (name, bytes) in &self.shards {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        if let Some(names) = &self.names {
            std::fs::write(dir.join("names.json"), names).unwrap();
        }
    }

    fn input_bytes(&self) -> usize {
        self.manifest.len()
            + self.shards.iter().map(|s| s.1.len()).sum::<usize>()
            + self.names.as_ref().map_or(0, Vec::len)
    }

    /// Records each shard's size and checksum in the manifest (when it still parses), so that the
    /// mutation is not caught by the size check alone.
    fn sync_manifest(&mut self) {
        let Ok(mut m) = serde_json::from_slice::<serde_json::Value>(&self.manifest) else {
            return;
        };
        for (i, (_, bytes)) in self.shards.iter().enumerate() {
            if let Some(e) = m.get_mut("shards").and_then(|s| s.get_mut(i)).and_then(|e| e.as_object_mut()) {
                e.insert("bytes".into(), bytes.len().into());
                e.insert("checksum".into(), format!("crc32:{:08x}", crc32fast::hash(bytes)).into());
            }
        }
        self.manifest = serde_json::to_vec_pretty(&m).unwrap();
    }
}

/// Small seed datasets: raw-zstd and JPEG records, RGB and grayscale, labelled (two shards) and
/// unlabelled. The pixel limit is small, as the bound is about the input, not about the limit.
fn seeds(root: &Path) -> Vec<Files> {
    let input = root.join("labelled");
    for c in 0..2 {
        let d = input.join(format!("c{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..3 {
            let (w, h) = (9 + 5 * i as u32, 12 - 2 * i as u32 + c as u32);
            save_png(&d.join(format!("{i}.png")), &photo((c * 7 + i) as u64, w, h));
        }
        let gray = image::GrayImage::from_fn(11, 7, |x, y| image::Luma([((x * 31 + y * 17 + c as u32) % 256) as u8]));
        gray.save(d.join("gray.png")).unwrap();
    }
    let flat = root.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for i in 0..3 {
        save_png(&flat.join(format!("{i}.png")), &photo(100 + i, 16, 16));
    }
    let mut out = Vec::new();
    for (name, input, codec) in
        [("zstd", &input, Codec::RawZstd), ("jpeg", &input, Codec::Jpeg), ("flat", &flat, Codec::RawZstd)]
    {
        let dir = root.join(format!("seed-{name}"));
        let mut opts = options(input, &dir);
        opts.codec = codec;
        opts.max_pixels = 64 * 64;
        run(&opts).unwrap();
        let mut files = Files::read(&dir);
        if name == "zstd" {
            // Split its shard in two so that shard boundaries are exercised (the writer's smallest
            // shard size, 1 MiB, would hold everything).
            files = split_first_shard(&files);
        }
        out.push(files);
    }
    out
}

/// The dataset with its single shard cut into two shards after the first half of its records.
fn split_first_shard(files: &Files) -> Files {
    let b = &files.shards[0].1;
    let f = b.len() - FOOTER_LEN;
    let (io, n) = (u64_at(b, f) as usize, u64_at(b, f + 8) as usize);
    let entries: Vec<(usize, usize, u32)> = (0..n)
        .map(|r| {
            let at = io + r * INDEX_ENTRY_LEN;
            (u64_at(b, at) as usize, u32_at(b, at + 8) as usize, u32_at(b, at + 12))
        })
        .collect();
    let half = n / 2;
    let build = |part: &[(usize, usize, u32)]| {
        let mut out = b[..16].to_vec();
        let mut index = Vec::new();
        for &(off, len, label) in part {
            index.extend((out.len() as u64).to_le_bytes());
            index.extend((len as u32).to_le_bytes());
            index.extend(label.to_le_bytes());
            out.extend_from_slice(&b[off..off + len]);
        }
        let index_offset = out.len();
        out.extend_from_slice(&index);
        let mut footer = [0u8; FOOTER_LEN];
        put_u64(&mut footer, 0, index_offset as u64);
        put_u64(&mut footer, 8, part.len() as u64);
        put_u32(&mut footer, 16, crc32fast::hash(&index));
        footer[24..].copy_from_slice(b"SWAVIDX1");
        out.extend_from_slice(&footer);
        out
    };
    let shards = vec![
        ("shard-00000.bin".to_string(), build(&entries[..half])),
        ("shard-00001.bin".to_string(), build(&entries[half..])),
    ];
    let mut m: serde_json::Value = serde_json::from_slice(&files.manifest).unwrap();
    let mut list = Vec::new();
    for (i, (name, bytes)) in shards.iter().enumerate() {
        let records = if i == 0 { half } else { n - half };
        list.push(serde_json::json!({
            "file": name, "records": records, "bytes": bytes.len(),
            "checksum": format!("crc32:{:08x}", crc32fast::hash(bytes)),
        }));
    }
    m["shards"] = list.into();
    let split = Files { manifest: serde_json::to_vec_pretty(&m).unwrap(), shards, names: files.names.clone() };
    let tmp = tempfile::tempdir().unwrap();
    split.write(tmp.path());
    let ds = Dataset::open(tmp.path()).expect("the split seed is valid");
    ds.verify().expect("the split seed is valid");
    split
}

// ---------------------------------------------------------------------------------------------------
// Mutations.

/// Values that break size and count fields.
fn interesting(rng: &mut SplitMix64) -> u64 {
    const V: [u64; 16] = [
        0,
        1,
        2,
        3,
        7,
        0xff,
        0xffff,
        0x1_0000,
        65_535 * 65_535,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_fffe,
        0xffff_ffff,
        1 << 40,
        1 << 60,
        u64::MAX,
    ];
    if rng.chance(0.2) {
        rng.next_u64() >> rng.below(64)
    } else {
        V[rng.below(V.len() as u64) as usize]
    }
}

/// (footer position, index offset, record count) when the footer is readable and the index inside.
fn layout(b: &[u8]) -> Option<(usize, usize, usize)> {
    if b.len() < 16 + FOOTER_LEN {
        return None;
    }
    let f = b.len() - FOOTER_LEN;
    let (io, n) = (u64_at(b, f), u64_at(b, f + 8));
    let end = (io as u128).checked_add(n as u128 * INDEX_ENTRY_LEN as u128)?;
    (io >= 16 && end <= f as u128).then_some((f, io as usize, n as usize))
}

/// (record offset, record length) of index entry `r`, when inside the file.
fn record_span(b: &[u8], r: usize) -> Option<(usize, usize)> {
    let (f, io, n) = layout(b)?;
    if r >= n {
        return None;
    }
    let at = io + r * INDEX_ENTRY_LEN;
    let (off, len) = (u64_at(b, at), u32_at(b, at + 8) as u64);
    let end = off.checked_add(len)?;
    (end <= f as u64 && len >= RECORD_HEADER_LEN as u64).then_some((off as usize, len as usize))
}

/// Repairs every record CRC and the index CRC that can be located, so that mutants reach the checks
/// behind the checksums.
fn fix_checksums(b: &mut [u8]) {
    let Some((f, io, n)) = layout(b) else {
        return;
    };
    for r in 0..n {
        if let Some((off, len)) = record_span(b, r) {
            let mut h = crc32fast::Hasher::new();
            h.update(&b[off..off + 24]);
            h.update(&b[off + RECORD_HEADER_LEN..off + len]);
            let crc = h.finalize();
            put_u32(b, off + 24, crc);
        }
    }
    let crc = crc32fast::hash(&b[io..io + n * INDEX_ENTRY_LEN]);
    put_u32(b, f + 16, crc);
}

/// One random change to a shard; returns its description.
fn mutate_shard(b: &mut Vec<u8>, rng: &mut SplitMix64) -> String {
    let n = layout(b).map(|l| l.2).unwrap_or(0);
    let pick_record = |rng: &mut SplitMix64| if n == 0 { 0 } else { rng.below(n as u64) as usize };
    match rng.below(11) {
        0 if !b.is_empty() => {
            let at = rng.below(b.len() as u64) as usize;
            let bit = rng.below(8);
            b[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        1 if !b.is_empty() => {
            let at = rng.below(b.len() as u64) as usize;
            b[at] = rng.next_u64() as u8;
            format!("set byte {at}")
        }
        2 => {
            let len = rng.below(b.len() as u64 + 1) as usize;
            b.truncate(len);
            format!("truncate to {len} bytes")
        }
        3 => {
            let extra = rng.below(64) as usize + 1;
            b.extend((0..extra).map(|_| rng.next_u64() as u8));
            format!("append {extra} bytes")
        }
        4 | 5 => {
            // A record header field.
            let r = pick_record(rng);
            let Some((off, _)) = record_span(b, r) else { return "no record to edit".into() };
            let (field, name) =
                [(8, "height"), (12, "width"), (20, "payload length"), (4, "label")][rng.below(4) as usize];
            let v = interesting(rng) as u32;
            put_u32(b, off + field, v);
            format!("record {r} {name} = {v}")
        }
        6 => {
            let r = pick_record(rng);
            let Some((off, _)) = record_span(b, r) else { return "no record to edit".into() };
            let (field, name) = [(16, "channels"), (17, "codec")][rng.below(2) as usize];
            let v = interesting(rng) as u8;
            b[off + field] = v;
            format!("record {r} {name} = {v}")
        }
        7 => {
            // An index entry field.
            let Some((_, io, n)) = layout(b) else { return "no index".into() };
            if n == 0 {
                return "empty index".into();
            }
            let r = rng.below(n as u64) as usize;
            let at = io + r * INDEX_ENTRY_LEN;
            let v = interesting(rng);
            match rng.below(3) {
                0 => put_u64(b, at, v),
                1 => put_u32(b, at + 8, v as u32),
                _ => put_u32(b, at + 12, v as u32),
            }
            format!("index entry {r} field = {v}")
        }
        8 => {
            // The footer: index position or record count.
            if b.len() < FOOTER_LEN {
                return "no footer".into();
            }
            let f = b.len() - FOOTER_LEN;
            let v = interesting(rng);
            let (at, name) = if rng.chance(0.5) { (f, "index offset") } else { (f + 8, "record count") };
            put_u64(b, at, v);
            format!("footer {name} = {v}")
        }
        9 => {
            // Swap two index entries (the records are then read in another order).
            let Some((_, io, n)) = layout(b) else { return "no index".into() };
            if n < 2 {
                return "one record".into();
            }
            let (i, j) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
            for k in 0..INDEX_ENTRY_LEN {
                b.swap(io + i * INDEX_ENTRY_LEN + k, io + j * INDEX_ENTRY_LEN + k);
            }
            format!("swap index entries {i} and {j}")
        }
        _ => {
            // Lie in the payload's own header (zstd frame content size or JPEG SOF dimensions), and
            // sometimes make the record agree with the lie.
            let r = pick_record(rng);
            let Some((off, len)) = record_span(b, r) else { return "no record to edit".into() };
            let p = off + RECORD_HEADER_LEN;
            let payload = &b[p..off + len];
            let (h, w) = (interesting(rng) as u32 & 0xffff, interesting(rng) as u32 & 0xffff);
            let c = b[off + 16] as u32;
            let agree = rng.chance(0.5);
            if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                // Frame header descriptor: its top two bits give the content size field's width.
                let fhd = payload.get(4).copied().unwrap_or(0);
                let single = fhd & 0x20 != 0;
                let fcs_len = [usize::from(single), 2, 4, 8][(fhd >> 6) as usize];
                let dict_len = [0, 1, 2, 4][(fhd & 3) as usize];
                let at = p + 5 + usize::from(!single) + dict_len;
                let size = h as u64 * w as u64 * c as u64;
                if fcs_len == 0 || at + fcs_len > off + len {
                    return "zstd frame without a size field".into();
                }
                let stored = if fcs_len == 2 { size.wrapping_sub(256) } else { size };
                b[at..at + fcs_len].copy_from_slice(&stored.to_le_bytes()[..fcs_len]);
            } else if let Some(i) = payload.windows(2).position(|m| m[0] == 0xff && matches!(m[1], 0xc0..=0xc2)) {
                let at = p + i + 5;
                if at + 4 > off + len {
                    return "JPEG SOF cut".into();
                }
                b[at..at + 2].copy_from_slice(&(h as u16).to_be_bytes());
                b[at + 2..at + 4].copy_from_slice(&(w as u16).to_be_bytes());
            } else {
                return "payload of no known kind".into();
            }
            if agree {
                put_u32(b, off + 8, h);
                put_u32(b, off + 12, w);
            }
            format!("record {r} payload header claims {w}x{h} (record agrees: {agree})")
        }
    }
}

/// One random change to a manifest; returns its description.
fn mutate_manifest(text: &mut Vec<u8>, rng: &mut SplitMix64) -> String {
    match rng.below(8) {
        0 if !text.is_empty() => {
            let at = rng.below(text.len() as u64) as usize;
            let bit = rng.below(8);
            text[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        1 => {
            let len = rng.below(text.len() as u64 + 1) as usize;
            text.truncate(len);
            format!("truncate to {len} bytes")
        }
        2 => {
            // Deep nesting.
            let depth = 1 + rng.below(100_000) as usize;
            let mut t = "[".repeat(depth).into_bytes();
            t.extend_from_slice(text);
            t.extend(std::iter::repeat_n(b']', depth));
            *text = t;
            format!("nest in {depth} arrays")
        }
        _ => {
            let Ok(mut m) = serde_json::from_slice::<serde_json::Value>(text) else {
                return "not JSON any more".into();
            };
            let desc = mutate_value(&mut m, rng);
            *text = serde_json::to_vec_pretty(&m).unwrap();
            desc
        }
    }
}

fn mutate_value(m: &mut serde_json::Value, rng: &mut SplitMix64) -> String {
    use serde_json::{json, Value};
    let values = |rng: &mut SplitMix64| -> Value {
        match rng.below(7) {
            0 => json!(-1),
            1 => json!(1e300),
            2 => json!("text"),
            3 => Value::Null,
            4 => json!([]),
            _ => json!(interesting(rng)),
        }
    };
    if !m.is_object() {
        return "not an object".into();
    }
    let shards = m["shards"].as_array().map_or(0, |a| a.len()).max(1);
    let s = rng.below(shards as u64) as usize;
    match rng.below(9) {
        0..=3 => {
            let paths = [
                "/num_images".to_string(),
                "/channels".into(),
                "/format_version".into(),
                "/labelled".into(),
                "/parameters/max_pixels".into(),
                "/parameters/codec".into(),
                format!("/shards/{s}/records"),
                format!("/shards/{s}/bytes"),
                format!("/shards/{s}/file"),
                "/class_counts/0".into(),
                "/pixel_mean/0".into(),
            ];
            let path = &paths[rng.below(paths.len() as u64) as usize];
            let v = if rng.chance(0.7) { json!(interesting(rng)) } else { values(rng) };
            match m.pointer_mut(path) {
                Some(at) => {
                    *at = v.clone();
                    format!("{path} = {v}")
                }
                None => format!("{path} absent"),
            }
        }
        4 => {
            let key = ["classes", "class_counts", "pixel_mean", "pixel_std", "shards", "skipped", "parameters"]
                [rng.below(7) as usize];
            if let Some(o) = m.as_object_mut() {
                o.remove(key);
            }
            format!("remove {key}")
        }
        5 => {
            // Repeat a shard entry many times, counting its images each time.
            let n = 1 + rng.below(5000) as usize;
            if let (Some(e), Some(num)) = (m["shards"].get(s).cloned(), m["num_images"].as_u64()) {
                let records = e["records"].as_u64().unwrap_or(0);
                if let Some(a) = m["shards"].as_array_mut() {
                    a.extend(std::iter::repeat_n(e, n));
                }
                m["num_images"] = json!(num + records * n as u64);
            }
            format!("repeat shard entry {s} {n} times")
        }
        6 => {
            // Many classes (and counts), or labels to match none.
            let n = rng.below(20_000) as usize;
            m["classes"] = json!((0..n).map(|i| format!("class{i}")).collect::<Vec<_>>());
            if rng.chance(0.5) {
                m["class_counts"] = json!(vec![0; n]);
            }
            format!("{n} classes")
        }
        7 => {
            let name = ["shard-00000.bin", "../shard-00000.bin", ".hidden", "", "manifest.json", "/etc/passwd"]
                [rng.below(6) as usize];
            match m.pointer_mut(&format!("/shards/{s}/file")) {
                Some(at) => *at = json!(name),
                None => return "no shard entry".into(),
            }
            format!("shard {s} file = {name:?}")
        }
        _ => {
            let v = interesting(rng);
            m["skipped"] = json!([{ "path": "x".repeat((v % 100_000) as usize), "reason": "r" }]);
            format!("a skipped entry of {} bytes", v % 100_000)
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Running the mutants.

/// Opens and reads everything of the dataset in `dir`, checking what comes back. `Err` is a finding;
/// `Ok` counts the images read and refused.
fn exercise(dir: &Path) -> Result<(usize, usize), String> {
    let debug = std::env::var("SWAV_FUZZ_DEBUG").is_ok();
    let opened = Dataset::open(dir);
    if debug {
        eprintln!(
            "open: {:?} live {} peak {}",
            opened.as_ref().err(),
            counting_alloc::live(),
            counting_alloc::peak_so_far()
        );
    }
    let Ok(ds) = opened else {
        return Ok((0, 0));
    };
    if let Ok(Some(names)) = ds.names() {
        if names.len() != ds.len() {
            return Err(format!("{} names for {} images", names.len(), ds.len()));
        }
    }
    let (mut read, mut refused) = (0, 0);
    let classes = ds.classes().len();
    if !(ds.channels() == 1 || ds.channels() == 3) {
        return Err(format!("opened with {} channels", ds.channels()));
    }
    for i in 0..ds.len() {
        if let Some(l) = ds.label(i) {
            if l as usize >= classes {
                return Err(format!("image {i} has label {l} of {classes} classes"));
            }
        }
        let Ok(img) = ds.image(i) else {
            refused += 1;
            continue;
        };
        read += 1;
        {
            let valid = (img.channels == 1 || img.channels == 3)
                && img.height > 0
                && img.width > 0
                && img.pixels.len() == img.height as usize * img.width as usize * img.channels as usize;
            if !valid {
                return Err(format!(
                    "image {i} is {}x{}x{} with {} bytes",
                    img.width,
                    img.height,
                    img.channels,
                    img.pixels.len()
                ));
            }
        }
    }
    let _ = ds.verify();
    Ok((read, refused))
}

struct Stats {
    cases: u64,
    opened: u64,
    images_read: usize,
    images_refused: usize,
    max_peak: usize,
    max_ratio: f64,
}

/// Runs `cases()` mutants of the seeds made by `mutate`, asserting the properties of the module docs.
fn fuzz(target: &str, salt: u64, mutate: impl Fn(&mut Files, &mut SplitMix64) -> Vec<String>) -> Stats {
    // One target at a time: the allocations of one target's mutations would count in the other's
    // measurements.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seeds(tmp.path());
    let dir: PathBuf = tmp.path().join("case");
    let mut stats = Stats { cases: 0, opened: 0, images_read: 0, images_refused: 0, max_peak: 0, max_ratio: 0.0 };
    let first = std::env::var("SWAV_FUZZ_FIRST").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for case in first..cases() {
        let mut rng = SplitMix64::from_key(&[seed(), salt, case]);
        let mut files = seeds[rng.below(seeds.len() as u64) as usize].clone();
        let changes = mutate(&mut files, &mut rng);
        files.write(&dir);
        let input = files.input_bytes();
        let (outcome, peak) = measure(|| std::panic::catch_unwind(AssertUnwindSafe(|| exercise(&dir))));
        let what = format!("{target} case {case} (seed {}): {}", seed(), changes.join("; "));
        match outcome {
            Err(_) => panic!("{what}: the reader panicked"),
            Ok(Err(finding)) => panic!("{what}: {finding}"),
            Ok(Ok((read, refused))) => {
                stats.opened += u64::from(read + refused > 0);
                stats.images_read += read;
                stats.images_refused += refused;
            }
        }
        let bound = ALLOC_PER_INPUT_BYTE * input + ALLOC_CONSTANT;
        assert!(peak <= bound, "{what}: {peak} bytes allocated for {input} bytes of input (bound {bound})");
        stats.cases += 1;
        stats.max_peak = stats.max_peak.max(peak);
        stats.max_ratio = stats.max_ratio.max(peak as f64 / input as f64);
    }
    println!(
        "{target}: {} cases, {} opened, {} images read and {} refused, peak allocation at most {} bytes, {:.2} bytes per input byte",
        stats.cases, stats.opened, stats.images_read, stats.images_refused, stats.max_peak, stats.max_ratio
    );
    stats
}

#[test]
fn fuzz_shard_records_and_index() {
    let stats = fuzz("shards", 1, |files, rng| {
        let mut changes = Vec::new();
        let s = rng.below(files.shards.len() as u64) as usize;
        for _ in 0..1 + rng.below(3) {
            changes.push(mutate_shard(&mut files.shards[s].1, rng));
        }
        if rng.chance(0.8) {
            fix_checksums(&mut files.shards[s].1);
            changes.push("checksums repaired".into());
        }
        if rng.chance(0.9) {
            files.sync_manifest();
        }
        changes
    });
    // Most mutants must get past the checksums and sizes, or the fuzzing tests little.
    assert!(stats.opened * 4 > stats.cases, "only {} of {} mutants could be opened", stats.opened, stats.cases);
}

#[test]
fn fuzz_manifest() {
    fuzz("manifest", 2, |files, rng| {
        (0..1 + rng.below(2)).map(|_| mutate_manifest(&mut files.manifest, rng)).collect()
    });
}

#[test]
fn fuzz_names() {
    fuzz("names", 3, |files, rng| {
        let Some(names) = files.names.as_mut() else {
            return vec!["no names file".into()];
        };
        // The names file is JSON too: the manifest's mutations apply.
        let mut changes: Vec<String> = (0..1 + rng.below(2)).map(|_| mutate_manifest(names, rng)).collect();
        if rng.chance(0.8) {
            let checksum = format!("crc32:{:08x}", crc32fast::hash(names));
            if let Ok(mut m) = serde_json::from_slice::<serde_json::Value>(&files.manifest) {
                if let Some(entry) = m.get_mut("names").and_then(|e| e.as_object_mut()) {
                    entry.insert("checksum".into(), checksum.into());
                }
                files.manifest = serde_json::to_vec_pretty(&m).unwrap();
                changes.push("checksum repaired".into());
            }
        }
        changes
    });
}
