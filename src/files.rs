//! The files a command reads and writes for its user, with the decisions
//! about them made here, once, rather than by each command:
//!
//! - a result file (`--output`, `--embeddings`, a baseline, a picture) is
//!   never one of the command's inputs, and is written beside its target and
//!   renamed into place, so it is never half-written;
//! - a new folder (`vit-msn init`) is written only where nothing would be
//!   lost, staged beside its target the same way;
//! - an input file is read only when it is a regular file (a FIFO or a
//!   device in its place would block the read, or never end it).
//!
//! Bundles have their own writer, [`crate::writer::BundleWriter`].

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::{self, OutputDir};

/// Errors when writing the result file `out` would destroy an input of the
/// command: an input given by name, or an image the command would read from
/// an input folder (other files in those folders, such as an earlier run's
/// outputs, are fine).
pub fn check_result_file(out: &Path, inputs: &[&Path]) -> Result<()> {
    fsutil::check_output_file(out, inputs)
}

/// Errors when [`write_result_file`] would refuse `out` (a folder, FIFO or
/// device is there): for a command to check before a long run, not after it.
pub fn check_replaceable_file(out: &Path) -> Result<()> {
    fsutil::check_replaceable_file(out)
}

/// Writes `bytes` to `out` atomically: beside it, then renamed into place.
pub fn write_result_file(out: &Path, bytes: &[u8]) -> Result<()> {
    fsutil::write_atomic(out, bytes)
}

/// [`write_result_file`] for content that a library writes to a path of
/// its own: `write` is given the temporary path to write.
pub fn write_result_file_with(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    fsutil::write_atomic_with(out, write)
}

/// Reads a whole input file, refusing anything but a regular file.
pub fn read_input_file(path: &Path) -> Result<Vec<u8>> {
    fsutil::read_regular(path)
}

/// [`read_input_file`] as UTF-8 text.
pub fn read_input_text(path: &Path) -> Result<String> {
    fsutil::read_regular_text(path)
}

/// Checks that the folder `out` can be written as a new folder (it is
/// absent or empty, and holds none of `inputs`), and returns the path to
/// write it at: an existing folder by its real path, so a symlink to it is
/// kept. Errors name that path.
pub fn check_new_folder(out: &Path, inputs: &[&Path]) -> Result<PathBuf> {
    let out = fsutil::resolve_output_dir(out);
    fsutil::check_output_dir(&out, OutputDir::New, inputs)?;
    Ok(out)
}

/// Writes the folder `out` (as [`check_new_folder`] returned it): `write`
/// fills a staging folder beside it, which is then renamed into place; on
/// failure it is removed and `out` is as it was. What killed writers left
/// beside `out` is swept first.
pub fn write_new_folder(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    fsutil::remove_stale_siblings(out);
    let staged = fsutil::sibling_tmp(out);
    let result = write(&staged).and_then(|()| fsutil::replace_dir(&staged, out));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}
