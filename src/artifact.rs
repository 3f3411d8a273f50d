//! One loaded TorchScript artifact, through the runtime's C++ shim
//! (src/shim/artifact.cpp): tch's `CModule` loads and runs modules, but
//! cannot reach the graph, which the load-time weight prepacking rewrites.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::Path;

use tch::{Device, Tensor};

#[repr(C)]
pub(crate) struct VmsnArtifact {
    _opaque: [u8; 0],
}

extern "C" {
    fn vmsn_rt_artifact_load(
        path: *const c_char,
        device: c_int,
        err: *mut *mut c_char,
    ) -> *mut VmsnArtifact;
    fn vmsn_rt_artifact_free(a: *mut VmsnArtifact);
    fn vmsn_rt_artifact_prepack_linears(
        a: *mut VmsnArtifact,
        rows: i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_rt_artifact_mkl_linears(
        a: *mut VmsnArtifact,
        rows: i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_rt_artifact_onednn_int8_linears(
        a: *mut VmsnArtifact,
        pack_rows: i64,
        min_rows: i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_rt_artifact_unfuse_onednn_linears(a: *mut VmsnArtifact, err: *mut *mut c_char)
        -> c_int;
    fn vmsn_rt_artifact_split_gelu_post_ops(a: *mut VmsnArtifact, err: *mut *mut c_char) -> c_int;
    fn vmsn_rt_artifact_expose_pre_layernorm_cls(
        a: *mut VmsnArtifact,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_rt_artifact_forward(
        a: *mut VmsnArtifact,
        inputs: *const *mut torch_sys::C_tensor,
        n_inputs: c_int,
        tensors: *mut *mut *mut torch_sys::C_tensor,
        names: *mut *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_rt_free_ptr_array(array: *mut *mut std::ffi::c_void);
    fn vmsn_rt_free_str(s: *mut c_char);
}

/// Takes ownership of a string a runtime shim malloc'ed (None for null).
pub(crate) fn take_string(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: the shim returns NUL-terminated malloc'ed strings, freed here once.
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { vmsn_rt_free_str(s) };
    Some(out)
}

/// A shim's error: the line of libtorch's message that says what went wrong.
pub(crate) fn take_error(err: *mut c_char) -> String {
    take_string(err)
        .map(|m| crate::bundle::first_line(&m))
        .unwrap_or_else(|| "unknown libtorch error".into())
}

/// A TorchScript module loaded on one device. `Send + Sync`: libtorch runs
/// one module's forward from many threads at once (its graph is only
/// rewritten by [`Artifact::prepack_linears`], which takes `&mut self`).
pub struct Artifact {
    raw: *mut VmsnArtifact,
}

// SAFETY: see the type's documentation; torch::jit::Module::forward is
// thread-safe, and the pointer is owned and freed once.
unsafe impl Send for Artifact {}
unsafe impl Sync for Artifact {}

impl Drop for Artifact {
    fn drop(&mut self) {
        // SAFETY: `raw` came from vmsn_rt_artifact_load and is freed only here.
        unsafe { vmsn_rt_artifact_free(self.raw) };
    }
}

/// One output of a forward pass: named for a `Dict[str, Tensor]`, unnamed
/// (in order) for a tuple, list or single tensor.
pub type RawOutput = (Option<String>, Tensor);

impl Artifact {
    /// Loads a TorchScript file on the CPU or a CUDA device (others are taken
    /// as the CPU); the error is libtorch's first line.
    pub fn load(path: &Path, device: Device) -> std::result::Result<Self, String> {
        let c_path = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| "path contains NUL".to_string())?;
        let device = match device {
            Device::Cuda(i) => c_int::try_from(i).map_err(|_| format!("no CUDA device {i}"))?,
            _ => -1,
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: a valid NUL-terminated path and out-pointer for the call.
        let raw = unsafe { vmsn_rt_artifact_load(c_path.as_ptr(), device, &mut err) };
        if raw.is_null() {
            return Err(take_error(err));
        }
        Ok(Self { raw })
    }

    /// Reorders the weights of the graph's oneDNN linears once, for inputs
    /// of `rows` rows (batch × tokens); any row count still runs, and the
    /// results are unchanged. CPU artifacts only. Returns how many weights
    /// were packed.
    pub fn prepack_linears(&mut self, rows: i64) -> std::result::Result<usize, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let n = unsafe { vmsn_rt_artifact_prepack_linears(self.raw, rows, &mut err) };
        usize::try_from(n).map_err(|_| take_error(err))
    }

    /// Rewrites the graph's f32 oneDNN linears without a post-op into oneMKL's
    /// packed sgemm (`mkl::_mkl_linear`), its weight packed once for inputs
    /// of `rows` rows; other row counts run ATen's linear, and the results
    /// agree with oneDNN's to rounding. CPU artifacts only; call it after
    /// [`Artifact::split_gelu_post_ops`], in place of
    /// [`Artifact::prepack_linears`]. Returns how many were rewritten.
    pub fn mkl_linears(&mut self, rows: i64) -> std::result::Result<usize, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let n = unsafe { vmsn_rt_artifact_mkl_linears(self.raw, rows, &mut err) };
        usize::try_from(n).map_err(|_| take_error(err))
    }

    /// Rewrites the graph's int8 linears (fbgemm's `quantized::linear_dynamic`)
    /// so that inputs of at least `min_rows` rows run oneDNN's u8·s8 GEMM on
    /// the same int8 weights (packed once for `pack_rows` rows), after
    /// quantizing the activation exactly as fbgemm does; smaller inputs keep
    /// fbgemm. The results agree with fbgemm's to f32 rounding. CPU artifacts
    /// on a CPU with AVX2 only. Returns how many were rewritten.
    pub fn onednn_int8_linears(
        &mut self,
        pack_rows: i64,
        min_rows: i64,
    ) -> std::result::Result<usize, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let n = unsafe {
            vmsn_rt_artifact_onednn_int8_linears(self.raw, pack_rows, min_rows, &mut err)
        };
        usize::try_from(n).map_err(|_| take_error(err))
    }

    /// Rewrites the graph's oneDNN linears (`mkldnn::_linear_pointwise`) into
    /// `aten::linear`, with GELU after it where oneDNN fused one: the same
    /// computation through ATen's GEMM, for a CPU on which oneDNN has no
    /// kernel for the artifact's dtype. Returns how many were rewritten.
    pub fn unfuse_onednn_linears(&mut self) -> std::result::Result<usize, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let n = unsafe { vmsn_rt_artifact_unfuse_onednn_linears(self.raw, &mut err) };
        usize::try_from(n).map_err(|_| take_error(err))
    }

    /// Rewrites each oneDNN linear with a fused GELU into the same linear
    /// followed by an in-place GELU (ATen's): the same function, computed in
    /// two passes, which is faster on AVX2 ([`crate::cpu::Cpu::avx512`]).
    /// Call it before [`Artifact::prepack_linears`]. Returns how many were
    /// split.
    pub fn split_gelu_post_ops(&mut self) -> std::result::Result<usize, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let n = unsafe { vmsn_rt_artifact_split_gelu_post_ops(self.raw, &mut err) };
        usize::try_from(n).map_err(|_| take_error(err))
    }

    /// Rewrites the graph so that forward also returns `cls_pre_layernorm`:
    /// the CLS token of the last block's output before the final layer norm
    /// (transformers' `hidden_states[-1][:, 0]`). A backbone artifact whose
    /// `last_hidden_state` is not a layer norm's output is refused.
    pub fn expose_pre_layernorm_cls(&mut self) -> std::result::Result<(), String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is live, and `&mut self` keeps other threads out.
        let rc = unsafe { vmsn_rt_artifact_expose_pre_layernorm_cls(self.raw, &mut err) };
        if rc != 0 {
            return Err(take_error(err));
        }
        Ok(())
    }

    /// Runs forward under no_grad.
    pub fn forward(&self, inputs: &[&Tensor]) -> std::result::Result<Vec<RawOutput>, String> {
        // SAFETY: `raw` is live; the shim's forward hands its outputs over as
        // `forward_call` expects.
        unsafe {
            forward_call(inputs, |ptrs, n, tensors, names, err| {
                vmsn_rt_artifact_forward(self.raw, ptrs, n, tensors, names, err)
            })
        }
    }

    /// The shim's handle, for the CUDA-graph library (src/cuda_graph.rs).
    pub(crate) fn raw(&self) -> *mut VmsnArtifact {
        self.raw
    }
}

/// The handles of tensors a shim passes to it (they stay owned by the caller).
pub(crate) fn tensor_ptrs(inputs: &[&Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    inputs
        .iter()
        .map(|t| t.as_ptr() as *mut torch_sys::C_tensor)
        .collect()
}

/// Runs a shim call that takes input handles and hands outputs over (as
/// `hand_over` in src/shim/artifact.h does): `call` gets the inputs, their
/// count and three out-pointers (tensors, names, error), and returns the
/// output count, or -1 with the error set.
///
/// # Safety
/// `call` must keep that contract: on success, `n` new tensors and names
/// (malloc'ed arrays, names malloc'ed or null), none used after.
pub(crate) unsafe fn forward_call(
    inputs: &[&Tensor],
    call: impl FnOnce(
        *const *mut torch_sys::C_tensor,
        c_int,
        *mut *mut *mut torch_sys::C_tensor,
        *mut *mut *mut c_char,
        *mut *mut c_char,
    ) -> c_int,
) -> std::result::Result<Vec<RawOutput>, String> {
    let ptrs = tensor_ptrs(inputs);
    let (mut tensors, mut names, mut err) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // The inputs outlive the call (the shim copies the handles).
    let n = call(
        ptrs.as_ptr(),
        ptrs.len() as c_int,
        &mut tensors,
        &mut names,
        &mut err,
    );
    let n = usize::try_from(n).map_err(|_| take_error(err))?;
    let mut outputs = Vec::with_capacity(n);
    for i in 0..n {
        let (tensor, name) = (Tensor::from_ptr(*tensors.add(i)), *names.add(i));
        outputs.push((take_string(name), tensor));
    }
    vmsn_rt_free_ptr_array(tensors.cast());
    vmsn_rt_free_ptr_array(names.cast());
    Ok(outputs)
}
