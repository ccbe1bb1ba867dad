//! The configuration parser against mutated files and `--set` overrides (bit flips, truncations, deep
//! nesting, huge numbers and long values written into the presets' keys): it returns a configuration or
//! an error naming the problem, never panics, allocates no more than a small multiple of its input, and
//! every configuration it accepts gets a finite memory estimate (what `train` checks against the
//! machine before building anything). One test in this binary, so the counting allocator measures it
//! alone.

use swav_core::alloc_count::CountingAlloc;
use swav_core::rng::SplitMix64;
use swav_train::config::{self, PRESETS};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// Values that break naive code: huge, negative, fractional, non-finite, wrong types, long.
fn hostile_value(rng: &mut SplitMix64) -> String {
    let values = [
        "18446744073709551615",
        "9223372036854775807",
        "-1",
        "0",
        "1e308",
        "nan",
        "inf",
        "0.5",
        "\"x\"",
        "[]",
        "[100000000]",
        "[0, 0]",
        "true",
        "{ a = 1 }",
    ];
    match rng.below(8) {
        0 => format!("\"{}\"", "z".repeat(1 + rng.below(100_000) as usize)),
        1 => format!("[{}]", vec!["1"; 1 + rng.below(10_000) as usize].join(",")),
        _ => values[rng.below(values.len() as u64) as usize].to_string(),
    }
}

/// A `key = value` line of `text` with its value replaced.
fn replace_value(text: &str, rng: &mut SplitMix64) -> (String, String) {
    let lines: Vec<&str> = text.lines().collect();
    let with_values: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
    let i = with_values[rng.below(with_values.len() as u64) as usize];
    let key = lines[i].split(" = ").next().unwrap().trim().to_string();
    let value = hostile_value(rng);
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[i] = format!("{key} = {value}");
    (out.join("\n"), format!("{key} = {}", &value[..value.len().min(40)]))
}

#[test]
fn mutated_configurations_give_errors_not_panics_or_huge_allocations() {
    let cases: u64 = std::env::var("SWAV_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let keys = [
        "model.prototypes",
        "model.width",
        "model.hidden_mlp",
        "model.feat_dim",
        "train.batch_size",
        "train.epochs",
        "train.queue_length",
        "train.crops_for_assign",
        "train.workers",
        "train.base_lr",
        "crops.groups",
    ];
    let mut rng = SplitMix64::new(0xc0f1_9000);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..cases {
        let preset = &PRESETS[rng.below(PRESETS.len() as u64) as usize];
        let mut text = preset.toml.to_string();
        let mut overrides = Vec::new();
        let what = match rng.below(5) {
            0 => {
                let mut bytes = text.into_bytes();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(7); // stays ASCII, so the text stays a string
                }
                text = String::from_utf8(bytes).unwrap();
                "bit flips".to_string()
            }
            1 => {
                text.truncate(rng.below(text.len() as u64) as usize);
                format!("truncated to {} bytes", text.len())
            }
            2 => {
                let depth = 1 + rng.below(50_000) as usize;
                overrides.push(format!("train.epochs={}1{}", "[".repeat(depth), "]".repeat(depth)));
                format!("an override nested {depth} deep")
            }
            3 => {
                let key = keys[rng.below(keys.len() as u64) as usize];
                let value = hostile_value(&mut rng);
                overrides.push(format!("{key}={value}"));
                format!("--set {key}={}", &value[..value.len().min(40)])
            }
            _ => {
                let (t, what) = replace_value(&text, &mut rng);
                text = t;
                what
            }
        };
        let input = text.len() + overrides.iter().map(String::len).sum::<usize>();
        let (result, peak) = ALLOC.measure(|| {
            std::panic::catch_unwind(|| {
                config::load(&text, &overrides).map(|c| swav_train::memory::estimate(&c).total())
            })
        });
        let result = result.unwrap_or_else(|_| panic!("case {case} ({} {what}): the parser panicked", preset.name));
        match &result {
            Ok(total) => {
                accepted += 1;
                assert!(*total > 0, "case {case} ({what}): an accepted configuration with no memory estimate");
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
        let bound = 32 * input + (4 << 20);
        assert!(
            peak <= bound,
            "case {case} ({} {what}): {peak} bytes allocated for {input} bytes of input",
            preset.name
        );
    }
    println!("{cases} mutated configurations: {accepted} accepted, {refused} refused");
    // Both outcomes must occur, or the mutations test little.
    assert!(accepted > cases / 20 && refused > cases / 4, "{accepted} accepted, {refused} refused");
}
