//! The one bundle writer. Every bundle is written here, whoever makes its
//! artifacts: `vit-msn compile` (the graph's tracer), `fewshot fit` (the
//! classifier composer), `bundle replace` and `bundle pack` (files traced
//! elsewhere, e.g. by graph/python/export.py).
//!
//! A bundle is staged in a folder beside its target. Each artifact is hashed
//! as it is recorded, the manifest is written last (and parsed back, so
//! nothing the loader would refuse is ever written), and the folder is renamed
//! into place under the bundle's lock. On any failure, or when the writer is
//! dropped unfinished, the staging folder is removed and the target is as it
//! was.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::bundle::sha256_of;
use crate::error::{Error, Result};
use crate::fsutil::{
    check_output_dir, remove_stale_siblings, replace_dir, resolve_output_dir, sibling_tmp,
    write_atomic, OutputDir,
};
use crate::manifest::{ArtifactEntry, Manifest, MANIFEST_FILE};

pub struct BundleWriter {
    out: PathBuf,
    staged: PathBuf,
    artifacts: Vec<ArtifactEntry>,
    finished: bool,
}

impl BundleWriter {
    /// Starts a new bundle at `out`, which it replaces whole if it is a
    /// bundle already. `inputs` are paths the bundle must not overwrite or
    /// contain (the model folder it is made from).
    pub fn create(out: &Path, inputs: &[&Path]) -> Result<Self> {
        let out = resolve_output_dir(out);
        check_output_dir(&out, OutputDir::Bundle, inputs)?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        Self::stage(out)
    }

    /// Errors when [`BundleWriter::create`] would refuse to write a bundle at
    /// `out`: for a command to check before its slow part (`fewshot fit`
    /// embeds images first), not after it.
    pub fn check_target(out: &Path, inputs: &[&Path]) -> Result<()> {
        check_output_dir(out, OutputDir::Bundle, inputs)
    }

    /// Starts rewriting the existing bundle `dir` (whose lock the caller
    /// holds): every entry but the manifest and the files named in `except`
    /// is carried over, files as hard links where the file system allows.
    pub(crate) fn rewrite(dir: &Path, except: &[&str]) -> Result<Self> {
        let writer = Self::stage(resolve_output_dir(dir))?;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name();
            let name_text = name.to_string_lossy();
            if name == MANIFEST_FILE || except.contains(&name_text.as_ref()) {
                continue;
            }
            stage_entry(&e.path(), &writer.staged.join(&name))?;
        }
        Ok(writer)
    }

    fn stage(out: PathBuf) -> Result<Self> {
        remove_stale_siblings(&out);
        let staged = sibling_tmp(&out);
        std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        Ok(Self {
            out,
            staged,
            artifacts: Vec::new(),
            finished: false,
        })
    }

    /// The folder artifacts are written into before [`BundleWriter::add_artifact`].
    pub fn staging(&self) -> &Path {
        &self.staged
    }

    /// Where the artifact file `file` goes; it must be a plain file name.
    pub fn artifact_path(&self, file: &str) -> Result<PathBuf> {
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(Error::file(
                &self.out,
                format!("artifact file name `{file}` is not a plain file name"),
            ));
        }
        Ok(self.staged.join(file))
    }

    /// Records an artifact already written at `artifact_path(&entry.file)`,
    /// with the sha256 of what is there.
    pub fn add_artifact(&mut self, mut entry: ArtifactEntry) -> Result<()> {
        let path = self.artifact_path(&entry.file)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        entry.sha256 = sha256_of(&file).map_err(|e| Error::io(&path, e))?;
        self.record(entry)
    }

    /// Writes `bytes` as the artifact `entry.file`, hashing them as they are
    /// written, and records it.
    pub fn write_artifact(&mut self, mut entry: ArtifactEntry, bytes: &[u8]) -> Result<()> {
        let path = self.artifact_path(&entry.file)?;
        let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut hasher = Sha256::new();
        for chunk in bytes.chunks(1 << 20) {
            hasher.update(chunk);
            file.write_all(chunk).map_err(|e| Error::io(&path, e))?;
        }
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        entry.sha256 = vit_msn_format::hex(&hasher.finalize());
        self.record(entry)
    }

    fn record(&mut self, entry: ArtifactEntry) -> Result<()> {
        if let Some(i) = self.artifacts.iter().position(|a| a.file == entry.file) {
            self.artifacts[i] = entry;
        } else {
            self.artifacts.push(entry);
        }
        Ok(())
    }

    /// Writes `manifest` with the recorded artifacts (those it lists keep
    /// their order; new ones follow), checks it as the loader would, and then
    /// puts the bundle in place under the lock of the bundle it replaces (the
    /// lock is held only for the rename).
    pub fn finish(mut self, manifest: Manifest) -> Result<Manifest> {
        let manifest = self.seal(manifest)?;
        let _lock = if self.out.is_dir() {
            Some(lock_bundle(&self.out, DEFAULT_LOCK_WAIT)?)
        } else {
            None
        };
        self.rename(manifest)
    }

    /// [`BundleWriter::finish`] for a caller that holds the bundle's lock.
    pub(crate) fn finish_locked(mut self, manifest: Manifest) -> Result<Manifest> {
        let manifest = self.seal(manifest)?;
        self.rename(manifest)
    }

    /// The manifest, with the recorded artifacts, checked and written.
    fn seal(&mut self, mut manifest: Manifest) -> Result<Manifest> {
        let mut artifacts = Vec::new();
        for listed in &manifest.artifacts {
            if let Some(i) = self.artifacts.iter().position(|a| a.file == listed.file) {
                artifacts.push(self.artifacts.remove(i));
            } else {
                artifacts.push(listed.clone());
            }
        }
        artifacts.append(&mut self.artifacts);
        manifest.artifacts = artifacts;
        let path = self.staged.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::file(&path, e.to_string()))?;
        // What the loader would refuse is never written.
        Manifest::parse(&text, &self.out.join(MANIFEST_FILE))?;
        for a in &manifest.artifacts {
            crate::fsutil::check_regular_file(&self.staged.join(&a.file))?;
        }
        write_atomic(&path, text.as_bytes())?;
        Ok(manifest)
    }

    fn rename(mut self, manifest: Manifest) -> Result<Manifest> {
        replace_dir(&self.staged, &self.out)?;
        self.finished = true;
        Ok(manifest)
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.staged);
        }
    }
}

/// How long [`replace_artifact`] (and a compile or few-shot fit over an
/// existing bundle) waits for another process changing the same bundle
/// before it gives up.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Puts a copy of `from` (a file, a symlink or a whole folder, such as the
/// `cache/` that `fewshot fit` keeps in a backbone bundle) at `to`: files as
/// hard links where the file system allows, else as copies. Anything else
/// (a FIFO, a socket) is refused rather than silently dropped.
pub(crate) fn stage_entry(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| Error::io(from, e))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        std::fs::create_dir(to).map_err(|e| Error::io(to, e))?;
        for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let e = e.map_err(|e| Error::io(from, e))?;
            stage_entry(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if kind.is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| Error::io(from, e))?;
        std::os::unix::fs::symlink(target, to).map_err(|e| Error::io(to, e))
    } else if kind.is_file() {
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
        }
        Ok(())
    } else {
        Err(Error::file(
            from,
            "is not a file or folder, and a bundle rewrite would lose it; move it out of the bundle first",
        ))
    }
}

/// An exclusive `flock` on the bundle folder itself, held while it is
/// changed; released when the returned file is dropped. Nothing is left
/// beside the bundle. The folder is replaced by rename, so a lock won on a
/// folder that is no longer at `dir` (the previous holder swapped in a new
/// one) is let go and taken again on the folder now there.
pub(crate) fn lock_bundle(dir: &Path, wait: Duration) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + wait;
    loop {
        let folder = File::open(dir).map_err(|e| Error::io(dir, e))?;
        if !folder.metadata().map_err(|e| Error::io(dir, e))?.is_dir() {
            return Err(Error::file(dir, "is not a bundle folder"));
        }
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(folder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            let busy = matches!(err.raw_os_error(), Some(libc::EWOULDBLOCK | libc::EINTR));
            if !busy {
                return Err(Error::io(dir, err));
            }
            if Instant::now() >= deadline {
                return Err(Error::file(
                    dir,
                    format!(
                        "another process is changing this bundle (waited {} s); try again when it has finished",
                        wait.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let locked = folder.metadata().map_err(|e| Error::io(dir, e))?;
        let now = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if (locked.dev(), locked.ino()) == (now.dev(), now.ino()) {
            return Ok(folder);
        }
    }
}
