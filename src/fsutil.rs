//! Files on disk: written beside their target and renamed into place (never
//! half-written), and read only when they are regular files (never blocked).

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

/// Calls `write` on a temporary path beside `target`, then renames it into place.
pub fn write_atomic_with(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
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

/// Moves a finished directory `staged` to `target`, replacing any old one: at
/// every moment `target` is the old bundle, nothing, or the new bundle.
pub fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = sibling_tmp(target).with_extension("old");
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
        std::fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
    }
    Ok(())
}

/// Removes what interrupted writes of `target` left beside it (the staged
/// `.NAME.tmp-PID` files and folders of processes that were killed).
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
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
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
