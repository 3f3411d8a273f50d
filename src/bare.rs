//! TorchScript files that people already have, outside any bundle: most often
//! `torch.jit.trace(model, pixel_values)` of a transformers ViT-MSN, whose
//! forward takes only `pixel_values` and returns a tuple or a dict.
//!
//! Supported: a forward of one tensor (`pixel_values`) or of vit-msn's three
//! (`pixel_values, bool_masked_pos, head_mask`), returning a tensor, a tuple or
//! list whose first element is the primary output, or a dict with `logits` or
//! `last_hidden_state`. 2-D primary outputs are logits, 3-D ones hidden states.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::bundle::first_line;
use crate::cpu::Cpu;
use crate::describe::describe;
use crate::describe::ArtifactDescription;
use crate::error::{Error, Result};
use crate::fsutil::{check_regular_file, read_regular_text};

pub struct BareArtifact {
    path: PathBuf,
    module: CModule,
    /// 1 (pixel_values) or 3 (with bool_masked_pos and head_mask).
    arity: usize,
    /// The file's own description, when vit-msn wrote it.
    pub description: Option<ArtifactDescription>,
}

/// What a bare artifact returned.
pub enum Primary {
    Logits(Tensor),
    LastHiddenState(Tensor),
}

/// Tensor arguments of a forward schema, `self` excluded.
fn arity(schema: &str) -> usize {
    let args = schema
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(") ->"))
        .map(|(a, _)| a)
        .unwrap_or("");
    args.split(',')
        .filter(|a| a.trim_start().starts_with("Tensor"))
        .count()
}

/// A vit-msn artifact whose kernels need a CPU feature this CPU lacks is
/// refused at load: a bundle rewrites such linears at load, a bare file
/// cannot be.
fn check_cpu_features(path: &Path, description: Option<&ArtifactDescription>) -> Result<()> {
    let wanted = description.map_or(&[][..], |d| d.cpu_features.as_slice());
    match Cpu::detect().missing(wanted).first() {
        None => Ok(()),
        Some(f) => Err(Error::Artifact {
            path: path.display().to_string(),
            message: format!(
                "compiled with {f}, which needs {}, and this CPU lacks it ({}): run it from its bundle (`vit-msn run --bundle`), which falls back to aten::linear, or recompile with --linear aten",
                f.needs(),
                Cpu::detect().summary()
            ),
        }),
    }
}

impl BareArtifact {
    pub fn load(path: &Path) -> Result<Self> {
        let d = describe(path)?;
        let arity = arity(&d.forward_schema);
        if arity != 1 && arity != 3 {
            return Err(Error::Artifact {
                path: path.display().to_string(),
                message: format!(
                    "unsupported forward `{}`: expected (pixel_values) or (pixel_values, bool_masked_pos, head_mask)",
                    d.forward_schema
                ),
            });
        }
        check_cpu_features(path, d.vit_msn.as_ref())?;
        check_regular_file(path)?;
        // From the path: libtorch reads the archive record by record, where
        // tch's load-from-buffer would hold extra copies of the file.
        let module = CModule::load_on_device(path, Device::Cpu).map_err(|e| Error::Artifact {
            path: path.display().to_string(),
            message: first_line(&e.to_string()),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            module,
            arity,
            description: d.vit_msn,
        })
    }

    /// Whether the forward takes a mask and a head mask.
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn takes_masks(&self) -> bool {
        self.arity == 3
    }

    /// Runs `pixel_values` (B, C, H, W) f32; masks only where the file takes them.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        head_mask: Option<&Tensor>,
    ) -> Result<Primary> {
        if self.arity == 1 && (bool_masked_pos.is_some() || head_mask.is_some()) {
            return Err(Error::input(
                if bool_masked_pos.is_some() {
                    "bool_masked_pos"
                } else {
                    "head_mask"
                },
                format!(
                    "{} takes only pixel_values: it has no mask or head-mask input",
                    self.path.display()
                ),
            ));
        }
        let mut inputs = vec![IValue::Tensor(pixel_values.shallow_clone())];
        if self.arity == 3 {
            let b = pixel_values.size()[0];
            let spec = |name: &str| {
                self.description
                    .as_ref()?
                    .inputs
                    .iter()
                    .find(|i| i.name == name)
                    .map(|i| i.shape.clone())
            };
            let mask = match bool_masked_pos {
                Some(m) => m.ne(0),
                None => {
                    let n = spec("bool_masked_pos")
                        .and_then(|s| s.last().copied())
                        .ok_or_else(|| {
                            Error::input(
                                "bool_masked_pos",
                                "the file does not say its patch count; pass a mask",
                            )
                        })?;
                    Tensor::zeros([b, n], (Kind::Bool, Device::Cpu))
                }
            };
            let hm = match head_mask {
                Some(h) => h.shallow_clone(),
                None => {
                    let s = spec("head_mask").ok_or_else(|| {
                        Error::input(
                            "head_mask",
                            "the file does not say its head-mask shape; pass one",
                        )
                    })?;
                    Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu))
                }
            };
            inputs.push(IValue::Tensor(mask));
            inputs.push(IValue::Tensor(hm));
        }
        let out = tch::no_grad(|| self.module.forward_is(&inputs))
            .map_err(|e| Error::Forward(first_line(&e.to_string())))?;
        let primary = match out {
            IValue::Tensor(t) => Some(t),
            IValue::Tuple(items) | IValue::GenericList(items) => {
                items.into_iter().find_map(|v| match v {
                    IValue::Tensor(t) => Some(t),
                    _ => None,
                })
            }
            IValue::GenericDict(items) => {
                let mut found = None;
                for (k, v) in items {
                    if let (IValue::String(k), IValue::Tensor(t)) = (k, v) {
                        if k == "logits" || k == "last_hidden_state" {
                            found = Some(t);
                            break;
                        }
                    }
                }
                found
            }
            _ => None,
        }
        .ok_or_else(|| Error::Forward(format!("{}: returned no tensor", self.path.display())))?;
        let primary = primary.to_kind(Kind::Float);
        let (name, dims): (&str, &[&str]) = match primary.dim() {
            2 => ("logits", &["batch", "classes"]),
            3 => ("last_hidden_state", &["batch", "tokens", "hidden size"]),
            d => {
                return Err(Error::Forward(format!(
                    "{}: primary output has {d} dimensions; expected 2 (logits) or 3",
                    self.path.display()
                )))
            }
        };
        // Callers index one row per image and the CLS token (or the top
        // classes): a file that returns another batch or an empty dimension
        // is refused here rather than indexed out of range.
        let size = primary.size();
        let batch = pixel_values.size().first().copied().unwrap_or(0);
        if size[0] != batch {
            return Err(Error::Forward(format!(
                "{}: output `{name}` has shape {size:?} for a batch of {batch}",
                self.path.display()
            )));
        }
        if let Some(empty) = size.iter().position(|&d| d == 0) {
            return Err(Error::Forward(format!(
                "{}: output `{name}` has no {} (shape {size:?})",
                self.path.display(),
                dims[empty]
            )));
        }
        Ok(if name == "logits" {
            Primary::Logits(primary)
        } else {
            Primary::LastHiddenState(primary)
        })
    }
}

/// Class names from a JSON file: a list, an `{"0": "cat"}` map, or a
/// transformers config with `id2label`.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = read_regular_text(path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let v = v.get("id2label").cloned().unwrap_or(v);
    let bad = || {
        Error::file(
            path,
            "expected a list of names, an {\"0\": name} map, or a config with id2label",
        )
    };
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        serde_json::Value::Object(map) => {
            let mut pairs: Vec<(usize, String)> = map
                .iter()
                .map(|(k, x)| {
                    Ok((
                        k.parse::<usize>().map_err(|_| bad())?,
                        x.as_str().ok_or_else(bad)?.to_owned(),
                    ))
                })
                .collect::<Result<_>>()?;
            pairs.sort();
            if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
                return Err(bad());
            }
            Ok(pairs.into_iter().map(|(_, n)| n).collect())
        }
        _ => Err(bad()),
    }
}
