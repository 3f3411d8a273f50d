//! CUDA graphs: an artifact's forward captured once per input shape and then
//! replayed, so a small batch on the GPU costs one graph launch instead of a
//! kernel launch and an interpreter step per op. [`crate::Bundle`] uses them
//! when loaded with [`crate::bundle::LoadOptions::cuda_graphs`].
//!
//! The capture and replay live in their own shared library
//! (`libvit_msn_cuda_graphs.so`, built by build.rs from
//! src/shim/cuda_graph.cpp), because they link libtorch_cuda, which the
//! runtime only loads when CUDA is asked for (see
//! [`crate::device::load_cuda_support`]). It is looked for at
//! `$VIT_MSN_CUDA_GRAPHS_LIB`, then beside the running program, then where
//! the build put it.

use std::ffi::{c_char, c_int, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::Tensor;

use crate::artifact::{forward_call, take_error, tensor_ptrs, Artifact, RawOutput, VmsnArtifact};

const LIBRARY_FILE: &str = "libvit_msn_cuda_graphs.so";

#[repr(C)]
struct VmsnCudaGraph {
    _opaque: [u8; 0],
}

type CaptureFn = unsafe extern "C" fn(
    *mut VmsnArtifact,
    *const *mut torch_sys::C_tensor,
    c_int,
    c_int,
    *mut *mut c_char,
) -> *mut VmsnCudaGraph;
type ReplayFn = unsafe extern "C" fn(
    *mut VmsnCudaGraph,
    *const *mut torch_sys::C_tensor,
    c_int,
    *mut *mut *mut torch_sys::C_tensor,
    *mut *mut *mut c_char,
    *mut *mut c_char,
) -> c_int;
type FreeFn = unsafe extern "C" fn(*mut VmsnCudaGraph);

struct Library {
    path: PathBuf,
    capture: CaptureFn,
    replay: ReplayFn,
    free: FreeFn,
}

/// The CUDA-graph library's path: `explicit` (from `$VIT_MSN_CUDA_GRAPHS_LIB`)
/// if given, which must then be a file; else the first file of `fallbacks`.
fn find_library(
    explicit: Option<PathBuf>,
    fallbacks: &[PathBuf],
) -> std::result::Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "VIT_MSN_CUDA_GRAPHS_LIB is {}, which is not a file",
                path.display()
            ))
        };
    }
    fallbacks
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "{LIBRARY_FILE} was not found beside the program or where it was built \
             (the build makes none where libtorch has no CUDA support or the CUDA headers \
             are missing); set VIT_MSN_CUDA_GRAPHS_LIB to its path"
            )
        })
}

/// Loads the library once (after libtorch's CUDA support, which it needs).
fn library() -> std::result::Result<&'static Library, String> {
    static LOADED: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            crate::device::load_cuda_support()
                .map_err(|e| format!("libtorch's CUDA support could not be loaded: {e}"))?;
            let beside_program = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(LIBRARY_FILE)));
            let built = option_env!("VIT_MSN_CUDA_GRAPHS_LIB").map(PathBuf::from);
            let fallbacks: Vec<PathBuf> = beside_program.into_iter().chain(built).collect();
            let explicit = std::env::var_os("VIT_MSN_CUDA_GRAPHS_LIB").map(PathBuf::from);
            open(&find_library(explicit, &fallbacks)?)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn open(path: &Path) -> std::result::Result<Library, String> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path has a NUL byte", path.display()))?;
    // SAFETY: dlopen and dlsym with NUL-terminated strings; the handle is
    // never closed, so the function pointers stay valid for the process.
    unsafe {
        let handle = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            let reason = libc::dlerror();
            return Err(if reason.is_null() {
                format!("{}: dlopen failed", path.display())
            } else {
                std::ffi::CStr::from_ptr(reason)
                    .to_string_lossy()
                    .into_owned()
            });
        }
        let symbol = |name: &str| {
            let c_name = CString::new(name).expect("symbol names have no NUL");
            let f = libc::dlsym(handle, c_name.as_ptr());
            if f.is_null() {
                Err(format!("{}: has no symbol {name}", path.display()))
            } else {
                Ok(f)
            }
        };
        Ok(Library {
            path: path.to_path_buf(),
            capture: std::mem::transmute::<*mut libc::c_void, CaptureFn>(symbol(
                "vmsn_cg_capture",
            )?),
            replay: std::mem::transmute::<*mut libc::c_void, ReplayFn>(symbol("vmsn_cg_replay")?),
            free: std::mem::transmute::<*mut libc::c_void, FreeFn>(symbol("vmsn_cg_free")?),
        })
    }
}

/// The CUDA-graph library this process uses, loading it (and libtorch's CUDA
/// support) if need be; the error says why CUDA graphs cannot be used here.
pub fn library_path() -> std::result::Result<&'static Path, String> {
    library().map(|l| l.path.as_path())
}

/// One captured forward pass. Its inputs and outputs are fixed buffers on the
/// GPU, so one graph must not be replayed from two threads at once: `Send`,
/// not `Sync` (the bundle keeps its graphs behind a mutex).
pub(crate) struct CudaGraph {
    raw: *mut VmsnCudaGraph,
    free: FreeFn,
}

// SAFETY: the graph is owned and freed once; replay needs `&mut self`.
unsafe impl Send for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from vmsn_cg_capture and is freed only here.
        unsafe { (self.free)(self.raw) };
    }
}

impl CudaGraph {
    /// Runs `artifact`'s forward `warmup` times on `inputs` (all on one CUDA
    /// device), then captures it. Later replays take inputs of the same
    /// shapes and dtypes.
    pub(crate) fn capture(
        artifact: &Artifact,
        inputs: &[&Tensor],
        warmup: u32,
    ) -> std::result::Result<Self, String> {
        let lib = library()?;
        let ptrs = tensor_ptrs(inputs);
        let warmup = c_int::try_from(warmup).unwrap_or(c_int::MAX);
        let mut err = std::ptr::null_mut();
        // SAFETY: a live artifact, `ptrs.len()` live input handles that the
        // library clones, and an out-pointer for the error.
        let raw = unsafe {
            (lib.capture)(
                artifact.raw(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                warmup,
                &mut err,
            )
        };
        if raw.is_null() {
            return Err(take_error(err));
        }
        Ok(Self {
            raw,
            free: lib.free,
        })
    }

    /// Copies `inputs` into the graph and replays it. The outputs share the
    /// graph's buffers, which the next replay overwrites: copy them out first.
    pub(crate) fn replay(
        &mut self,
        inputs: &[&Tensor],
    ) -> std::result::Result<Vec<RawOutput>, String> {
        let lib = library()?;
        // SAFETY: a live graph (and `&mut self` keeps other threads out); the
        // library hands its outputs over as `forward_call` expects.
        unsafe {
            forward_call(inputs, |ptrs, n, tensors, names, err| {
                (lib.replay)(self.raw, ptrs, n, tensors, names, err)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_path_must_be_a_file() {
        let dir = std::env::temp_dir();
        let missing = dir.join("vit-msn-no-such-library.so");
        let err = find_library(Some(missing.clone()), &[]).unwrap_err();
        assert!(
            err.contains("VIT_MSN_CUDA_GRAPHS_LIB is") && err.contains("not a file"),
            "{err}"
        );
        let err = find_library(None, &[missing]).unwrap_err();
        assert!(err.contains("was not found"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_the_library_is_refused() {
        let dir = std::env::temp_dir().join(format!("vit-msn-cg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join(LIBRARY_FILE);
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let found = find_library(None, &[dir.join("absent.so"), fake.clone()]).unwrap();
        assert_eq!(found, fake);
        let err = open(&found).err().expect("a text file is not a library");
        assert!(err.contains(LIBRARY_FILE), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
