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
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::bundle::{lock_bundle, sha256_of, DEFAULT_LOCK_WAIT};
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
            crate::bundle::stage_entry(&e.path(), &writer.staged.join(&name))?;
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
