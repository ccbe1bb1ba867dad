//! What the machine can give: memory and cores, so that a size or a count from a file or a command
//! line never asks for more than the machine has.

/// The memory the system can still hand out (`MemAvailable` of `/proc/meminfo`), in bytes; `None`
/// where it cannot be read.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Logical cores of this machine (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most threads worth starting for compute or loading on this machine: beyond a few per core they
/// only cost memory (each has a stack) and scheduling.
pub fn max_threads() -> usize {
    (4 * cores()).clamp(4, 1024)
}

/// `requested` threads capped at [`max_threads`]: the count to use and, when capped, what to tell the
/// user.
pub fn cap_threads(requested: usize, what: &str) -> (usize, Option<String>) {
    let max = max_threads();
    if requested > max {
        (max, Some(format!("{what}: {requested} threads requested, using {max} ({} cores here)", cores())))
    } else {
        (requested.max(1), None)
    }
}

/// The CPU's name and generation as `/proc/cpuinfo` gives them (`Intel(R) Xeon(R) Processor, family 6
/// model 143`), or the architecture where that cannot be read: benchmark reports name the machine.
pub fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match (field("model name"), field("cpu family"), field("model")) {
        (Some(name), Some(family), Some(model)) => format!("{name}, family {family} model {model}"),
        (Some(name), _, _) => name,
        _ => std::env::consts::ARCH.to_string(),
    }
}

/// Bytes in human units (`1.5 GiB`).
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_units() {
        let (n, msg) = cap_threads(100_000, "--threads");
        assert_eq!(n, max_threads());
        assert!(msg.unwrap().contains("100000"));
        assert_eq!(cap_threads(2, "x"), (2, None));
        assert!(!cpu_model().is_empty());
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        if cfg!(target_os = "linux") {
            assert!(available_memory().unwrap() > 1 << 20);
        }
    }
}
