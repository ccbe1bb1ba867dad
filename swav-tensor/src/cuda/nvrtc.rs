//! Compiling kernel sources with NVRTC (loaded at run time through cudarc; no GPU needed) to a cubin for
//! one architecture, with ptxas' resource report: registers, spills, stack and shared memory per kernel.
//! Used by the compile-check tests of every crate with kernels, and by the CUDA runtime to come.

use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::nvrtc::{result, sys};

use super::Source;

/// Resources ptxas reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelUsage {
    /// The kernel's name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of stack frame per thread.
    pub stack_bytes: u32,
    /// Bytes spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes reloaded from spills.
    pub spill_loads: u32,
    /// Bytes of static shared memory per block.
    pub shared_bytes: u32,
}

/// A compiled source.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The cubin.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings and the ptxas report).
    pub log: String,
    /// Per-kernel resources, parsed from the log.
    pub kernels: Vec<KernelUsage>,
}

/// Whether NVRTC can be loaded; the reason when not.
pub fn available() -> Result<(), String> {
    // SAFETY: only tries to dlopen the library by its usual names.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err("NVRTC (libnvrtc.so) could not be loaded: `source scripts/nvrtc-env.sh` after `python3 -m pip install \
             nvidia-cuda-nvrtc` puts it on the library path"
            .into())
    }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), String> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let status = catch_unwind(AssertUnwindSafe(|| unsafe { sys::nvrtcVersion(&mut major, &mut minor) }))
        .map_err(|_| "nvrtcVersion is missing from the loaded library".to_string())?;
    status.result().map_err(|e| format!("nvrtcVersion: {e}"))?;
    Ok((major, minor))
}

/// Compiles `source` (with the common helpers) for `arch` (`"sm_80"`, `"sm_90"`, ...) to a cubin, with
/// ptxas' verbose report in the log. Errors carry the log.
pub fn compile(source: &Source, arch: &str) -> Result<Compiled, String> {
    available()?;
    let text = CString::new(source.text()).map_err(|_| format!("{}: NUL byte in the source", source.name))?;
    let name = CString::new(source.name).map_err(|_| "NUL byte in the name".to_string())?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--ptxas-options=-v".into()];
    let run = || -> Result<Compiled, String> {
        let prog =
            result::create_program(&text, Some(name.as_c_str())).map_err(|e| format!("nvrtcCreateProgram: {e}"))?;
        // SAFETY: `prog` is live until destroyed below; options are plain strings.
        let compiled = unsafe { result::compile_program(prog, &options) };
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog) }.map(|l| c_chars(&l)).unwrap_or_default();
        let cubin = compiled.map_err(|e| format!("{} for {arch}: {e}\n{log}", source.name)).and_then(|()| {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reports.
            unsafe {
                sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
                    .result()
                    .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
                Ok(cubin)
            }
        });
        // SAFETY: created above, destroyed once.
        let _ = unsafe { result::destroy_program(prog) };
        let cubin = cubin?;
        let kernels = parse_usage(&log);
        Ok(Compiled { cubin, log, kernels })
    };
    catch_unwind(AssertUnwindSafe(run)).map_err(|_| "the loaded NVRTC lacks a function this build needs".to_string())?
}

/// Compiles `source` to PTX for a virtual architecture (`"compute_80"`): the fallback image for a
/// device this NVRTC cannot make a cubin for; the driver compiles the PTX for the device. The text is
/// NUL-terminated, as the driver's module loader wants.
pub fn compile_ptx(source: &Source, arch: &str) -> Result<Vec<u8>, String> {
    available()?;
    let text = CString::new(source.text()).map_err(|_| format!("{}: NUL byte in the source", source.name))?;
    let name = CString::new(source.name).map_err(|_| "NUL byte in the name".to_string())?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    let run = || -> Result<Vec<u8>, String> {
        let prog =
            result::create_program(&text, Some(name.as_c_str())).map_err(|e| format!("nvrtcCreateProgram: {e}"))?;
        // SAFETY: `prog` is live until destroyed below.
        let out = unsafe { result::compile_program(prog, &options) }
            .map_err(|e| format!("{} for {arch}: {e}", source.name))
            .and_then(|()| {
                // SAFETY: `prog` compiled successfully.
                unsafe { result::get_ptx(prog) }.map_err(|e| format!("nvrtcGetPTX: {e}"))
            });
        // SAFETY: created above, destroyed once.
        let _ = unsafe { result::destroy_program(prog) };
        let mut ptx: Vec<u8> = out?.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        ptx.push(0);
        Ok(ptx)
    };
    catch_unwind(AssertUnwindSafe(run)).map_err(|_| "the loaded NVRTC lacks a function this build needs".to_string())?
}

fn c_chars(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads ptxas' `-v` report:
/// ```text
/// ptxas info    : Compiling entry function 'k' for 'sm_80'
/// ptxas info    : Function properties for k
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 16 registers, 380 bytes cmem[0], 128 bytes smem
/// ```
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let number_before = |line: &str, unit: &str| -> u32 {
        line.find(unit).and_then(|at| line[..at].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelUsage { name, ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame");
                k.spill_stores = number_before(line, "bytes spill stores");
                k.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers");
                k.shared_bytes = number_before(line, "bytes smem");
            }
        }
    }
    out
}

/// The architectures the compile check builds for: A100 (sm_80) and H100/H200 (sm_90).
pub const CHECK_ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// The compile check run by the tests of every crate with kernels: compiles each source for each of
/// `archs`, and returns a table of every kernel's registers, spills, stack and static shared memory.
/// Fails on a compile error, a compiler warning, a kernel missing from ptxas' report, or more than 48 KiB
/// of static shared memory. Without NVRTC it returns `Ok(None)` after printing `SKIPPED: ...`, unless
/// `SWAV_REQUIRE_NVRTC=1` (CI), which makes the absence an error.
pub fn compile_check(sources: &[Source], archs: &[&str]) -> Result<Option<String>, String> {
    if let Err(why) = available() {
        if std::env::var("SWAV_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            return Err(format!("SWAV_REQUIRE_NVRTC=1 but {why}"));
        }
        eprintln!("SKIPPED: {why}");
        return Ok(None);
    }
    let (major, minor) = version()?;
    let mut report = format!(
        "NVRTC {major}.{minor}\n{:<32} {:>6} {:>5} {:>6} {:>7} {:>7} {:>7}\n",
        "kernel", "arch", "regs", "stack", "spill-st", "spill-ld", "smem"
    );
    for source in sources {
        let expected: Vec<String> = kernel_names(source);
        for arch in archs {
            let c = compile(source, arch)?;
            let warnings: Vec<&str> = c.log.lines().filter(|l| l.contains("warning")).collect();
            if !warnings.is_empty() {
                return Err(format!("{} for {arch}: compiler warnings:\n{}", source.name, warnings.join("\n")));
            }
            for name in &expected {
                let k = c.kernels.iter().find(|k| &k.name == name).ok_or_else(|| {
                    format!("{} for {arch}: kernel {name} missing from ptxas' report:\n{}", source.name, c.log)
                })?;
                if k.shared_bytes > 48 * 1024 {
                    return Err(format!(
                        "{name} for {arch}: {} bytes of static shared memory (48 KiB at most)",
                        k.shared_bytes
                    ));
                }
                report += &format!(
                    "{:<32} {:>6} {:>5} {:>6} {:>7} {:>7} {:>7}\n",
                    k.name, arch, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads, k.shared_bytes
                );
            }
        }
    }
    Ok(Some(report))
}

/// Names of the `extern "C" __global__` functions of `source` (a light scan: the name before the
/// parameter list, after an optional `__launch_bounds__(...)`).
fn kernel_names(source: &Source) -> Vec<String> {
    let mut names = Vec::new();
    for piece in source.code.split("extern \"C\" __global__ void").skip(1) {
        let mut p = piece.trim_start();
        if let Some(rest) = p.strip_prefix("__launch_bounds__") {
            p = rest.find(')').map_or(rest, |i| &rest[i + 1..]).trim_start();
        }
        if let Some(open) = p.find('(') {
            names.push(p[..open].trim().to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'bn_apply_f32' for 'sm_80'\n\
                   ptxas info    : Function properties for bn_apply_f32\n    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 30 registers, 412 bytes cmem[0], 2048 bytes smem\n\
                   ptxas info    : Compiling entry function 'k2' for 'sm_80'\nptxas info    : Function properties for k2\n\
                   \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 8 registers, 360 bytes cmem[0]\n";
        let k = parse_usage(log);
        assert_eq!(
            k[0],
            KernelUsage {
                name: "bn_apply_f32".into(),
                registers: 30,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12,
                shared_bytes: 2048
            }
        );
        assert_eq!(k[1].name, "k2");
        assert_eq!((k[1].registers, k[1].shared_bytes), (8, 0));
    }
}
