use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::{Device, Kind};

use crate::error::{Error, Result};

/// `cpu`, `cuda` (device 0) or `cuda:N`. CUDA where none exists is an error,
/// never a silent CPU run.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = parse_device_name(s)?;
    check_available(device)?;
    Ok(device)
}

/// [`parse_device`] without the check that the device exists here.
pub fn parse_device_name(s: &str) -> Result<Device> {
    match s.trim() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(Error::Device(format!(
                "unknown device `{s}` (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

/// Errors unless `device` exists here. For CUDA this first loads libtorch's
/// CUDA support (see [`load_cuda_support`]).
pub fn check_available(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        let lib = load_cuda_support().map_err(|e| {
            Error::Device(format!(
                "cuda:{i} was asked for, but libtorch's CUDA support could not be loaded: {e}"
            ))
        })?;
        let count = loaded_cuda_device_count();
        if i >= count {
            return Err(Error::Device(format!(
                "cuda:{i} was asked for, but this machine has {count} CUDA device(s) (CUDA support loaded from {})",
                lib.display()
            )));
        }
    }
    Ok(())
}

/// How many CUDA devices libtorch sees; 0 where its CUDA support cannot be
/// loaded. Use this rather than `tch::Cuda` directly (see [`load_cuda_support`]).
pub fn cuda_device_count() -> usize {
    match load_cuda_support() {
        Ok(_) => loaded_cuda_device_count(),
        Err(_) => 0,
    }
}

fn loaded_cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// libtorch's CUDA kernels and hooks register themselves when
/// `libtorch_cuda.so` is loaded. The binary does not link it: together with
/// the CUDA libraries it pulls in, that would add about 300 MB to the resident
/// memory of every CPU run. It is loaded here instead, once, from the folder
/// of the libtorch in use, the first time CUDA is asked for. It must come
/// before libtorch is first asked about CUDA (`tch::Cuda::*`): libtorch keeps
/// the first answer. Loading it where it is already loaded (an application
/// that links it) is harmless. Returns the file that was loaded.
pub fn load_cuda_support() -> std::result::Result<&'static Path, String> {
    static LOADED: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let beside_libtorch = libtorch_dir().map(|d| d.join("libtorch_cuda.so"));
            let candidates = beside_libtorch
                .into_iter()
                .chain([PathBuf::from("libtorch_cuda.so")]);
            let mut failures = Vec::new();
            for candidate in candidates {
                match dlopen_global(&candidate) {
                    Ok(()) => return Ok(candidate),
                    Err(e) => failures.push(e),
                }
            }
            Err(failures.join("; "))
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// The folder of the libtorch_cpu.so this process has loaded.
fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    // The path is the rest of the line from its first `/` (it may hold spaces).
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| &l[i..]))
        .find(|f| f.ends_with("/libtorch_cpu.so"))
        .and_then(|f| Path::new(f).parent().map(Path::to_path_buf))
}

fn dlopen_global(path: &Path) -> std::result::Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path has a NUL byte", path.display()))?;
    // Never closed: the kernels it registers live as long as the process.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    let reason = unsafe { libc::dlerror() };
    Err(if reason.is_null() {
        format!("{}: dlopen failed", path.display())
    } else {
        unsafe { CStr::from_ptr(reason) }
            .to_string_lossy()
            .into_owned()
    })
}

pub use vit_msn_format::device_name;

/// `f32`, `f16`, `bf16`, `int8` → the kind of the artifact's tensors (f32 for int8).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    vit_msn_format::Dtype::parse(s)
        .map(vit_msn_format::Dtype::kind)
        .ok_or_else(|| {
            Error::input(
                "dtype",
                format!("unknown dtype `{s}` (expected f32, f16, bf16 or int8)"),
            )
        })
}
