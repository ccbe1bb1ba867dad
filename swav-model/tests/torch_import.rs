//! PyTorch checkpoints read without Python: the fixtures of `scripts/fixtures/make_torch_fixtures.py`
//! (written by PyTorch itself) come back with PyTorch's names, shapes and values, load into `SwavModel`
//! and give PyTorch's eval-mode features; hostile files are refused with errors that name the problem;
//! mutated and truncated files never panic and never allocate beyond a bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use swav_model::checkpoint::{load_model_state, LoadOptions, NamedTensors, Value};
use swav_model::torch::{is_torch_file, read_torch_bytes, read_torch_file, Container, TorchFormat};
use swav_model::{ModelConfig, ModelError, SwavModel};

// ---- a per-thread counting allocator: peak live bytes while a closure runs ----

struct Counting;

thread_local! {
    /// (tracking, live bytes, peak live bytes) of this thread since `peak_alloc` started.
    static TRACK: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

fn account(delta: isize) {
    let _ = TRACK.try_with(|t| {
        let (on, live, peak) = t.get();
        if on {
            let live = live + delta;
            t.set((on, live, peak.max(live)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the peak of bytes it held allocated at once.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    TRACK.with(|t| t.set((true, 0, 0)));
    let out = f();
    let (_, _, peak) = TRACK.with(|t| t.replace((false, 0, 0)));
    (out, peak.max(0) as usize)
}

// ---- fixtures ----

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

#[derive(serde::Deserialize)]
struct Manifest {
    torch: String,
    fixtures: Vec<Fixture>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    file: String,
    kind: String,
    expect: String,
    format: String,
    container: Vec<String>,
    prefix: String,
    entries: std::collections::BTreeMap<String, String>,
    model_config: Option<ModelConfig>,
    strict: bool,
    globals: Vec<String>,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(dir().join("manifest.json"))
        .expect("manifest.json: run scripts/fixtures/make_torch_fixtures.py");
    serde_json::from_str(&text).expect("manifest.json parses")
}

fn expect(f: &Fixture) -> NamedTensors {
    NamedTensors::read(&dir().join(&f.expect)).expect("expect file reads")
}

/// `value.<name>` entries of an expect file, with the fixture's `module.` prefix applied.
fn expected_values(f: &Fixture, e: &NamedTensors) -> Vec<(String, Value)> {
    e.tensors
        .iter()
        .filter_map(|(k, v)| Some((format!("{}{}", f.prefix, k.strip_prefix("value.")?), v.clone())))
        .collect()
}

/// Bitwise equality (so that -0.0 and 0.0 differ, and any rounding shows).
fn same_bits(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32 { shape: sa, data: da }, Value::F32 { shape: sb, data: db }) => {
            sa == sb && da.len() == db.len() && da.iter().zip(db).all(|(x, y)| x.to_bits() == y.to_bits())
        }
        (Value::I64 { shape: sa, data: da }, Value::I64 { shape: sb, data: db }) => sa == sb && da == db,
        _ => false,
    }
}

#[test]
fn every_fixture_reads_with_pytorchs_names_shapes_and_values() {
    let m = manifest();
    assert!(m.fixtures.len() >= 9, "manifest lists {} fixtures", m.fixtures.len());
    for f in &m.fixtures {
        let file = read_torch_file(&dir().join(&f.file)).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        let want_format = if f.format == "zip" { TorchFormat::Zip } else { TorchFormat::Legacy };
        assert_eq!(file.format, want_format, "{}", f.file);
        let want_container = if f.container.is_empty() { Container::Bare } else { Container::Key(f.container.clone()) };
        assert_eq!(file.container, want_container, "{}", f.file);
        assert_eq!(file.entries, f.entries, "{}", f.file);
        let want = expected_values(f, &expect(f));
        let got_names: BTreeSet<&String> = file.state.tensors.keys().collect();
        let want_names: BTreeSet<&String> = want.iter().map(|(k, _)| k).collect();
        assert_eq!(got_names, want_names, "{}: tensor names", f.file);
        for (name, value) in &want {
            let got = &file.state.tensors[name];
            assert_eq!(got.shape(), value.shape(), "{}: shape of {name}", f.file);
            assert!(same_bits(got, value), "{}: values of {name} differ from PyTorch's", f.file);
        }
        eprintln!("{} ({:?}, {}): {} tensors, torch {}", f.file, file.format, file.container, want.len(), m.torch);
    }
}

#[test]
fn real_files_name_only_allowed_globals() {
    // What PyTorch actually wrote (read by pickletools in the script): the allow-list is not wider
    // than what state dicts need, and the fixtures do exercise every entry of it.
    let allowed: BTreeSet<String> =
        ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"]
            .into_iter()
            .map(String::from)
            .chain(
                ["Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool"]
                    .iter()
                    .map(|t| format!("torch.{t}Storage")),
            )
            .collect();
    let used: BTreeSet<String> = manifest().fixtures.iter().flat_map(|f| f.globals.clone()).collect();
    assert_eq!(used, allowed);
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn weights_load_into_swav_model_and_give_pytorchs_features() {
    let mut checked = 0;
    for f in manifest().fixtures.iter().filter(|f| f.kind == "model") {
        let file = read_torch_file(&dir().join(&f.file)).unwrap();
        let config = f.model_config.clone().expect("model fixtures carry their configuration");
        let mut model = SwavModel::new(config, 123).unwrap();
        let opts = LoadOptions { allow_missing: !f.strict, allow_unexpected: !f.strict };
        let report = load_model_state(&mut model, &file.state, "", opts).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        if !f.strict {
            // torchvision's classifier is not part of a SwAV backbone; SwAV's head is not in torchvision.
            assert_eq!(report.unexpected, ["fc.bias", "fc.weight"], "{}", f.file);
            assert!(
                report.missing.iter().all(|n| n.starts_with("projection_head.") || n.starts_with("prototypes")),
                "{:?}",
                report.missing
            );
        }
        let e = expect(f);
        let images = e.tensor("input.images").unwrap();
        let (fshape, want) = e.f32("expect.features").unwrap();
        let got = model.features(&images).unwrap();
        assert_eq!(got.shape(), fshape, "{}", f.file);
        let err = rel_l2(&got.to_vec(), want);
        eprintln!("{}: features relative L2 error {err:.2e}", f.file);
        assert!(err < 1e-5, "{}: features differ from PyTorch's by {err:.2e}", f.file);
        checked += 1;
    }
    assert_eq!(checked, 6, "a, b, c, d, e and the torchvision ResNet");
}

#[test]
fn hostile_files_are_refused_with_errors_that_name_the_problem() {
    let cases: &[(&str, &[&str])] = &[
        ("hostile_eval.pth", &["refusing global builtins.eval"]),
        ("hostile_os_system.pth", &["refusing global os.system"]),
        ("hostile_reduce_system.pkl", &["refusing global posix.system"]),
        ("hostile_truncated.pth", &["zip archive", "truncated"]),
        ("hostile_offset.pth", &["tensor `w`", "storage offset 3", "past the end of storage `0`"]),
        ("hostile_huge.pth", &["tensor `w`", "claims 1152921504606846976 elements", "holds 4"]),
        ("hostile_short_storage.pth", &["storage `0`", "claims 1000", "16 bytes"]),
        ("hostile_deep.pth", &["nested deeper than 64"]),
        ("hostile_legacy_count.pth", &["storage `0`", "claims 4611686018427387904", "remain"]),
    ];
    for (file, fragments) in cases {
        let path = dir().join(file);
        let (result, peak) = peak_alloc(|| read_torch_file(&path));
        let err = match result {
            Err(e @ ModelError::Torch { .. }) => e.to_string(),
            Err(other) => panic!("{file}: wrong error kind: {other}"),
            Ok(_) => panic!("{file}: read without error"),
        };
        assert!(err.contains(file), "{file}: the error names the file: {err}");
        for fragment in *fragments {
            assert!(err.contains(fragment), "{file}: `{fragment}` missing from: {err}");
        }
        // Refused before allocating anything proportional to what the file claims.
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(peak < 96 * len + (1 << 16), "{file}: {peak} bytes allocated for a {len}-byte file");
    }
}

#[test]
fn errors_name_memory_inputs_and_io_failures() {
    let err = read_torch_bytes(b"\x80\x02cos\nsystem\n").unwrap_err().to_string();
    assert!(err.contains("<memory>") && err.contains("refusing global os.system"), "{err}");
    let err = read_torch_bytes(b"plain text").unwrap_err().to_string();
    assert!(err.contains("not a PyTorch file"), "{err}");
    // A plain pickle is not a legacy PyTorch stream.
    let err = read_torch_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.").unwrap_err().to_string();
    assert!(err.contains("not PyTorch's magic number"), "{err}");
    let err = read_torch_file(&dir().join("absent.pth")).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
    // An archive whose pickle holds no tensors says what it found instead.
    let no_tensors = zip_of(&[("x/data.pkl".into(), b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.".to_vec())]);
    let err = read_torch_bytes(&no_tensors).unwrap_err().to_string();
    assert!(err.contains("no state dict") && err.contains("is a dict"), "{err}");
    let err = read_torch_bytes(&zip_of(&[("x/other.pkl".into(), vec![])])).unwrap_err().to_string();
    assert!(err.contains("no `<folder>/data.pkl` entry"), "{err}");
}

#[test]
fn torch_files_are_told_from_safetensors_by_content() {
    for f in manifest().fixtures {
        let bytes = std::fs::read(dir().join(&f.file)).unwrap();
        assert!(is_torch_file(&bytes[..16]), "{}", f.file);
        let expect = std::fs::read(dir().join(&f.expect)).unwrap();
        assert!(!is_torch_file(&expect[..16]), "{}", f.expect);
    }
    // A safetensors header of 640 bytes starts `80 02 00 ..`, like a protocol-2 pickle.
    let mut st = 640u64.to_le_bytes().to_vec();
    st.extend(b"{\"a\":1}");
    assert!(!is_torch_file(&st));
    assert!(!is_torch_file(b""));
    assert!(!is_torch_file(b"\x80"));
    assert!(!is_torch_file(b"GIF89a......"));
}

// ---- mutations ----

/// xorshift64*: a fixed seed gives the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random corruption: a truncation, a flipped bit, a byte set to an edge value, or 4/8 bytes
/// replaced by an extreme integer (the fields that hold lengths, counts and sizes).
fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut b = original.to_vec();
    let at = rng.below(b.len());
    match rng.below(5) {
        0 => b.truncate(at),
        1 => b[at] ^= 1 << rng.below(8),
        2 => b[at] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'(', b'R', b'c', b'.'][rng.below(9)],
        3 => {
            let v = [u32::MAX, 1 << 31, 0x7fff_ffff, 1 << 20][rng.below(4)];
            let end = (at + 4).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
        _ => {
            let v = [u64::MAX, 1 << 62, 1 << 60, 1 << 32][rng.below(4)];
            let end = (at + 8).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
    }
    b
}

/// The stored entries of a zip fixture, to rebuild it around a mutated pickle (a mutation of the
/// archive itself would mostly be stopped by the CRC before reaching the pickle).
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let archive = rawzip::ZipArchive::from_slice(bytes).unwrap();
    let mut entries = archive.entries();
    let mut out = Vec::new();
    while let Some(record) = entries.next_entry().unwrap() {
        let name = String::from_utf8(record.file_path().as_bytes().to_vec()).unwrap();
        let data = archive.get_entry(record.wayfinder()).unwrap().data().to_vec();
        out.push((name, data));
    }
    out
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut archive = rawzip::ZipArchiveWriter::new(&mut out);
    for (name, data) in entries {
        let (mut entry, config) =
            archive.new_file(name).compression_method(rawzip::CompressionMethod::STORE).start().unwrap();
        let mut writer = config.wrap(&mut entry);
        writer.write_all(data).unwrap();
        let (_, descriptor) = writer.finish().unwrap();
        entry.finish(descriptor).unwrap();
    }
    archive.finish().unwrap();
    out
}

/// Reads `bytes` (which must not panic) and checks the peak allocation against the file's size.
fn read_bounded(bytes: &[u8], what: &str, worst: &mut f64) -> bool {
    let (result, peak) = peak_alloc(|| std::panic::catch_unwind(|| read_torch_bytes(bytes).is_ok()));
    let ok = result.unwrap_or_else(|_| panic!("{what}: the reader panicked"));
    // Pickle objects take at most one 32-byte node and a stack slot per input byte, up to twice that
    // while a vector doubles (80x at worst, see `opcode_floods_...`), and tensors at most 16x the file.
    let bound = 96 * bytes.len() + (1 << 16);
    assert!(peak <= bound, "{what}: {peak} bytes allocated for a {}-byte input", bytes.len());
    *worst = worst.max(peak as f64 / bytes.len().max(1) as f64);
    ok
}

#[test]
fn mutated_and_truncated_files_never_panic_nor_overallocate() {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    // More cases per file for a longer hunt: SWAV_TORCH_MUTATIONS=100000.
    let cases: usize = std::env::var("SWAV_TORCH_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut worst = 0.0f64;
    let (mut accepted, mut refused) = (0, 0);
    let mut tally = |ok: bool| if ok { accepted += 1 } else { refused += 1 };
    // Whole files: every container layer (zip directory, legacy stream, storage counts).
    for file in ["views.pth", "views_legacy.pth", "nested.pth", "swav_r50w4_legacy.pth.tar", "views_bigendian.pth"] {
        let original = std::fs::read(dir().join(file)).unwrap();
        for step in 0..cases {
            let bytes = mutate(&mut rng, &original);
            tally(read_bounded(&bytes, &format!("{file} mutation {step}"), &mut worst));
        }
        // Every truncation point of the small files, a sample of the large one.
        let stride = (original.len() / 400).max(1);
        for cut in (0..original.len()).step_by(stride) {
            tally(read_bounded(&original[..cut], &format!("{file} cut at {cut}"), &mut worst));
        }
    }
    // The pickle inside a valid zip: the machine and the view checks, past the CRC.
    for file in ["views.pth", "nested.pth", "swav_r50w4_checkpoint.pth"] {
        let entries = zip_entries(&std::fs::read(dir().join(file)).unwrap());
        let pkl = entries.iter().position(|(n, _)| n.ends_with("/data.pkl")).unwrap();
        for step in 0..cases {
            let mut mutated = entries.clone();
            mutated[pkl].1 = mutate(&mut rng, &entries[pkl].1);
            let bytes = zip_of(&mutated);
            tally(read_bounded(&bytes, &format!("{file} pickle mutation {step}"), &mut worst));
        }
    }
    eprintln!("mutations: {accepted} read, {refused} refused; worst peak allocation {worst:.1}x the input");
    assert!(
        refused > 1000 && accepted > 50,
        "the mutations exercise both outcomes ({accepted} read, {refused} refused)"
    );
}

#[test]
fn opcode_floods_stay_within_the_allocation_bound() {
    // Just past a power of two, so that the arena and the stack have just doubled their capacity.
    const N: usize = (1 << 17) + 1;
    let floods: Vec<(&str, Vec<u8>)> = vec![
        ("EMPTY_LIST", [b"\x80\x02".to_vec(), vec![b']'; N], b".".to_vec()].concat()),
        ("EMPTY_DICT", [b"\x80\x02".to_vec(), vec![b'}'; N], b".".to_vec()].concat()),
        ("NONE", [b"\x80\x02".to_vec(), vec![b'N'; N], b".".to_vec()].concat()),
        ("MARK", [b"\x80\x02".to_vec(), vec![b'('; N], b".".to_vec()].concat()),
        ("DUP", [b"\x80\x02N".to_vec(), vec![b'2'; N], b".".to_vec()].concat()),
        ("MEMOIZE", [b"\x80\x02N".to_vec(), vec![0x94; N], b".".to_vec()].concat()),
        ("BININT1", [b"\x80\x02".to_vec(), b"K\x07".repeat(N / 2), b".".to_vec()].concat()),
        ("LIST", [b"\x80\x02(".to_vec(), vec![b'N'; N], b"l.".to_vec()].concat()),
        ("DICT", [b"\x80\x02(".to_vec(), vec![b'N'; N], b"d.".to_vec()].concat()),
        ("APPENDS", [b"\x80\x02](".to_vec(), vec![b'N'; N], b"e.".to_vec()].concat()),
        ("SETITEMS", [b"\x80\x02}(".to_vec(), vec![b'N'; N], b"u.".to_vec()].concat()),
        ("TUPLE", [b"\x80\x02(".to_vec(), vec![b'N'; N], b"t.".to_vec()].concat()),
    ];
    for (name, bytes) in &floods {
        let mut worst = 0.0;
        assert!(!read_bounded(bytes, name, &mut worst), "{name}: no tensors, so no state dict");
        eprintln!("{name}: peak allocation {worst:.1}x the input");
    }
}

/// With `SWAV_TORCH_CHECKPOINT=/path/to/swav_800ep_pretrain.pth.tar` (the official release, or any file
/// with the official ResNet-50 names), checks that it reads, is recognised as the official configuration
/// and loads into it with no tensor missing or left over, directly and as a model file. Without the
/// variable this test does nothing.
#[test]
fn the_official_checkpoint_loads_when_available() {
    let Some(path) = std::env::var_os("SWAV_TORCH_CHECKPOINT") else {
        eprintln!("SWAV_TORCH_CHECKPOINT not set: skipped");
        return;
    };
    let start = std::time::Instant::now();
    let file = read_torch_file(Path::new(&path)).unwrap();
    let read = start.elapsed();
    let detected = swav_model::detect(&file.state, None).unwrap();
    assert_eq!(detected.config, ModelConfig::swav_resnet50(), "the network recognised from its shapes");
    assert!(detected.head && detected.ignored.is_empty());
    let mut model = SwavModel::new(ModelConfig::swav_resnet50(), 0).unwrap();
    let report = load_model_state(&mut model, &file.state, "", LoadOptions::default()).unwrap();
    let as_model_file = swav_model::ModelFile::read(Path::new(&path)).unwrap();
    assert_eq!(as_model_file.model.config, ModelConfig::swav_resnet50());
    eprintln!(
        "{:?}: {:?} format, {}, {} tensors read in {read:.2?}, {} loaded",
        path,
        file.format,
        file.container,
        file.state.tensors.len(),
        report.loaded
    );
}
