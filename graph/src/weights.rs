//! Reading a Hugging Face model folder's weights: `model.safetensors`, a
//! sharded `model.safetensors.index.json`, or `pytorch_model.bin` (also
//! sharded), saved from `ViTMSNModel` (no prefix) or from
//! `ViTMSNForImageClassification` (backbone under `vit.`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{nn::VarStore, Kind, Tensor};

use crate::Error;

/// All tensors of a checkpoint as f32 on the CPU, keyed by their name without
/// the `vit.` prefix.
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Tensor>,
    /// Each weight file read, with its sha256.
    pub files: Vec<(String, String)>,
}

/// The weight files of a model folder, in the order they are read: the
/// first of `model.safetensors`, `model.safetensors.index.json`,
/// `pytorch_model.bin`, `pytorch_model.bin.index.json` that exists, an
/// index standing for the shards it names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let candidates = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ];
    let found = candidates
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file());
    let Some(path) = found else {
        return Err(Error::Weights(format!(
            "{}: no weights file (looked for {})",
            dir.display(),
            candidates.join(", ")
        )));
    };
    if path.to_string_lossy().ends_with(".index.json") {
        shard_files(&path)
    } else {
        Ok(vec![path])
    }
}

impl Checkpoint {
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let shards = weight_files(dir)?;
        let mut ckpt = Checkpoint {
            tensors: BTreeMap::new(),
            files: Vec::new(),
        };
        for shard in &shards {
            let bytes = crate::read_regular(shard)?;
            let tensors = if shard.extension().is_some_and(|e| e == "safetensors") {
                read_safetensors(shard, &bytes)?
            } else {
                read_pytorch_bin(shard)?
            };
            for (name, tensor) in tensors {
                let name = name.strip_prefix("vit.").map(str::to_owned).unwrap_or(name);
                ckpt.tensors.insert(name, tensor);
            }
            let file_name = shard
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            ckpt.files
                .push((file_name, vit_msn_format::sha256_hex(&bytes)));
        }
        Ok(ckpt)
    }

    /// Copies the checkpoint into every variable of `vs` (whose names are the
    /// checkpoint's), checking each shape. Variables named in `optional` keep
    /// their initial value when absent. Returns the checkpoint tensors that
    /// nothing used, for a warning.
    pub fn load_into(&self, vs: &VarStore, optional: &[&str]) -> Result<Vec<String>, Error> {
        let variables = vs.variables();
        let mut names: Vec<&String> = variables.keys().collect();
        names.sort();
        for name in names {
            let var = &variables[name];
            let expected = var.size();
            let Some(src) = self.tensors.get(name) else {
                if optional.contains(&name.as_str()) {
                    continue;
                }
                return Err(Error::MissingTensor {
                    name: name.clone(),
                    expected,
                });
            };
            if src.size() != expected {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected,
                    found: src.size(),
                });
            }
            tch::no_grad(|| var.shallow_clone().f_copy_(src)).map_err(|e| {
                Error::Weights(format!(
                    "tensor `{name}`: {}",
                    e.to_string().lines().next().unwrap_or_default()
                ))
            })?;
        }
        Ok(self
            .tensors
            .keys()
            .filter(|k| !variables.contains_key(*k))
            .cloned()
            .collect())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>, Error> {
    let text = crate::read_regular(index)?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Weights(format!("{}: not valid JSON: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights(format!("{}: no `weight_map` object", index.display())))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::Weights(format!(
                "{}: shard of `{tensor}` is not a string",
                index.display()
            ))
        })?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_owned());
        }
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    files
        .into_iter()
        .map(|f| {
            // A shard is a plain file name beside the index, never a path out of the folder.
            let path = dir.join(&f);
            if f.contains('/') || f.contains('\\') || f == ".." || !path.is_file() {
                Err(Error::Weights(format!(
                    "{}: names shard `{f}`, which is not a file in {}",
                    index.display(),
                    dir.display()
                )))
            } else {
                Ok(path)
            }
        })
        .collect()
}

/// A checkpoint's safetensors shard: floating-point tensors only, as f32.
pub fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, Error> {
    let bad = |m: String| Error::Weights(format!("{}: {m}", path.display()));
    vit_msn_format::read_safetensors(bytes)
        .map_err(bad)?
        .into_iter()
        .map(|(name, t)| {
            if !t.is_floating_point() {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {}; only F32, F16, BF16 and F64 are read",
                    vit_msn_format::safetensors_dtype_name(t.kind())
                )));
            }
            let t = t
                .f_to_kind(Kind::Float)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// A `torch.save` zip file holding a state dict (`pytorch_model.bin`), read by
/// libtorch's unpickler (which runs no code) through shim/state_dict.cpp,
/// which refuses any tensor larger than the data the file holds for it;
/// floating-point tensors as f32.
pub fn read_pytorch_bin(path: &Path) -> Result<Vec<(String, Tensor)>, Error> {
    let unreadable = |what: String| {
        Error::Weights(format!(
            "{}: not a readable PyTorch state dict: {what}",
            path.display()
        ))
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| unreadable("the path contains a NUL byte".into()))?;
    let mut entries: Vec<(Vec<u8>, Tensor)> = Vec::new();
    let mut err = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path, `entries` outlives the call, and
    // `collect_entry` matches the callback type the shim calls.
    let status = unsafe {
        vmsn_load_state_dict(
            c_path.as_ptr(),
            (&mut entries as *mut Vec<(Vec<u8>, Tensor)>).cast(),
            collect_entry,
            &mut err,
        )
    };
    if status != 0 {
        return Err(unreadable(crate::trace::take_message(err)));
    }
    entries
        .into_iter()
        .map(|(name, t)| {
            let name = String::from_utf8(name).map_err(|e| {
                unreadable(format!(
                    "a tensor name is not UTF-8: {:?}",
                    String::from_utf8_lossy(e.as_bytes())
                ))
            })?;
            if !t.is_floating_point() {
                return Ok((name, t));
            }
            let t = t
                .f_to_kind(Kind::Float)
                .map_err(|e| Error::Weights(format!("{}: tensor `{name}`: {e}", path.display())))?;
            Ok((name, t))
        })
        .collect()
}

/// The state-dict reader's callback: one entry, its name as bytes (never
/// decoded here: a panic must not cross the C boundary).
extern "C" fn collect_entry(
    data: *mut std::ffi::c_void,
    name: *const std::ffi::c_char,
    len: usize,
    tensor: *mut torch_sys::C_tensor,
) {
    // SAFETY: `data` is the Vec that read_pytorch_bin passed, `name` points
    // at `len` bytes for the duration of the call, and `tensor` is a new
    // handle handed over to us.
    unsafe {
        let entries = &mut *(data as *mut Vec<(Vec<u8>, Tensor)>);
        let name = std::slice::from_raw_parts(name.cast::<u8>(), len).to_vec();
        entries.push((name, Tensor::from_ptr(tensor)));
    }
}

extern "C" {
    /// shim/state_dict.cpp.
    fn vmsn_load_state_dict(
        path: *const std::ffi::c_char,
        data: *mut std::ffi::c_void,
        f: extern "C" fn(
            *mut std::ffi::c_void,
            *const std::ffi::c_char,
            usize,
            *mut torch_sys::C_tensor,
        ),
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
}
