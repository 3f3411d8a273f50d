//! Files on disk: written beside their target and renamed into place (never
//! half-written), and read only when they are regular files (never blocked).
//!
//! The pieces the library's writers are built from. Commands use the entry
//! points of [`crate::files`] (and [`crate::writer::BundleWriter`] for
//! bundles), which decide what may be written where; this module stays
//! public for tests of the pieces themselves.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary path in the same folder as `target`, so the rename is atomic.
pub fn sibling_tmp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Errors when `target` is a folder, FIFO or device, which a file must never
/// be renamed over (a symlink may be: it is replaced, not what it points to).
pub fn check_replaceable_file(target: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(target) {
        if !meta.is_file() && !meta.file_type().is_symlink() {
            return Err(Error::file(
                target,
                "exists and is not a regular file; refusing to replace it",
            ));
        }
    }
    Ok(())
}

/// Calls `write` on a temporary path beside `target`, then renames it into
/// place; a target [`check_replaceable_file`] refuses is left alone.
pub fn write_atomic_with(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable_file(target)?;
    let tmp = sibling_tmp(target);
    let result =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(target, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(target, e))
    })
}

/// The folder a command should write for `out`: an existing one by its real
/// path, so a symlink (`current -> releases/v3`) updates what it points to
/// rather than being replaced by a folder, and `.` or `..` name real folders.
pub fn resolve_output_dir(out: &Path) -> PathBuf {
    out.canonicalize().unwrap_or_else(|_| out.to_path_buf())
}

/// What a command may replace when it writes a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputDir {
    /// A bundle: an older vit-msn bundle holding only its own files may be replaced.
    Bundle,
    /// Anything else: only an absent or empty folder.
    New,
}

/// Errors unless writing the folder `out` can lose nothing that is not ours:
/// `out` must be absent, an empty folder, or (for [`OutputDir::Bundle`]) an
/// older bundle holding nothing but its own files, and none of `inputs` may be
/// `out` or lie inside it.
pub fn check_output_dir(out: &Path, kind: OutputDir, inputs: &[&Path]) -> Result<()> {
    let meta = match std::fs::metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(out, e)),
    };
    if !meta.is_dir() {
        return Err(Error::file(
            out,
            "exists and is not a folder; refusing to replace it",
        ));
    }
    let out_real = out.canonicalize().map_err(|e| Error::io(out, e))?;
    // Replacing is a rename, and the folder a shell stands in would vanish
    // from under it (rename refuses `.` itself).
    if std::env::current_dir().is_ok_and(|cwd| cwd == out_real) {
        return Err(Error::file(
            out,
            "is the current folder, which cannot be replaced; write to another folder",
        ));
    }
    for input in inputs {
        if input.canonicalize().is_ok_and(|p| p.starts_with(&out_real)) {
            return Err(Error::file(
                out,
                format!(
                    "holds {}, an input of this command; refusing to replace it",
                    input.display()
                ),
            ));
        }
    }
    let entries: Vec<String> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(out, e))?;
    if entries.is_empty() {
        return Ok(());
    }
    if kind == OutputDir::New {
        return Err(Error::file(
            out,
            "exists and is not empty; refusing to replace it (remove it first)",
        ));
    }
    let Some(bundle_files) = bundle_files(out) else {
        return Err(Error::file(
            out,
            "exists and is not a bundle (no vit-msn manifest.json); refusing to replace it",
        ));
    };
    let foreign: Vec<&str> = entries
        .iter()
        .map(String::as_str)
        .filter(|name| !bundle_files.iter().any(|f| f == name))
        .collect();
    if !foreign.is_empty() {
        return Err(Error::file(
            out,
            format!(
                "is a bundle but also holds {} that are not part of it; refusing to replace it",
                foreign.join(", ")
            ),
        ));
    }
    Ok(())
}

/// What a bundle folder may hold, as its manifest.json names it: the manifest,
/// the artifacts, and the few-shot embeddings `cache`. `None` unless the
/// manifest reads as a vit-msn manifest.
fn bundle_files(dir: &Path) -> Option<Vec<String>> {
    let path = dir.join(crate::manifest::MANIFEST_FILE);
    check_regular_file(&path).ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    manifest.get("format_version")?.as_u64()?;
    let mut files = vec![
        crate::manifest::MANIFEST_FILE.to_owned(),
        "cache".to_owned(),
    ];
    for artifact in manifest.get("artifacts")?.as_array()? {
        files.push(artifact.get("file")?.as_str()?.to_owned());
    }
    Some(files)
}

/// Errors when the output file `out` is one of the command's input files,
/// which writing it would destroy: an input given by name, or an image the
/// command would read from an input folder (other files in those folders,
/// such as an earlier run's outputs, are fine).
pub fn check_output_file(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out_real) = out.canonicalize() else {
        return Ok(()); // Not there yet: it cannot be an input.
    };
    for input in inputs {
        let Ok(input_real) = input.canonicalize() else {
            continue;
        };
        let read_as_image = input_real.is_dir()
            && out_real.starts_with(&input_real)
            && crate::image::is_image_path(&out_real);
        if out_real == input_real || read_as_image {
            return Err(Error::file(
                out,
                format!(
                    "is {}an input of this command ({}); refusing to overwrite it",
                    if read_as_image { "an image in " } else { "" },
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Moves a finished directory `staged` to `target`, replacing any old one: at
/// every moment `target` is the old bundle, nothing, or the new bundle.
pub fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        // `.NAME.tmp-PID.old`: per process, and swept like the staged folder
        // if this process dies between the two renames.
        let mut old = sibling_tmp(target).into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
        std::fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
    }
    Ok(())
}

/// Removes what interrupted writes of `target` left beside it (the staged
/// `.NAME.tmp-PID` files and folders of processes that were killed). An
/// entry whose PID is a running process is another writer's, still in
/// use, and is left alone; so is one without a PID (export.py's random
/// suffix) until it has not changed for an hour.
pub fn remove_stale_siblings(target: &Path) {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    // `PID` or `PID.old` (replace_dir's), else a random name (export.py's).
    let live = |suffix: &str| match suffix.split('.').next().unwrap_or("").parse::<u32>() {
        // Our own PID is not another writer: what it names is a leftover.
        Ok(pid) => pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => std::fs::symlink_metadata(parent.join(format!("{prefix}{suffix}")))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < std::time::Duration::from_secs(3600)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(&prefix)
            .is_some_and(|suffix| !live(suffix))
        {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Errors unless `path` is a regular file (symlinks followed). A FIFO or a
/// device in its place would block a read, or never end one.
pub fn check_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        Ok(())
    } else if meta.is_dir() {
        Err(Error::file(path, "is a directory, not a file"))
    } else {
        Err(Error::file(path, "not a regular file"))
    }
}

/// Reads a whole regular file (see [`check_regular_file`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    check_regular_file(path)?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole regular file as UTF-8 text (see [`check_regular_file`]).
pub fn read_regular_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| Error::file(path, "not UTF-8 text"))
}
