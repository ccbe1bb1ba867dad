//! Instruction sets chosen at run time. A hot loop is written once, as plain safe Rust, and
//! [`simd_fn!`](crate::simd_fn) compiles it for each x86-64 level (AVX-512, AVX2 + FMA, the baseline);
//! each call runs the best version the CPU has, under a per-thread ceiling that a caller may lower
//! ([`with_ceiling`]) to test or measure a lower level on the same machine.
//!
//! Rust never fuses a multiply and an add, nor reassociates float sums, on its own: every version
//! computes bit-identical results, so what a kernel computes does not depend on the machine, only how
//! fast. That is also why one test of a kernel's logic covers every level it is compiled for.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// The x86-64 levels kernels are compiled for, from least to most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64; anything on other architectures).
    Baseline,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL with AVX2 and FMA (x86-64-v4).
    Avx512,
}

impl Isa {
    /// Every level, least capable first.
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// The name used in settings and reports (`baseline`, `avx2`, `avx512`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("unknown instruction set `{s}` (baseline, avx2, avx512)"))
    }
}

/// The best level this CPU supports (detected once).
pub fn available() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("avx2") && has!("fma") {
        Isa::Avx512
    } else if has!("avx2") && has!("fma") {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Baseline
}

/// Whether the CPU can multiply bfloat16 in hardware: AVX-512 BF16 dot products or AMX tiles. A bf16
/// CPU mode could only pay where one of them exists; elsewhere bf16 would be converted to f32 and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Support {
    /// `vdpbf16ps` and the conversions (AVX512_BF16).
    pub avx512_bf16: bool,
    /// AMX tiles with bf16 products, enabled by the operating system.
    pub amx_bf16: bool,
}

impl Bf16Support {
    /// Whether either exists.
    pub fn any(self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }
}

impl fmt::Display for Bf16Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(f, "avx512_bf16 {}, AMX bf16 {}", yes(self.avx512_bf16), yes(self.amx_bf16))
    }
}

/// bf16 arithmetic this CPU has (read from the kernel's CPU flags, which also say whether the operating
/// system enabled AMX's tile state).
pub fn bf16_support() -> Bf16Support {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = flags.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |name: &str| flags.split_whitespace().any(|f| f == name);
    Bf16Support { avx512_bf16: has("avx512_bf16"), amx_bf16: has("amx_bf16") && has("amx_tile") }
}

thread_local! {
    static CEILING: Cell<Isa> = const { Cell::new(Isa::Avx512) };
}

/// The level kernels run at on this thread: the CPU's best, capped by the thread's ceiling.
#[inline]
pub fn active() -> Isa {
    available().min(CEILING.with(Cell::get))
}

/// Caps the level of this thread's kernels from now on (worker threads call it with their
/// configuration's ceiling when they start).
pub fn set_thread_ceiling(ceiling: Isa) {
    CEILING.with(|c| c.set(ceiling));
}

/// Runs `f` with this thread's kernels capped at `ceiling`, then restores the previous cap.
pub fn with_ceiling<R>(ceiling: Isa, f: impl FnOnce() -> R) -> R {
    struct Restore(Isa);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_thread_ceiling(self.0);
        }
    }
    let _restore = Restore(CEILING.with(|c| c.replace(ceiling)));
    f()
}

static USED: Mutex<BTreeMap<&'static str, Isa>> = Mutex::new(BTreeMap::new());

/// Notes that kernel `name` ran at `isa`. `last` is the kernel's own memo of the level it last
/// reported, so that the table's lock is taken only when a kernel changes level, not on every call.
#[doc(hidden)]
#[inline]
pub fn note_used(name: &'static str, last: &AtomicU8, isa: Isa) {
    if last.load(Ordering::Relaxed) != isa as u8 {
        last.store(isa as u8, Ordering::Relaxed);
        USED.lock().unwrap_or_else(|e| e.into_inner()).insert(name, isa);
    }
}

/// Every kernel written with [`simd_fn!`](crate::simd_fn) that has run in this process, with the level
/// it last ran at, by name (`crate::module::function`): what reports print as "the instruction set each
/// kernel used".
pub fn used() -> Vec<(&'static str, Isa)> {
    USED.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
}

/// Defines `fn NAME(args) -> R` whose `body` is compiled for AVX-512, for AVX2 + FMA and for the
/// baseline, and runs the version [`isa::active`](crate::isa::active) allows. Helpers called from
/// `body` must be `#[inline(always)]` to be compiled for the same level.
#[macro_export]
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            static LAST: ::std::sync::atomic::AtomicU8 = ::std::sync::atomic::AtomicU8::new(u8::MAX);
            let level = $crate::isa::active();
            $crate::isa::note_used(concat!(module_path!(), "::", stringify!($name)), &LAST, level);
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match level {
                    // SAFETY: `active()` never exceeds what the CPU supports (`available()`).
                    $crate::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::isa::Isa::Baseline => {}
                }
            }
            imp($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::simd_fn! {
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            a.iter().zip(b).map(|(x, y)| x * y).sum()
        }
    }

    #[test]
    fn every_level_gives_the_same_bits_and_the_ceiling_is_scoped() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let results: Vec<u32> = Isa::ALL.iter().map(|&i| with_ceiling(i, || dot(&a, &b)).to_bits()).collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
        with_ceiling(Isa::Baseline, || assert_eq!(active(), Isa::Baseline));
        assert_eq!(active(), available());
        assert_eq!("avx2".parse::<Isa>(), Ok(Isa::Avx2));
        let name = concat!(module_path!(), "::dot");
        with_ceiling(Isa::Baseline, || dot(&a, &b));
        assert_eq!(used().into_iter().find(|(n, _)| *n == name), Some((name, Isa::Baseline)));
        dot(&a, &b);
        assert_eq!(used().into_iter().find(|(n, _)| *n == name), Some((name, available())));
    }
}
