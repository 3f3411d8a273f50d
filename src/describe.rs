//! What a TorchScript file says about itself (forward schema, and the
//! description vit-msn stores inside its artifacts).

use std::ffi::{c_char, c_int, CString};
use std::path::Path;

use crate::artifact::take_string;
use crate::error::{Error, Result};

/// Name of the JSON file stored inside each vit-msn artifact.
pub const ARTIFACT_EXTRA_FILE: &str = "vit_msn.json";

extern "C" {
    fn vmsn_rt_describe(
        path: *const c_char,
        extra_name: *const c_char,
        schema: *mut *mut c_char,
        extra: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}

pub struct ModuleDescription {
    /// e.g. `forward(__torch__.VitMsn self, Tensor pixel_values, ...) -> Dict(str, Tensor)`.
    pub forward_schema: String,
    /// The artifact's own description, for files vit-msn wrote.
    pub vit_msn: Option<serde_json::Value>,
}

/// A shim string, or "" for none.
fn take(s: *mut c_char) -> String {
    take_string(s).unwrap_or_default()
}

/// Loads the file on the CPU and reads its forward schema.
pub fn describe(path: &Path) -> Result<ModuleDescription> {
    if !path.is_file() {
        return Err(Error::file(path, "no such file"));
    }
    let bad = |m: String| Error::Artifact {
        path: path.display().to_string(),
        message: m,
    };
    let c_path = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| bad("path contains NUL".into()))?;
    let c_extra = CString::new(ARTIFACT_EXTRA_FILE).map_err(|_| bad("bad extra name".into()))?;
    let (mut schema, mut extra, mut err) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: valid NUL-terminated inputs and out-pointers for the duration of the call.
    let rc = unsafe {
        vmsn_rt_describe(
            c_path.as_ptr(),
            c_extra.as_ptr(),
            &mut schema,
            &mut extra,
            &mut err,
        )
    };
    if rc != 0 {
        return Err(bad(take(err)));
    }
    let forward_schema = take(schema);
    let extra = take(extra);
    let vit_msn = if extra.is_empty() {
        None
    } else {
        serde_json::from_str(&extra).ok()
    };
    Ok(ModuleDescription {
        forward_schema,
        vit_msn,
    })
}
