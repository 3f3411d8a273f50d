//! A served model: the bundle version now answering, and how a new one
//! replaces it. A new version is loaded, verified and warmed up beside the
//! old one, then swapped in with one pointer store; a batch already running
//! keeps the version it started with, so no request mixes the two.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::Value;
use vit_msn::bundle::LoadOptions;
use vit_msn::manifest::{Manifest, MANIFEST_FILE};
use vit_msn::{Bundle, Device};

use super::log;

/// How often each bundle folder is looked at for a replacement.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// One loaded version of a model's bundle.
pub struct Version {
    /// 1 for the first load, then one more per swap.
    pub number: u64,
    /// The sha256 of the manifest it was loaded from: it names every
    /// artifact's digest in turn, so it identifies the whole bundle.
    pub manifest_sha256: String,
    pub bundle: Bundle,
    /// The size an `image` input is preprocessed to, or why images cannot be taken.
    pub image_size: Result<(i64, i64), String>,
    /// `GET /v2/models/{m}`, prepared at load.
    pub metadata: Value,
}

impl Version {
    /// The output names a request may ask for, in the order they are returned
    /// by default: the manifest's, with `embedding` after `last_hidden_state`.
    pub fn output_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Some(entry) = self.bundle.manifest().artifacts.first() {
            for spec in &entry.outputs {
                names.push(spec.name.clone());
                if spec.name == "last_hidden_state" {
                    names.push("embedding".into());
                }
            }
        }
        names
    }
}

/// What identifies a bundle folder's contents on disk: the manifest's bytes
/// and each listed file's identity. Cheap to take every half second.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    manifest_sha256: String,
    files: Vec<(String, u64, i64, i64, u64)>,
}

/// Reads the manifest's bytes (bounded), for its digest and for loading.
fn read_manifest(dir: &Path) -> Option<(String, String)> {
    let path = dir.join(MANIFEST_FILE);
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 64 << 20 {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let digest = vit_msn::bundle::sha256_hex(text.as_bytes());
    Some((text, digest))
}

fn signature(dir: &Path) -> Option<Signature> {
    let (text, manifest_sha256) = read_manifest(dir)?;
    let files = Manifest::parse(&text, &dir.join(MANIFEST_FILE))
        .map(|m| {
            m.artifacts
                .iter()
                .map(|a| match std::fs::metadata(dir.join(&a.file)) {
                    Ok(md) => (
                        a.file.clone(),
                        md.len(),
                        md.mtime(),
                        md.mtime_nsec(),
                        md.ino(),
                    ),
                    Err(_) => (a.file.clone(), 0, 0, 0, 0),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Signature {
        manifest_sha256,
        files,
    })
}

/// A model name and the bundle folder it is served from.
pub struct Model {
    pub name: String,
    pub dir: PathBuf,
    device: Device,
    current: RwLock<Option<Arc<Version>>>,
    /// Serialises loads (the watcher's and `POST .../load`), and remembers
    /// what was last looked at, so a refused folder is not retried until it
    /// changes again.
    loading: Mutex<LoadState>,
}

#[derive(Default)]
struct LoadState {
    seen: Option<Signature>,
    next_number: u64,
    /// After `POST .../unload`: the watcher leaves the folder alone until an
    /// explicit load.
    unloaded: bool,
}

impl Model {
    pub fn new(name: String, dir: PathBuf, device: Device) -> Self {
        Self {
            name,
            dir,
            device,
            current: RwLock::new(None),
            loading: Mutex::new(LoadState {
                next_number: 1,
                ..Default::default()
            }),
        }
    }

    /// The version answering now, if one is loaded.
    pub fn current(&self) -> Option<Arc<Version>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads the folder as it is now, verified and warmed up, and swaps it in
    /// if `force` or it differs from what was last looked at. Returns the new
    /// version's number, `Ok(None)` when nothing changed, or why the folder
    /// was refused (the old version keeps serving).
    pub fn reload(
        &self,
        force: bool,
        metrics_version: &prometheus::IntGaugeVec,
    ) -> Result<Option<u64>, String> {
        let mut state = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        let before = signature(&self.dir);
        if !force && (state.unloaded || before.is_none() || before == state.seen) {
            return Ok(None);
        }
        let number = state.next_number;
        // On a thread of its own, which exits when done: the OpenMP team a
        // thread gets for libtorch's parallel ops lives as long as the
        // thread, and a second live team next to the batcher's makes
        // libgomp stop spinning, which costs the forward pass about 20%.
        let loaded = std::thread::scope(|s| s.spawn(|| self.load(number)).join());
        let loaded = loaded.unwrap_or_else(|_| Err("loading panicked".to_string()));
        match loaded {
            Ok(version) => {
                let version = Arc::new(version);
                let old = self
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace(version.clone());
                state.seen = before;
                state.next_number += 1;
                state.unloaded = false;
                metrics_version
                    .with_label_values(&[&self.name])
                    .set(number as i64);
                let digest = &version.manifest_sha256[..12];
                match old {
                    None => log(&format!(
                        "model {}: loaded version {number} (manifest {digest}) from {}",
                        self.name,
                        self.dir.display()
                    )),
                    Some(old) => log(&format!(
                        "model {}: swapped version {} for version {number} (manifest {digest})",
                        self.name, old.number
                    )),
                }
                Ok(Some(number))
            }
            Err(message) => {
                // A folder that changed while it was being read (a rename
                // landing mid-load) is looked at again on the next round.
                if signature(&self.dir) == before {
                    state.seen = before;
                }
                log(&format!(
                    "model {}: refused the bundle in {}: {message}{}",
                    self.name,
                    self.dir.display(),
                    if self.current().is_some() {
                        "; the previous version keeps serving"
                    } else {
                        ""
                    }
                ));
                Err(message)
            }
        }
    }

    fn load(&self, number: u64) -> Result<Version, String> {
        let (text, manifest_sha256) = read_manifest(&self.dir).ok_or_else(|| {
            format!(
                "{}: cannot read the manifest",
                self.dir.join(MANIFEST_FILE).display()
            )
        })?;
        let manifest =
            Manifest::parse(&text, &self.dir.join(MANIFEST_FILE)).map_err(|e| e.to_string())?;
        let bundle =
            Bundle::load_manifest(&self.dir, manifest, self.device, &LoadOptions::default())
                .map_err(|e| e.to_string())?;
        let image_size = bundle.image_size().map_err(|e| e.to_string());
        let metadata = super::metadata::metadata(&self.name, number, &manifest_sha256, &bundle);
        Ok(Version {
            number,
            manifest_sha256,
            bundle,
            image_size,
            metadata,
        })
    }

    /// `POST .../unload`: the model stops answering until loaded again.
    pub fn unload(&self, metrics_version: &prometheus::IntGaugeVec) {
        let mut state = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        state.unloaded = true;
        state.seen = None;
        if let Some(old) = self
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            log(&format!(
                "model {}: unloaded version {}",
                self.name, old.number
            ));
        }
        metrics_version.with_label_values(&[&self.name]).set(0);
    }
}

/// Watches each model's folder until `stop`, swapping in replacements.
pub fn watch(
    models: Vec<Arc<Model>>,
    stop: Arc<AtomicBool>,
    version: prometheus::IntGaugeVec,
    _done: Sender<()>,
) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(WATCH_INTERVAL);
        for m in &models {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Refusals are logged by `reload`; the old version keeps serving.
            let _ = m.reload(false, &version);
        }
    }
}
