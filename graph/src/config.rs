//! `config.json` of a transformers ViT-MSN checkpoint (`ViTMSNConfig`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::activation::Activation;
use crate::Error;

// More than any ViT (ViT-G/14 has 1.8 billion parameters); refused before
// anything is allocated, so an absurd config is an error rather than an
// out-of-memory abort. Generic label names are made for `num_labels` without
// `id2label`, hence a bound on labels too.
use vit_msn_format::bounds::{MAX_CHANNELS, MAX_HEADS, MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_SIDE};
pub use vit_msn_format::bounds::{MAX_LABELS, MAX_PARAMETERS};

pub use vit_msn_format::Task;

/// Every `ViTMSNConfig` field, with transformers' defaults, plus the label
/// fields of `PretrainedConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub qkv_bias: bool,
    /// Class names by index; `num_labels` is its length.
    pub id2label: Vec<String>,
    pub problem_type: Option<String>,
    pub architectures: Vec<String>,
    /// The file as read, kept so the bundle records exactly what it came from.
    #[serde(skip)]
    pub raw: Value,
}

/// The published checkpoints' shapes (`facebook/vit-msn-*`, backbones
/// trained at 224), as `config.json` holds them; the demo, `vit-msn init`'s
/// users and the benches start from these.
impl Config {
    pub fn vit_msn_small() -> Config {
        Self::preset(384, 12, 6, 16)
    }

    pub fn vit_msn_base() -> Config {
        Self::preset(768, 12, 12, 16)
    }

    pub fn vit_msn_large() -> Config {
        Self::preset(1024, 24, 16, 16)
    }

    pub fn vit_msn_base_4() -> Config {
        Self::preset(768, 12, 12, 4)
    }

    pub fn vit_msn_large_7() -> Config {
        Self::preset(1024, 24, 16, 7)
    }

    /// A ViT-MSN config of this shape (MLP 4× wide), otherwise transformers'
    /// defaults, as a backbone.
    pub fn preset(hidden: i64, layers: i64, heads: i64, patch: i64) -> Config {
        let raw = serde_json::json!({
            "model_type": "vit_msn",
            "architectures": ["ViTMSNModel"],
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * hidden, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "image_size": 224, "patch_size": patch, "num_channels": 3, "qkv_bias": true,
        });
        // Every preset is within the bounds (tested below), so this cannot fail.
        Config::from_value(raw).expect("a preset is a valid config")
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        // A config is a few kilobytes; refuse to read a huge file into memory.
        const MAX_BYTES: u64 = 16 << 20;
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len > MAX_BYTES {
            return Err(Error::Config(format!(
                "{}: {len} bytes is too large for a config",
                path.display()
            )));
        }
        let text = crate::read_regular(path)?;
        let value: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))?;
        Self::from_value(value)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))
    }

    pub fn from_value(raw: Value) -> Result<Self, Error> {
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::Config("the top level is not a JSON object".into()))?;
        let id2label = read_labels(obj)?;
        let cfg = Config {
            hidden_size: int(obj, "hidden_size", 768)?,
            num_hidden_layers: int(obj, "num_hidden_layers", 12)?,
            num_attention_heads: int(obj, "num_attention_heads", 12)?,
            intermediate_size: int(obj, "intermediate_size", 3072)?,
            hidden_act: string(obj, "hidden_act", "gelu")?,
            hidden_dropout_prob: float(obj, "hidden_dropout_prob", 0.0)?,
            attention_probs_dropout_prob: float(obj, "attention_probs_dropout_prob", 0.0)?,
            initializer_range: float(obj, "initializer_range", 0.02)?,
            layer_norm_eps: float(obj, "layer_norm_eps", 1e-6)?,
            image_size: side(obj, "image_size", 224)?,
            patch_size: side(obj, "patch_size", 16)?,
            num_channels: int(obj, "num_channels", 3)?,
            qkv_bias: boolean(obj, "qkv_bias", true)?,
            id2label,
            problem_type: optional_string(obj, "problem_type")?,
            architectures: match obj.get("architectures") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| field_err("architectures", "a list of strings"))?,
                Some(_) => return Err(field_err("architectures", "a list of strings")),
            },
            raw: raw.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Error> {
        // No layers is a valid model, as in transformers: its output is the
        // layer-normed embeddings.
        if self.num_hidden_layers < 0 {
            return Err(Error::Config(format!(
                "`num_hidden_layers` must not be negative, found {}",
                self.num_hidden_layers
            )));
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!(
                    "`{name}` must be positive, found {v}"
                )));
            }
        }
        // The runtime's manifest check (vit_msn::manifest) holds a bundle to
        // the same bounds, so nothing compiles that would not load.
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_HIDDEN_SIZE),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_channels", self.num_channels, MAX_CHANNELS),
            ("image_size", self.image_size, i64::from(MAX_SIDE)),
            ("patch_size", self.patch_size, i64::from(MAX_SIDE)),
        ] {
            if v > max {
                return Err(Error::Config(format!(
                    "`{name}` must be at most {max}, found {v}"
                )));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        // An image_size that patch_size does not divide is fine: as in
        // transformers, the grid is image_size / patch_size rounded down.
        // One below patch_size leaves no trained positions to interpolate
        // from (transformers builds such a model, but its forward fails).
        if self.image_size < self.patch_size {
            return Err(Error::Config(format!(
                "`image_size` {} is smaller than `patch_size` {}: the trained position grid is empty",
                self.image_size, self.patch_size
            )));
        }

        // The backbone alone: a config may list labels that only a
        // classifier head would hold (num_labels is bounded on its own).
        let parameters = self.parameter_count(false).filter(|&n| n <= MAX_PARAMETERS);
        if parameters.is_none() {
            return Err(Error::Config(format!(
                "the sizes describe a model of more than {MAX_PARAMETERS} parameters \
                 (hidden_size {}, num_hidden_layers {}, intermediate_size {}, image_size {}, \
                 patch_size {}, num_channels {})",
                self.hidden_size,
                self.num_hidden_layers,
                self.intermediate_size,
                self.image_size,
                self.patch_size,
                self.num_channels
            )));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(Error::Config(format!(
                "`layer_norm_eps` must be a finite non-negative number, found {}",
                self.layer_norm_eps
            )));
        }
        if let Some(p) = &self.problem_type {
            if !matches!(
                p.as_str(),
                "regression" | "single_label_classification" | "multi_label_classification"
            ) {
                return Err(Error::Config(format!("unknown `problem_type` `{p}`")));
            }
        }
        self.activation()?;
        Ok(())
    }

    /// How many values the weights hold, with the classifier head or without
    /// (a backbone); `None` on overflow. Used to refuse absurd sizes before
    /// anything is allocated.
    pub fn parameter_count(&self, with_head: bool) -> Option<i64> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let grid = self.image_size.checked_div(self.patch_size)?;
        let tokens = grid.checked_mul(grid)?.checked_add(1)?;
        let patch = self
            .num_channels
            .checked_mul(self.patch_size)?
            .checked_mul(self.patch_size)?;
        // projection + bias, CLS and mask tokens, position table.
        let embeddings = h
            .checked_mul(patch.checked_add(3)?)?
            .checked_add(tokens.checked_mul(h)?)?;
        // q, k, v, output (D×D + D each), fc1 and fc2, two layernorms.
        let layer = h
            .checked_mul(h)?
            .checked_mul(4)?
            .checked_add(h.checked_mul(i)?.checked_mul(2)?)?
            .checked_add(i)?
            .checked_add(h.checked_mul(9)?)?;
        let head = if with_head {
            self.num_labels().checked_add(1)?.checked_mul(h)?
        } else {
            0
        };
        embeddings
            .checked_add(layer.checked_mul(self.num_hidden_layers)?)?
            .checked_add(h.checked_mul(2)?)?
            .checked_add(head)
    }

    pub fn activation(&self) -> Result<Activation, Error> {
        self.hidden_act.parse()
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    pub fn num_labels(&self) -> i64 {
        self.id2label.len() as i64
    }

    /// The task the checkpoint was saved for, from `architectures`; `None`
    /// when the config does not say.
    pub fn task_from_architectures(&self) -> Option<Task> {
        self.architectures.iter().find_map(|a| match a.as_str() {
            "ViTMSNForImageClassification" => Some(Task::Classification),
            "ViTMSNModel" => Some(Task::Backbone),
            _ => None,
        })
    }
}

fn field_err(name: &str, expected: &str) -> Error {
    Error::Config(format!("`{name}` must be {expected}"))
}

fn int(obj: &Map<String, Value>, name: &str, default: i64) -> Result<i64, Error> {
    match obj.get(name) {
        None => Ok(default),
        Some(v) => v.as_i64().ok_or_else(|| field_err(name, "an integer")),
    }
}

/// `image_size` and `patch_size`: an integer or, as transformers also takes,
/// a list of height and width. Only square sizes are supported; with a
/// non-square one transformers runs at the trained resolution only.
fn side(obj: &Map<String, Value>, name: &str, default: i64) -> Result<i64, Error> {
    let bad = || field_err(name, "an integer or a list of two integers");
    match obj.get(name) {
        None => Ok(default),
        Some(Value::Array(items)) => match items.as_slice() {
            [h, w] => match (h.as_i64(), w.as_i64()) {
                (Some(h), Some(w)) if h == w => Ok(h),
                (Some(h), Some(w)) => Err(Error::Config(format!(
                    "`{name}` [{h}, {w}] is not square; only square sizes are supported"
                ))),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        },
        Some(v) => v.as_i64().ok_or_else(bad),
    }
}

fn float(obj: &Map<String, Value>, name: &str, default: f64) -> Result<f64, Error> {
    match obj.get(name) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| field_err(name, "a number")),
    }
}

fn boolean(obj: &Map<String, Value>, name: &str, default: bool) -> Result<bool, Error> {
    match obj.get(name) {
        None => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| field_err(name, "true or false")),
    }
}

fn string(obj: &Map<String, Value>, name: &str, default: &str) -> Result<String, Error> {
    match obj.get(name) {
        None => Ok(default.to_owned()),
        Some(v) => v
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| field_err(name, "a string")),
    }
}

fn optional_string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, Error> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| field_err(name, "a string or null")),
    }
}

/// `id2label` (keys are decimal indices), else `num_labels` generic names,
/// else transformers' default of two labels.
fn read_labels(obj: &Map<String, Value>) -> Result<Vec<String>, Error> {
    if let Some(Value::Object(map)) = obj.get("id2label") {
        let mut by_index = BTreeMap::new();
        for (k, v) in map {
            let index: usize = k
                .parse()
                .map_err(|_| Error::Config(format!("`id2label` key `{k}` is not an index")))?;
            let name = v
                .as_str()
                .ok_or_else(|| Error::Config(format!("`id2label[{k}]` is not a string")))?;
            by_index.insert(index, name.to_owned());
        }
        if by_index.keys().copied().ne(0..by_index.len()) {
            return Err(Error::Config(
                "`id2label` keys must be 0..num_labels with none missing".into(),
            ));
        }
        // A `num_labels` that disagrees is ignored, as transformers does.
        return Ok(by_index.into_values().collect());
    }
    let n = int(obj, "num_labels", 2)?;
    if n <= 0 || n > MAX_LABELS {
        return Err(Error::Config(format!(
            "`num_labels` must be in 1..={MAX_LABELS}, found {n}"
        )));
    }
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let small = Config::vit_msn_small();
        assert_eq!(
            (
                small.hidden_size,
                small.num_attention_heads,
                small.intermediate_size
            ),
            (384, 6, 1536)
        );
        assert_eq!(small.task_from_architectures(), Some(Task::Backbone));
        for c in [
            Config::vit_msn_base(),
            Config::vit_msn_large(),
            Config::vit_msn_base_4(),
            Config::vit_msn_large_7(),
        ] {
            assert_eq!(c.image_size, 224);
        }
        assert_eq!(Config::vit_msn_large_7().patch_size, 7);
    }
}
