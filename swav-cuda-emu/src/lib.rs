//! swav-cuda-emu: runs CUDA C kernels on the CPU, so that kernels are tested where there is no GPU.
//!
//! Give it the kernel sources (the same text NVRTC compiles); it compiles them as C++20 with the host
//! compiler and a shim of the CUDA built-ins, caches the result, and runs launches described as data
//! (kernel name, grid, block, dynamic shared memory, arguments) on [`Buffer`]s. The dispatch is generated
//! from the `extern "C" __global__` signatures, so a new kernel needs no glue.
//!
//! ```no_run
//! use swav_cuda_emu::{Arg, Buffer, Emulator, Launch, Schedule, Source};
//! let src = r#"extern "C" __global__ void twice(float* x, int n) {
//!     int i = blockIdx.x * blockDim.x + threadIdx.x;
//!     if (i < n) x[i] *= 2.0f;
//! }"#;
//! let emu = Emulator::new(&[Source { name: "twice.cu", code: src }])?;
//! let mut bufs = vec![Buffer::from_f32(&[1.0, 2.0, 3.0])];
//! let launch = Launch::new("twice", [1, 1, 1], [32, 1, 1], vec![Arg::Buf(0), Arg::I32(3)]);
//! emu.launch(&launch, &mut bufs, Schedule::Forward)?;
//! assert_eq!(bufs[0].as_f32(), &[2.0, 4.0, 6.0]);
//! # Ok::<(), swav_cuda_emu::EmuError>(())
//! ```
//!
//! What it checks beyond the values: argument kinds and element types against the signature; writes just
//! outside a buffer (guard zones); barriers that part of a block never reaches (deadlock, reported);
//! shuffles from lanes that do not take part; reads of shared memory or scratch before they are written
//! (they read NaN). Races between threads show up as results that differ between [`Schedule::Forward`]
//! and [`Schedule::Reverse`]. See `shim.hpp` for the execution model and its one restriction:
//! warp-synchronous built-ins (`__shfl_*_sync`, `__syncwarp`) are called by every live lane of the warp
//! together, with the full mask.
//!
//! Not checked: reads outside buffers, and anything about speed, occupancy or NVRTC itself (the NVRTC
//! compile check does that part).

#![warn(missing_docs)]

mod buffer;
mod compile;
mod parse;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use buffer::{bf16_from_f32, bf16_to_f32, round_bf16, Buffer};
pub use parse::{parse_kernels, Elem, KernelSig, Param, ParamKind, Scalar};

/// One kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// File name, used in compiler messages.
    pub name: &'a str,
    /// The CUDA C text.
    pub code: &'a str,
}

/// A kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// The buffer at this index of the buffers passed to [`Emulator::launch`].
    Buf(usize),
    /// A null pointer (for optional inputs and outputs).
    Null,
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
}

/// One kernel launch, as data.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The `extern "C"` name.
    pub kernel: String,
    /// Blocks per dimension.
    pub grid: [u32; 3],
    /// Threads per block per dimension.
    pub block: [u32; 3],
    /// Bytes of dynamic (`extern __shared__`) shared memory per block.
    pub shared_bytes: u32,
    /// The arguments, in the kernel's parameter order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// A launch without dynamic shared memory.
    pub fn new(kernel: &str, grid: [u32; 3], block: [u32; 3], args: Vec<Arg>) -> Launch {
        Launch { kernel: kernel.to_string(), grid, block, shared_bytes: 0, args }
    }
}

/// The order in which blocks are started and threads run between barriers. A correct kernel gives
/// the same bits under both (barring float atomics); a difference points at a race.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Ascending block and thread indices.
    Forward,
    /// Descending block and thread indices.
    Reverse,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmuError {
    /// No host C++ compiler: emulation is impossible here (tests skip).
    NoCompiler(String),
    /// The sources do not compile as emulated C++, or the object does not link or load.
    Compile(String),
    /// A kernel signature could not be read.
    Parse(String),
    /// The launch does not fit the kernel (name, argument count, kinds, buffer types).
    Arguments(String),
    /// The kernel failed while running (deadlock, bad shuffle, bad launch shape, `__trap`).
    Launch(String),
    /// A kernel wrote outside a buffer.
    Overrun(String),
}

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmuError::NoCompiler(m) => write!(f, "no C++ compiler: {m}"),
            EmuError::Compile(m) => write!(f, "building the emulation: {m}"),
            EmuError::Parse(m) => write!(f, "reading kernel signatures: {m}"),
            EmuError::Arguments(m) => write!(f, "launch arguments: {m}"),
            EmuError::Launch(m) => write!(f, "emulated kernel failed: {m}"),
            EmuError::Overrun(m) => write!(f, "out-of-bounds write: {m}"),
        }
    }
}

impl std::error::Error for EmuError {}

/// Must match `emu::RawArg` in shim.hpp.
#[repr(C)]
struct RawArg {
    kind: u32,
    elem: u32,
    bits: u64,
    ptr: *mut u8,
}

/// Must match `emu::RawLaunch` in shim.hpp.
#[repr(C)]
struct RawLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u64,
    reverse: u32,
    workers: u32,
    args: *const RawArg,
    nargs: u64,
    error: *mut u8,
    error_len: u64,
}

type Entry = unsafe extern "C" fn(*const RawLaunch) -> i32;

struct Kernel {
    sig: KernelSig,
    entry: Entry,
}

/// The emulation of a set of kernel sources.
pub struct Emulator {
    // Keeps the shared object loaded while `kernels` holds its function pointers.
    _lib: Arc<libloading::Library>,
    kernels: HashMap<String, Kernel>,
    workers: u32,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.kernels.keys().collect();
        names.sort();
        write!(f, "Emulator({names:?})")
    }
}

/// Loaded objects by path: a process loads each build once.
static LOADED: Mutex<Vec<(std::path::PathBuf, Arc<libloading::Library>)>> = Mutex::new(Vec::new());

impl Emulator {
    /// Builds (or reuses from the cache) the emulation of `sources`. Kernel names must be unique across
    /// the sources (as the runtime looks them up by name).
    pub fn new(sources: &[Source<'_>]) -> Result<Emulator, EmuError> {
        let sigs = sources
            .iter()
            .map(|s| parse::parse_kernels(s.code).map_err(|e| EmuError::Parse(format!("{}: {e}", s.name))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::HashSet::new();
        for k in sigs.iter().flatten() {
            if !seen.insert(k.name.clone()) {
                return Err(EmuError::Parse(format!("kernel {} is defined twice", k.name)));
            }
        }
        // One build at a time in this process (builds are rare and use every core).
        let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
        let path = compile::build(sources, &sigs)?;
        let lib = match loaded.iter().find(|(p, _)| *p == path) {
            Some((_, lib)) => lib.clone(),
            None => {
                // SAFETY: the object is ours; its initialisers only set up thread-local variables.
                let lib = unsafe { libloading::Library::new(&path) }
                    .map_err(|e| EmuError::Compile(format!("loading {}: {e}", path.display())))?;
                let lib = Arc::new(lib);
                loaded.push((path.clone(), lib.clone()));
                lib
            }
        };
        drop(loaded);
        let mut kernels = HashMap::new();
        for sig in sigs.into_iter().flatten() {
            let symbol = format!("emu_kernel_{}\0", sig.name);
            // SAFETY: the generated entry points all have the `Entry` signature.
            let entry: Entry = unsafe {
                *lib.get::<Entry>(symbol.as_bytes())
                    .map_err(|e| EmuError::Compile(format!("entry of {}: {e}", sig.name)))?
            };
            kernels.insert(sig.name.clone(), Kernel { sig, entry });
        }
        let workers = std::env::var("SWAV_EMU_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get().min(4)).unwrap_or(1) as u32)
            .max(1);
        Ok(Emulator { _lib: lib, kernels, workers })
    }

    /// For tests: the emulator, or None (printing `SKIPPED: ...`) when there is no C++ compiler or
    /// `SWAV_SKIP_EMULATOR=1` (the GPU check, which runs the same tests on the real device). With
    /// `SWAV_REQUIRE_EMULATOR=1` a missing compiler is a failure. Any other error panics with its message.
    pub fn new_or_skip(sources: &[Source<'_>]) -> Option<Emulator> {
        if std::env::var("SWAV_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED: the emulator (SWAV_SKIP_EMULATOR=1)");
            return None;
        }
        match Emulator::new(sources) {
            Ok(e) => Some(e),
            Err(EmuError::NoCompiler(m)) => {
                if std::env::var("SWAV_REQUIRE_EMULATOR").is_ok_and(|v| v == "1") {
                    panic!("SWAV_REQUIRE_EMULATOR=1 but {m}");
                }
                eprintln!("SKIPPED: {m}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The signature of `kernel`, if the sources define it.
    pub fn signature(&self, kernel: &str) -> Option<&KernelSig> {
        self.kernels.get(kernel).map(|k| &k.sig)
    }

    /// Host threads that run blocks concurrently (`$SWAV_EMU_WORKERS`, default: the cores, at most 4).
    pub fn set_workers(&mut self, workers: u32) {
        self.workers = workers.max(1);
    }

    /// Runs `launch` to completion on `buffers` (indexed by [`Arg::Buf`]).
    pub fn launch(&self, launch: &Launch, buffers: &mut [Buffer], schedule: Schedule) -> Result<(), EmuError> {
        let kernel = self
            .kernels
            .get(&launch.kernel)
            .ok_or_else(|| EmuError::Arguments(format!("no kernel named {} in the sources", launch.kernel)))?;
        let raw = check_args(&kernel.sig, &launch.args, buffers)?;
        let mut error = vec![0u8; 1024];
        let desc = RawLaunch {
            grid: launch.grid,
            block: launch.block,
            shared_bytes: launch.shared_bytes as u64,
            reverse: (schedule == Schedule::Reverse) as u32,
            workers: self.workers,
            args: raw.as_ptr(),
            nargs: raw.len() as u64,
            error: error.as_mut_ptr(),
            error_len: error.len() as u64,
        };
        // SAFETY: the arguments match the signature (checked above, and again on the C++ side) and
        // point into `buffers`, which outlive the call. What the kernel does with them is what is
        // being tested; the guard zones catch the usual overruns.
        let status = unsafe { (kernel.entry)(&desc) };
        if status != 0 {
            let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
            return Err(EmuError::Launch(format!("{}: {}", launch.kernel, String::from_utf8_lossy(&error[..end]))));
        }
        for (i, a) in launch.args.iter().enumerate() {
            if let Arg::Buf(b) = a {
                if let Some(side) = buffers[*b].damaged_guard() {
                    return Err(EmuError::Overrun(format!(
                        "{} wrote {side} of buffer {b} (argument {i}, `{}`)",
                        launch.kernel, kernel.sig.params[i].name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Runs launches in order (one stream).
    pub fn run(&self, launches: &[Launch], buffers: &mut [Buffer], schedule: Schedule) -> Result<(), EmuError> {
        launches.iter().try_for_each(|l| self.launch(l, buffers, schedule))
    }
}

/// Checks `args` against `sig` and lowers them for the C++ side.
fn check_args(sig: &KernelSig, args: &[Arg], buffers: &mut [Buffer]) -> Result<Vec<RawArg>, EmuError> {
    let bad = |m: String| EmuError::Arguments(format!("{}: {m}", sig.name));
    if args.len() != sig.params.len() {
        return Err(bad(format!("{} arguments given, the kernel takes {}", args.len(), sig.params.len())));
    }
    let mut raw = Vec::with_capacity(args.len());
    for (a, p) in args.iter().zip(&sig.params) {
        let scalar = |kind: u32, want: Scalar, bits: u64| match p.kind {
            ParamKind::Scalar(s) if s == want => Ok(RawArg { kind, elem: 0, bits, ptr: std::ptr::null_mut() }),
            _ => Err(bad(format!("`{}` is {:?}, given {a:?}", p.name, p.kind))),
        };
        raw.push(match *a {
            Arg::Buf(i) => {
                let buf = buffers.get_mut(i).ok_or_else(|| bad(format!("`{}`: no buffer {i}", p.name)))?;
                match p.kind {
                    ParamKind::Ptr { elem, .. } if elem == buf.elem() => {
                        RawArg { kind: 0, elem: elem.code(), bits: 0, ptr: buf.data_mut_ptr() }
                    }
                    _ => return Err(bad(format!("`{}` is {:?}, given a buffer of {:?}", p.name, p.kind, buf.elem()))),
                }
            }
            Arg::Null => match p.kind {
                ParamKind::Ptr { .. } => RawArg { kind: 0, elem: 99, bits: 0, ptr: std::ptr::null_mut() },
                _ => return Err(bad(format!("`{}` is a scalar, given a null pointer", p.name))),
            },
            Arg::I32(v) => scalar(1, Scalar::I32, v as u32 as u64)?,
            Arg::U32(v) => scalar(2, Scalar::U32, v as u64)?,
            Arg::F32(v) => scalar(3, Scalar::F32, v.to_bits() as u64)?,
            Arg::I64(v) => scalar(4, Scalar::I64, v as u64)?,
            Arg::U64(v) => scalar(5, Scalar::U64, v)?,
        });
    }
    Ok(raw)
}
