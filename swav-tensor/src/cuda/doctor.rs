//! What `cargo xtask doctor` reports: for each CUDA library the engine loads at run time (driver, NVRTC,
//! cuBLAS, cuDNN, NCCL), whether it loads, its version and the file it was loaded from; the devices the
//! driver sees; and whether NVRTC compiles the engine's kernels for them.
//!
//! Every probe only dlopens and asks; nothing here fails on a machine without a GPU: a library that
//! does not load is reported with the reason, so that the report itself says what to install.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::cublas::sys as blas_sys;
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::nccl::sys as nccl_sys;

use super::nvrtc;

/// One library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    /// What it is ("CUDA driver", "cuDNN", ...).
    pub what: &'static str,
    /// The file name the loader looks for.
    pub soname: &'static str,
    /// Its version, when it loaded.
    pub version: Option<String>,
    /// The files of this library mapped into the process (the real files, symlinks resolved; cuDNN
    /// and NVRTC load sub-libraries of their own, listed too).
    pub files: Vec<String>,
    /// Why it is not usable, when it is not.
    pub problem: Option<String>,
}

/// One device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its ordinal (`--device cuda:N`).
    pub ordinal: usize,
    /// Its name.
    pub name: String,
    /// `sm_XY`.
    pub arch: String,
    /// Total memory in bytes.
    pub memory: usize,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Every library, in load order.
    pub libraries: Vec<Library>,
    /// The devices the driver sees.
    pub devices: Vec<DeviceInfo>,
    /// Why no device could be listed, when none could.
    pub device_problem: Option<String>,
    /// The kernel compile check: architecture and outcome (`Ok` with the kernel count).
    pub kernels: Option<(String, Result<usize, String>)>,
}

impl Report {
    /// Whether `--device cuda` can work: every library but NCCL (needed by multi-GPU runs only) loads,
    /// a device exists and the kernels compile.
    pub fn usable(&self) -> bool {
        self.libraries.iter().all(|l| l.problem.is_none() || l.soname == "libnccl.so")
            && !self.devices.is_empty()
            && matches!(self.kernels, Some((_, Ok(_))))
    }
}

/// Probes everything. Compiles the engine's kernel files for the first device's architecture (or
/// `sm_80` without a device) when NVRTC loads.
pub fn report() -> Report {
    let present = |probe: unsafe fn() -> bool| catch_unwind(|| unsafe { probe() }).unwrap_or(false);
    let missing = |soname: &str| Some(format!("{soname} not found on the library path"));
    let mut libraries = Vec::new();

    let mut driver =
        Library { what: "CUDA driver", soname: "libcuda.so", version: None, files: Vec::new(), problem: None };
    if present(drv_sys::is_culib_present) {
        let mut v = 0;
        // SAFETY: an out-pointer to a live integer.
        match catch_unwind(AssertUnwindSafe(|| unsafe { drv_sys::cuDriverGetVersion(&mut v) })) {
            Ok(drv_sys::CUresult::CUDA_SUCCESS) => {
                let release = std::fs::read_to_string("/proc/driver/nvidia/version").ok();
                driver.version = Some(match release.as_deref().and_then(driver_release) {
                    Some(r) => format!("CUDA {} (driver {r})", cuda_version(v)),
                    None => format!("CUDA {}", cuda_version(v)),
                });
            }
            other => driver.problem = Some(format!("cuDriverGetVersion failed: {other:?}")),
        }
    } else {
        driver.problem = missing(driver.soname);
    }
    let (devices, device_problem) = if driver.problem.is_none() { devices() } else { (Vec::new(), None) };
    libraries.push(driver);

    let mut rtc = Library { what: "NVRTC", soname: "libnvrtc.so", version: None, files: Vec::new(), problem: None };
    match nvrtc::version() {
        Ok((major, minor)) => rtc.version = Some(format!("{major}.{minor}")),
        Err(e) => rtc.problem = Some(e),
    }
    let kernels = rtc.problem.is_none().then(|| {
        let arch = devices.first().map_or_else(|| "sm_80".to_string(), |d| d.arch.clone());
        let compiled = super::sources()
            .iter()
            .map(|s| nvrtc::compile(s, &arch).map(|c| c.kernels.len()).map_err(|e| format!("{}: {e}", s.name)))
            .sum::<Result<usize, String>>();
        (arch, compiled)
    });
    libraries.push(rtc);

    let mut blas = Library { what: "cuBLAS", soname: "libcublas.so", version: None, files: Vec::new(), problem: None };
    if present(blas_sys::is_culib_present) {
        let part = |p| {
            let mut v = 0;
            // SAFETY: an out-pointer to a live integer.
            let status = catch_unwind(AssertUnwindSafe(|| unsafe { blas_sys::cublasGetProperty(p, &mut v) }));
            matches!(status, Ok(blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)).then_some(v)
        };
        use blas_sys::libraryPropertyType_t::{MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL};
        match (part(MAJOR_VERSION), part(MINOR_VERSION), part(PATCH_LEVEL)) {
            (Some(a), Some(b), Some(c)) => blas.version = Some(format!("{a}.{b}.{c}")),
            _ => blas.problem = Some("cublasGetProperty failed".into()),
        }
    } else {
        blas.problem = missing(blas.soname);
    }
    libraries.push(blas);

    let mut dnn = Library { what: "cuDNN", soname: "libcudnn.so", version: None, files: Vec::new(), problem: None };
    if present(dnn_sys::is_culib_present) {
        // SAFETY: no arguments.
        match catch_unwind(|| unsafe { dnn_sys::cudnnGetVersion() }) {
            Ok(v) => dnn.version = Some(cudnn_version(v)),
            Err(_) => dnn.problem = Some("cudnnGetVersion is missing from the loaded library".into()),
        }
    } else {
        dnn.problem = missing(dnn.soname);
    }
    libraries.push(dnn);

    let mut nccl = Library {
        what: "NCCL (multi-GPU only)",
        soname: "libnccl.so",
        version: None,
        files: Vec::new(),
        problem: None,
    };
    if present(nccl_sys::is_culib_present) {
        match catch_unwind(cudarc::nccl::result::get_nccl_version) {
            Ok(Ok(v)) => nccl.version = Some(nccl_version(v)),
            other => nccl.problem = Some(format!("ncclGetVersion failed: {other:?}")),
        }
    } else {
        nccl.problem = missing(nccl.soname);
    }
    libraries.push(nccl);

    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for lib in &mut libraries {
        lib.files = mapped_files(&maps, lib.soname);
    }
    Report { libraries, devices, device_problem, kernels }
}

/// The devices, or why none could be listed.
fn devices() -> (Vec<DeviceInfo>, Option<String>) {
    let listed = catch_unwind(|| -> Result<Vec<DeviceInfo>, String> {
        drv::init().map_err(|e| format!("cuInit: {e}"))?;
        let count = drv::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        (0..count)
            .map(|ordinal| {
                let dev = drv::device::get(ordinal).map_err(|e| format!("cuDeviceGet({ordinal}): {e}"))?;
                let attr = |a| {
                    // SAFETY: a valid device handle from cuDeviceGet.
                    unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| format!("cuDeviceGetAttribute: {e}"))
                };
                use drv_sys::CUdevice_attribute::{
                    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
                    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
                };
                Ok(DeviceInfo {
                    ordinal: ordinal as usize,
                    name: drv::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e}"))?,
                    arch: format!("sm_{}{}", attr(MAJOR)?, attr(MINOR)?),
                    // SAFETY: as above.
                    memory: unsafe { drv::device::total_mem(dev) }.map_err(|e| format!("cuDeviceTotalMem: {e}"))?,
                })
            })
            .collect()
    });
    match listed {
        Ok(Ok(d)) if d.is_empty() => (d, Some("the driver sees no CUDA device".into())),
        Ok(Ok(d)) => (d, None),
        Ok(Err(e)) => (Vec::new(), Some(e)),
        Err(_) => (Vec::new(), Some("the driver library lacks an entry point the engine needs".into())),
    }
}

/// The kernel module's release (`580.65.06`) from `/proc/driver/nvidia/version`, whose first line
/// reads `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  <date>` (or `... Open Kernel Module
/// for x86_64  580.65.06  Release Build ...`): the first word after "Module" that starts with a digit.
fn driver_release(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let after = &line[line.find("Module")? + "Module".len()..];
    after
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

/// `13000` -> `13.0` (the driver API's encoding, 1000 * major + 10 * minor).
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// cuDNN 9 encodes `major * 10000 + minor * 100 + patch`; cuDNN 8 `major * 1000 + minor * 100 + patch`.
fn cudnn_version(v: usize) -> String {
    if v >= 90000 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    }
}

/// NCCL >= 2.9 encodes `major * 10000 + minor * 100 + patch`; older ones `major * 1000 + minor * 100 + patch`.
fn nccl_version(v: i32) -> String {
    if v >= 20900 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    }
}

/// The distinct files in `maps` (the text of `/proc/self/maps`) whose name starts with `soname`'s stem
/// (`libcudnn.so` -> `libcudnn`: also `libcudnn_graph.so.9`, the sub-libraries cuDNN loads).
fn mapped_files(maps: &str, soname: &str) -> Vec<String> {
    let stem = soname.trim_end_matches(".so");
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            name.strip_prefix(stem).is_some_and(|rest| rest.starts_with(".so") || rest.starts_with(['_', '-']))
        })
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_driver_release() {
        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(driver_release(proprietary).as_deref(), Some("550.54.15"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\n";
        assert_eq!(driver_release(open).as_deref(), Some("580.65.06"));
        assert_eq!(driver_release("something else\n"), None);
        assert_eq!(driver_release(""), None);
    }

    #[test]
    fn decodes_library_versions() {
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cudnn_version(91900), "9.19.0");
        assert_eq!(cudnn_version(8907), "8.9.7");
        assert_eq!(nccl_version(22805), "2.28.5");
        assert_eq!(nccl_version(2708), "2.7.8");
    }

    #[test]
    fn finds_a_library_and_its_sub_libraries_in_the_maps() {
        let maps = "7f0-7f1 r-xp 00000000 08:01 1 /opt/nv/cudnn/lib/libcudnn.so.9\n\
                    7f1-7f2 r--p 00000000 08:01 1 /opt/nv/cudnn/lib/libcudnn.so.9\n\
                    7f2-7f3 r-xp 00000000 08:01 2 /opt/nv/cudnn/lib/libcudnn_graph.so.9\n\
                    7f3-7f4 r-xp 00000000 08:01 3 /usr/lib/libcudnnfoo.so\n\
                    7f4-7f5 rw-p 00000000 00:00 0 \n\
                    7f5-7f6 r-xp 00000000 08:01 4 /opt/nv/cu13/lib/libnvrtc-builtins.so.13.0\n";
        assert_eq!(
            mapped_files(maps, "libcudnn.so"),
            ["/opt/nv/cudnn/lib/libcudnn.so.9", "/opt/nv/cudnn/lib/libcudnn_graph.so.9"]
        );
        assert_eq!(mapped_files(maps, "libnvrtc.so"), ["/opt/nv/cu13/lib/libnvrtc-builtins.so.13.0"]);
        assert!(mapped_files(maps, "libnccl.so").is_empty());
    }

    #[test]
    fn reports_without_failing_on_any_machine() {
        let r = report();
        assert_eq!(r.libraries.len(), 5);
        for lib in &r.libraries {
            // Exactly one of a version and a problem.
            assert!(lib.version.is_some() != lib.problem.is_some(), "{lib:?}");
        }
        if r.libraries[1].version.is_some() {
            let (_, compiled) = r.kernels.as_ref().expect("NVRTC loads, so the kernels are compiled");
            assert!(compiled.as_ref().is_ok_and(|&n| n > 0), "{compiled:?}");
            assert!(!r.libraries[1].files.is_empty(), "NVRTC loaded but not found in the maps");
        }
        if r.devices.is_empty() {
            assert!(!r.usable());
        }
    }
}
