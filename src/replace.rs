//! `vit-msn bundle replace`: one resolution's artifact swapped for a new
//! TorchScript file, checked first, through the bundle writer.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::bundle::{check_against_description, load_open_file, onednn_fallback, outputs_by_name};
use crate::describe::{embedded_description, ARTIFACT_EXTRA_FILE};
use crate::device::parse_dtype;
use crate::error::{first_line, Error, Result};
use crate::fsutil::check_regular_file;
use crate::manifest::{ArtifactEntry, Manifest};
use crate::writer::{lock_bundle, BundleWriter, DEFAULT_LOCK_WAIT};

/// Swaps the artifact compiled for `height`×`width` for `new_artifact`, after
/// checking that the new file loads, accepts the bundle's inputs, returns
/// the manifest's outputs at their shapes (a probe run at batch 2) and, when
/// it describes itself, was compiled for this slot's dtype and specs. The
/// bundle is rewritten whole beside itself (sub-folders such as `cache/`
/// included) and renamed into place; on any refusal it is left untouched.
/// Waits up to [`DEFAULT_LOCK_WAIT`] while another process changes it.
pub fn replace_artifact(dir: &Path, height: i64, width: i64, new_artifact: &Path) -> Result<()> {
    replace_artifact_waiting(dir, height, width, new_artifact, DEFAULT_LOCK_WAIT)
}

/// [`replace_artifact`], waiting at most `wait` for the bundle's lock
/// (`Duration::ZERO`: fail at once when another process holds it).
pub fn replace_artifact_waiting(
    dir: &Path,
    height: i64,
    width: i64,
    new_artifact: &Path,
    wait: Duration,
) -> Result<()> {
    let dir = &crate::fsutil::resolve_output_dir(dir);
    // Held until the new bundle is in place: the manifest read below must
    // still be the bundle's when the rewritten one lands.
    let _lock = lock_bundle(dir, wait)?;
    let mut manifest = Manifest::read(dir)?;
    let index = manifest
        .artifacts
        .iter()
        .position(|a| a.height == height && a.width == width)
        .ok_or_else(|| {
            Error::input(
                "resolution",
                format!(
                    "{height}x{width} is not in the bundle, which has {}",
                    manifest.resolutions().join(", ")
                ),
            )
        })?;
    // The bytes copied into the bundle are those of the file that was probed.
    check_regular_file(new_artifact)?;
    let mut file = File::open(new_artifact).map_err(|e| Error::io(new_artifact, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(new_artifact, e))?;
    let refuse = |m: String| Error::Artifact {
        path: new_artifact.display().to_string(),
        message: m,
    };
    let own = embedded_description(&file);
    // A file of another dtype fails the probe with libtorch's opaque
    // message; its own description says why.
    if let Some(dtype) = own.as_ref().map(|d| d.dtype.as_str()) {
        if dtype != manifest.dtype {
            return Err(refuse(format!(
                "it was compiled for {dtype}, and the bundle's artifacts are {} (its {ARTIFACT_EXTRA_FILE})",
                manifest.dtype
            )));
        }
    }
    let mut module = load_open_file(&file, new_artifact, Device::Cpu)
        .map_err(|e| refuse(format!("does not load: {e}")))?;
    if onednn_fallback(&manifest.dtype, Device::Cpu).is_some() {
        module
            .unfuse_onednn_linears()
            .map_err(|e| refuse(format!("does not load: {e}")))?;
    }
    let entry = &manifest.artifacts[index];
    let kind = parse_dtype(&manifest.dtype)?;
    let batch = 2;
    let probe: Vec<Tensor> = entry
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<i64> = spec
                .shape
                .iter()
                .map(|&d| if d < 0 { batch } else { d })
                .collect();
            match spec.name.as_str() {
                "bool_masked_pos" => Tensor::zeros(shape.as_slice(), (Kind::Bool, Device::Cpu)),
                "head_mask" => Tensor::ones(shape.as_slice(), (kind, Device::Cpu)),
                _ => Tensor::zeros(shape.as_slice(), (kind, Device::Cpu)),
            }
        })
        .collect();
    let probe: Vec<&Tensor> = probe.iter().collect();
    let result = module.forward(&probe).map_err(|e| {
        refuse(format!(
            "its forward does not accept the bundle's inputs: {}",
            first_line(&e)
        ))
    })?;
    let named = outputs_by_name(&entry.outputs, result);
    for spec in &entry.outputs {
        let want: Vec<i64> = spec
            .shape
            .iter()
            .map(|&d| if d < 0 { batch } else { d })
            .collect();
        match named.iter().find(|(n, _)| *n == spec.name) {
            None => return Err(refuse(format!("returns no `{}`", spec.name))),
            Some((_, t)) if t.size() != want => {
                return Err(refuse(format!(
                    "returns `{}` of shape {:?} at batch {batch}; the manifest says {want:?}",
                    spec.name,
                    t.size()
                )))
            }
            Some(_) => {}
        }
    }
    // The probe passes a file compiled for another resolution with as many
    // patches (64x16 for 32x32), which loading would then refuse: make the
    // check loading makes.
    if let Some(own) = &own {
        check_against_description(entry, own).map_err(refuse)?;
    }
    // The whole bundle is rewritten beside itself: other files carried over.
    let file = manifest.artifacts[index].file.clone();
    let mut writer = BundleWriter::rewrite(dir, &[&file])?;
    writer.write_artifact(
        ArtifactEntry {
            sha256: String::new(),
            // The new file's, as it describes itself (else unknown).
            attention: own.as_ref().and_then(|d| d.attention),
            ..manifest.artifacts[index].clone()
        },
        &bytes,
    )?;
    // The bundle now needs what the new file's kernels need, too.
    if let Some(own) = &own {
        manifest.cpu_features.extend(&own.cpu_features);
        manifest.cpu_features.sort();
        manifest.cpu_features.dedup();
    }
    writer.finish_locked(manifest).map(|_| ())
}
