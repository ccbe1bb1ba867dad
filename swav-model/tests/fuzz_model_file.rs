//! The model-file reader against mutated files (bit flips, truncations, huge numbers written into the
//! safetensors header and into the model configuration): it returns a model or an error, never
//! panics, and never allocates more than a small multiple of the file's own size.
//! One test in this binary, so the counting allocator measures it alone.

use std::collections::BTreeMap;

use swav_core::alloc_count::CountingAlloc;
use swav_core::rng::SplitMix64;
use swav_model::{Arch, ModelConfig, ModelFile, Preprocessing, SwavModel};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

fn valid_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let cfg = ModelConfig {
        arch: Arch::Resnet18,
        width: Some(4),
        small_stem: true,
        in_channels: 1,
        hidden_mlp: 8,
        head_bn: true,
        feat_dim: 4,
        prototypes: vec![5],
        sync_bn: false,
        sync_bn_group: 0,
    };
    let mut m = SwavModel::new(cfg, 1).unwrap();
    let pre = Preprocessing::recorded(&m.config, vec![0.5], vec![0.25], 28).unwrap();
    ModelFile::write(&mut m, &pre, &BTreeMap::new(), &path).unwrap();
    std::fs::read(&path).unwrap()
}

/// Replaces the `nth` run of digits of the JSON header with `digits`, fixing the header length.
fn replace_number(file: &[u8], nth: usize, digits: &str) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&file[8..8 + n]).into_owned();
    let runs: Vec<(usize, usize)> = {
        let b = header.as_bytes();
        let mut v = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() {
                let s = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    let (s, e) = runs[nth % runs.len()];
    let new_header = format!("{}{digits}{}", &header[..s], &header[e..]);
    let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(new_header.as_bytes());
    out.extend_from_slice(&file[8 + n..]);
    out
}

#[test]
fn mutated_model_files_give_errors_not_panics_or_huge_allocations() {
    let valid = valid_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.safetensors");
    let mut rng = SplitMix64::new(0x5eed);
    let huge = ["4611686018427387904", "18446744073709551615", "99999999999", "1000000000", "0"];
    let cases: usize = std::env::var("SWAV_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut errors = 0;
    for case in 0..cases {
        let mut bytes = valid.clone();
        match case % 4 {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
            _ => {
                bytes = replace_number(&bytes, rng.below(10_000) as usize, huge[rng.below(huge.len() as u64) as usize])
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let (result, peak) = ALLOC.measure(|| std::panic::catch_unwind(|| ModelFile::read(&path).map(|_| ())));
        let result = result.unwrap_or_else(|_| panic!("case {case}: the reader panicked"));
        errors += result.is_err() as usize;
        let bound = 8 * bytes.len() + (8 << 20);
        assert!(peak <= bound, "case {case}: {peak} bytes allocated for a {}-byte file ({result:?})", bytes.len());
    }
    // Most mutants are refused; a flipped bit in a weight's mantissa may still be a valid model.
    assert!(errors > cases / 2, "{errors} errors in {cases} cases");
}
