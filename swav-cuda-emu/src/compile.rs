//! Building the emulation: one translation unit per source (the shim, the source's `#include`s, the
//! source inside its own namespace so that helpers of different files cannot collide, and one entry
//! point per kernel), compiled in parallel with the host C++ compiler and linked into a shared object.
//! The object is cached in the temp folder under a hash of everything that goes into it, and published
//! with an atomic rename, so concurrent test processes share one build.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::parse::{rewrite_for_host, KernelSig};
use crate::{EmuError, Source};

const SHIM: &str = include_str!("shim.hpp");

/// Flags of every compile. `-Wall -Werror` keeps the kernels clean; signed/unsigned comparisons (CUDA
/// code compares `int` with `blockDim.x` all the time) and unused helpers are allowed.
const FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-pthread",
    "-Wall",
    "-Werror",
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
    "-Wno-unused-function",
];

/// The host compiler: `$CXX`, else `c++`.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".to_string())
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The translation unit of source `index`.
fn unit(index: usize, source: &Source<'_>, kernels: &[KernelSig]) -> String {
    let (body, includes) = rewrite_for_host(source.code);
    let mut tu = String::from("#include \"emu_shim.hpp\"\n");
    for inc in includes {
        tu += &inc;
        tu += "\n";
    }
    tu += &format!("namespace emu_src_{index} {{\n#line 1 \"{}\"\n", source.name);
    tu += &body;
    tu += "\n}\n";
    for k in kernels {
        tu += &format!(
            "extern \"C\" int emu_kernel_{0}(const emu::RawLaunch* l) {{ return emu::run(l, &emu_src_{index}::{0}); }}\n",
            k.name
        );
    }
    tu
}

/// Builds (or finds in the cache) the shared object for `sources`; returns its path.
pub(crate) fn build(sources: &[Source<'_>], kernels: &[Vec<KernelSig>]) -> Result<PathBuf, EmuError> {
    let cxx = compiler();
    let version = Command::new(&cxx).arg("--version").stderr(Stdio::null()).output().map_err(|e| {
        EmuError::NoCompiler(format!("kernel emulation needs a C++20 compiler (`{cxx}`, or set CXX): {e}"))
    })?;
    let units: Vec<String> = sources.iter().zip(kernels).enumerate().map(|(i, (s, k))| unit(i, s, k)).collect();
    let mut hash = fnv(0xcbf2_9ce4_8422_2325, SHIM.as_bytes());
    hash = fnv(hash, &version.stdout);
    for f in FLAGS {
        hash = fnv(hash, f.as_bytes());
    }
    for u in &units {
        hash = fnv(hash, u.as_bytes());
    }
    let lib = std::env::temp_dir().join(format!("swav-cuda-emu-{hash:016x}.so"));
    if lib.exists() {
        return Ok(lib);
    }
    let dir = scratch_dir()?;
    let result = compile_in(&dir, &cxx, &units, sources, &lib);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| lib)
}

fn compile_in(dir: &Path, cxx: &str, units: &[String], sources: &[Source<'_>], lib: &Path) -> Result<(), EmuError> {
    let io = |e: std::io::Error| EmuError::Compile(format!("in {}: {e}", dir.display()));
    std::fs::write(dir.join("emu_shim.hpp"), SHIM).map_err(io)?;
    // Sources include the CUDA headers the shim replaces: give them empty stand-ins.
    for header in ["cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h"] {
        std::fs::write(dir.join(header), "#pragma once\n").map_err(io)?;
    }
    let mut children = Vec::new();
    for (i, u) in units.iter().enumerate() {
        let cpp = dir.join(format!("unit{i}.cpp"));
        std::fs::write(&cpp, u).map_err(io)?;
        let child = Command::new(cxx)
            .args(FLAGS)
            .arg("-I")
            .arg(dir)
            .arg("-c")
            .arg(&cpp)
            .arg("-o")
            .arg(dir.join(format!("unit{i}.o")))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| EmuError::NoCompiler(format!("cannot run `{cxx}`: {e}")))?;
        children.push(child);
    }
    let mut errors = String::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(io)?;
        if !out.status.success() {
            errors += &format!(
                "{} does not compile as emulated C++:\n{}\n",
                sources[i].name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if !errors.is_empty() {
        return Err(EmuError::Compile(errors));
    }
    let built = dir.join("emu.so");
    let mut link = Command::new(cxx);
    link.args(["-shared", "-pthread", "-o"]).arg(&built);
    for i in 0..units.len() {
        link.arg(dir.join(format!("unit{i}.o")));
    }
    let out = link.output().map_err(io)?;
    if !out.status.success() {
        return Err(EmuError::Compile(format!("linking the emulation: {}", String::from_utf8_lossy(&out.stderr))));
    }
    // Atomic publish: another process may be building the same object; either copy is good.
    std::fs::rename(&built, lib).map_err(io)
}

fn scratch_dir() -> Result<PathBuf, EmuError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "swav-cuda-emu-build-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| EmuError::Compile(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}
