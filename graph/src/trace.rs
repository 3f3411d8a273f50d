//! Safe wrapper over shim/trace.cpp: trace a closure of tch ops into a
//! TorchScript module whose `forward` has named inputs and returns a
//! Dict[str, Tensor], and save it.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::Error;

extern "C" {
    fn vmsn_trace_begin(
        module_name: *const c_char,
        inputs: *const *const C_tensor,
        input_names: *const *const c_char,
        ninputs: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn vmsn_trace_finish_and_save(
        module: *mut c_void,
        outputs: *const *const C_tensor,
        output_names: *const *const c_char,
        noutputs: c_int,
        path: *const c_char,
        extra_name: *const c_char,
        extra_contents: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vmsn_trace_abandon(module: *mut c_void);
    fn vmsn_linear_pointwise(
        x: *const C_tensor,
        w: *const C_tensor,
        b: *const C_tensor,
        attr: *const c_char,
        algorithm: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn vmsn_linear_dynamic_int8(
        x: *const C_tensor,
        w: *const C_tensor,
        b: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn vmsn_free_str(s: *mut c_char);
}

fn cstring(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Trace(format!("`{s}` contains a NUL byte")))
}

fn take_error(err: *mut c_char) -> Error {
    Error::Trace(take_message(err))
}

/// Takes ownership of an error message a graph shim malloc'ed.
pub(crate) fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "libtorch reported an error without a message".into();
    }
    // SAFETY: the shims return NUL-terminated malloc'ed strings, freed here once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { vmsn_free_str(err) };
    message
}

/// Records `body` run on `inputs` and saves it to `path` with an extra file
/// `extra_name` holding `extra_contents`. Tensors that `body` uses but that are
/// not inputs become constants of the module; they must not require grad.
pub fn trace_and_save<F>(
    path: &Path,
    inputs: &[(&str, &Tensor)],
    body: F,
    extra_name: &str,
    extra_contents: &str,
) -> Result<(), Error>
where
    F: FnOnce() -> Result<Vec<(&'static str, Tensor)>, Error>,
{
    let module_name = cstring("VitMsn")?;
    let names: Vec<CString> = inputs
        .iter()
        .map(|(n, _)| cstring(n))
        .collect::<Result<_, _>>()?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let tensor_ptrs: Vec<*const C_tensor> = inputs.iter().map(|(_, t)| t.as_ptr()).collect();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live value of the right type for the call.
    let module = unsafe {
        vmsn_trace_begin(
            module_name.as_ptr(),
            tensor_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
            inputs.len() as c_int,
            &mut err,
        )
    };
    if module.is_null() {
        return Err(take_error(err));
    }
    let outputs = match body() {
        Ok(outputs) => outputs,
        Err(e) => {
            // SAFETY: `module` came from vmsn_trace_begin and is not used again.
            unsafe { vmsn_trace_abandon(module) };
            return Err(e);
        }
    };
    let out_names: Vec<CString> = outputs
        .iter()
        .map(|(n, _)| cstring(n))
        .collect::<Result<_, _>>()?;
    let out_name_ptrs: Vec<*const c_char> = out_names.iter().map(|n| n.as_ptr()).collect();
    let out_ptrs: Vec<*const C_tensor> = outputs.iter().map(|(_, t)| t.as_ptr()).collect();
    let path_c = cstring(&path.to_string_lossy())?;
    let extra_name = cstring(extra_name)?;
    let extra_contents = cstring(extra_contents)?;
    // SAFETY: as above; the shim takes ownership of `module` and frees it.
    let rc = unsafe {
        vmsn_trace_finish_and_save(
            module,
            out_ptrs.as_ptr(),
            out_name_ptrs.as_ptr(),
            outputs.len() as c_int,
            path_c.as_ptr(),
            extra_name.as_ptr(),
            extra_contents.as_ptr(),
            &mut err,
        )
    };
    if rc != 0 {
        return Err(take_error(err));
    }
    Ok(())
}

/// A post-op fused into oneDNN's linear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOp {
    None,
    /// Exact (erf) GELU.
    Gelu,
    /// GELU's tanh approximation, as torch's `gelu(approximate="tanh")`.
    GeluTanh,
}

/// `mkldnn::_linear_pointwise`: `x · wᵀ + b`, then the post-op, with oneDNN's
/// GEMM on ordinary (dense) tensors. Recorded into an open trace.
pub fn linear_pointwise(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    post: PostOp,
) -> Result<Tensor, Error> {
    let (attr, algorithm) = match post {
        PostOp::None => ("none", ""),
        PostOp::Gelu => ("gelu", "none"),
        PostOp::GeluTanh => ("gelu", "tanh"),
    };
    let attr = cstring(attr)?;
    let algorithm = cstring(algorithm)?;
    let mut err: *mut c_char = std::ptr::null_mut();
    let b_ptr = b.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: live tensors and NUL-terminated strings for the duration of the call.
    let out = unsafe {
        vmsn_linear_pointwise(
            x.as_ptr(),
            w.as_ptr(),
            b_ptr,
            attr.as_ptr(),
            algorithm.as_ptr(),
            &mut err,
        )
    };
    if out.is_null() {
        return Err(take_error(err));
    }
    // SAFETY: the shim returned a new heap tensor that we now own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `quantized::linear_dynamic`: `x · wᵀ + b` with `w` quantized to int8 per
/// output channel and packed at compile time, and `x` quantized on each call
/// (PyTorch's dynamic quantization). f32 in and out, CPU only. Recorded into
/// an open trace, the packed weight as a constant.
pub fn linear_dynamic_int8(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor, Error> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let b_ptr = b.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: live tensors for the duration of the call.
    let out = unsafe { vmsn_linear_dynamic_int8(x.as_ptr(), w.as_ptr(), b_ptr, &mut err) };
    if out.is_null() {
        return Err(take_error(err));
    }
    // SAFETY: the shim returned a new heap tensor that we now own.
    Ok(unsafe { Tensor::from_ptr(out) })
}
