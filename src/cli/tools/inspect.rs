//! `vit-msn inspect`: what a bundle's manifest says, and whether each
//! artifact still matches it; or what a TorchScript file says about itself.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use vit_msn::bundle::sha256_hex;
use vit_msn::cpu::{cpu_features_text, Cpu};
use vit_msn::describe::{describe, ArtifactDescription};
use vit_msn::manifest::MANIFEST_FILE;
use vit_msn::{Error, Manifest};

use crate::cli::CliResult;

/// Show a bundle's manifest, or a TorchScript file's forward schema.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn inspect artifacts/demo
  vit-msn inspect artifacts/demo --json
  vit-msn inspect artifacts/demo/model_224x224.pt")]
pub struct InspectArgs {
    /// A bundle folder or a .pt file.
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> CliResult {
    if a.path.is_dir() {
        let report = BundleReport::read(&a.path)?;
        print_report(&report, a.json)?;
        // After the listing: an artifact that differs from its manifest entry
        // is a failure, as it is for `run`, which refuses to load it.
        return Ok(report.digests_verified()?);
    }
    let d = describe(&a.path)?;
    let report = FileReport {
        file: a.path,
        forward: d.forward_schema,
        vit_msn: d.vit_msn,
    };
    print_report(&report, a.json)
}

/// `--json`: through a `serde_json::Value`, whose maps are sorted, so the
/// keys come out in alphabetical order at every level, as `inspect --json`
/// has always printed them; else the report's text.
fn print_report(report: &(impl Serialize + fmt::Display), as_json: bool) -> CliResult {
    if as_json {
        let sorted = serde_json::to_value(report)?;
        println!("{}", serde_json::to_string_pretty(&sorted)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// A bundle: its manifest, the CPU inspecting it, and each artifact's digest
/// checked against the manifest.
#[derive(Serialize)]
pub struct BundleReport {
    #[serde(skip)]
    dir: PathBuf,
    #[serde(flatten)]
    manifest: Manifest,
    this_cpu: String,
    /// Which kernels oneMKL runs here ([`vit_msn::mkl::MklKernels::describe`]).
    mkl: &'static str,
    digests_ok: Vec<DigestCheck>,
}

/// Whether an artifact's sha256 is the one its manifest entry records.
#[derive(Serialize)]
struct DigestCheck {
    file: String,
    ok: bool,
}

impl BundleReport {
    pub fn read(dir: &Path) -> vit_msn::Result<Self> {
        let manifest = Manifest::read(dir)?;
        let digests_ok = manifest
            .artifacts
            .iter()
            .map(|a| {
                // A file that cannot be read is as bad as one that differs.
                let ok = std::fs::read(dir.join(&a.file))
                    .map(|b| sha256_hex(&b) == a.sha256)
                    .unwrap_or(false);
                DigestCheck {
                    file: a.file.clone(),
                    ok,
                }
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            this_cpu: Cpu::detect().summary(),
            mkl: vit_msn::mkl::status().describe(),
            digests_ok,
        })
    }

    /// Errors when an artifact's digest does not match its manifest entry.
    pub fn digests_verified(&self) -> vit_msn::Result<()> {
        let bad: Vec<&str> = self
            .digests_ok
            .iter()
            .filter(|d| !d.ok)
            .map(|d| d.file.as_str())
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(Error::file(
            &self.dir,
            format!(
                "sha256 of {} does not match the manifest (or the file cannot be read)",
                bad.join(", ")
            ),
        ))
    }
}

impl fmt::Display for BundleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(
            f,
            "bundle:   {} ({} format {})",
            self.dir.join(MANIFEST_FILE).display(),
            m.compiler,
            m.format_version
        )?;
        writeln!(f, "task:     {}", m.task)?;
        let md = &m.model;
        writeln!(
            f,
            "model:    hidden {} · layers {} · heads {} · patch {} · channels {} · trained at {}",
            md.hidden_size,
            md.num_hidden_layers,
            md.num_attention_heads,
            md.patch_size,
            md.num_channels,
            md.image_size
        )?;
        writeln!(f, "dtype:    {}    device: {}", m.dtype, m.device)?;
        writeln!(
            f,
            "cpu features used: {}",
            cpu_features_text(&m.cpu_features)
        )?;
        writeln!(f, "this cpu: {}", self.this_cpu)?;
        writeln!(f, "oneMKL:   {}", self.mkl)?;
        if !md.labels.is_empty() {
            let first: Vec<&str> = md.labels.iter().take(10).map(String::as_str).collect();
            writeln!(f, "labels:   {} ({})", md.labels.len(), first.join(", "))?;
        }
        if let Some(p) = &m.preprocessing {
            writeln!(f, "preprocessing: {p}")?;
        }
        for (a, d) in m.artifacts.iter().zip(&self.digests_ok) {
            // By characters: a hand-edited digest need not be hex.
            let short: String = a.sha256.chars().take(16).collect();
            writeln!(
                f,
                "{}x{}: {}  sha256 {short} ({})",
                a.height,
                a.width,
                a.file,
                if d.ok { "verified" } else { "MISMATCH" }
            )?;
            for s in &a.inputs {
                writeln!(f, "    in  {:<16} {:<5} {:?}", s.name, s.dtype, s.shape)?;
            }
            for s in &a.outputs {
                writeln!(f, "    out {:<16} {:<5} {:?}", s.name, s.dtype, s.shape)?;
            }
        }
        for w in &m.source.weights {
            writeln!(f, "source:   {} sha256 {}", w.file, w.sha256)?;
        }
        Ok(())
    }
}

/// A TorchScript file: its forward schema, and the description vit-msn
/// stores in the artifacts it writes.
#[derive(Serialize)]
pub struct FileReport {
    file: PathBuf,
    forward: String,
    vit_msn: Option<ArtifactDescription>,
}

impl fmt::Display for FileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file:    {}", self.file.display())?;
        writeln!(f, "forward: {}", self.forward)?;
        match &self.vit_msn {
            // In the description's own field order. Serializing it cannot
            // fail (strings, numbers and lists only).
            Some(v) => writeln!(
                f,
                "vit-msn artifact: {}",
                serde_json::to_string_pretty(v).map_err(|_| fmt::Error)?
            ),
            None => writeln!(f, "(not written by vit-msn: no embedded description)"),
        }
    }
}
