//! Low-shot fitting on a backbone bundle (`vit-msn fewshot`): embed labelled
//! images (CLS token after the final layernorm, L2-normalised) and fit a head;
//! `vit_msn::classifier` writes backbone + head as a classification bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use vit_msn::bundle::sha256_hex;
use vit_msn::classifier::{all_finite, check_temperature, Head};
use vit_msn::error::{Error, Result};
use vit_msn::image::{is_image_path, preprocess_path, Preprocessing};
use vit_msn::tensors::{parse_safetensors, write_safetensors};
use vit_msn::Bundle;

/// An ImageFolder: one sub-folder per class, named for it.
pub struct LabelledImages {
    pub classes: Vec<String>,
    /// (path, class index), in class then name order.
    pub items: Vec<(PathBuf, i64)>,
}

impl LabelledImages {
    /// Reads `dir`; it needs at least one class folder with images (`fit`
    /// needs two, checked there).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        let mut items = Vec::new();
        let mut names = Vec::new();
        for class_dir in &classes {
            let mut files: Vec<PathBuf> = std::fs::read_dir(class_dir)
                .map_err(|e| Error::io(class_dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image_path(p))
                .collect();
            if files.is_empty() {
                continue;
            }
            files.sort();
            // A lossy conversion would give two folders (`caf\xe9`, `caf\xe8`) one label.
            let Some(name) = class_dir.file_name().and_then(|n| n.to_str()) else {
                return Err(Error::file(
                    class_dir,
                    "the class folder's name is not valid UTF-8; labels must be text (rename the folder)",
                ));
            };
            let index = names.len() as i64;
            names.push(name.to_string());
            items.extend(files.into_iter().map(|f| (f, index)));
        }
        if names.is_empty() {
            return Err(Error::file(
                dir,
                "holds no class folders with images (the ImageFolder layout: one sub-folder of images per class)",
            ));
        }
        Ok(Self {
            classes: names,
            items,
        })
    }

    pub fn labels(&self) -> Tensor {
        Tensor::from_slice(&self.items.iter().map(|(_, c)| *c).collect::<Vec<_>>())
    }
}

/// Which embedding of an image a fit works on.
pub enum Embedding {
    /// The CLS token after the final layer norm, the bundle's preprocessing.
    Cls,
    /// The CLS token before the final layer norm, with this preprocessing
    /// (MSN's protocol; the bundle loaded with `LoadOptions::pre_layernorm_cls`).
    PreLayernormCls(Preprocessing),
}

/// CLS embeddings (N, D) of `paths` through a backbone bundle, L2-normalised,
/// cached in the bundle folder by image content and bundle, so a second fit
/// does not embed again. `progress` is called with the number done.
pub fn embed(
    bundle: &Bundle,
    paths: &[PathBuf],
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Tensor> {
    Ok(normalize(&embed_as(
        bundle,
        &Embedding::Cls,
        paths,
        batch,
        progress,
    )?))
}

/// [`embed`]'s embeddings as the backbone gives them (not normalised), of
/// either kind; each kind has its own cache file.
pub fn embed_as(
    bundle: &Bundle,
    what: &Embedding,
    paths: &[PathBuf],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let m = bundle.manifest();
    if m.is_classifier() {
        return Err(Error::file(
            bundle.dir(),
            "is a classifier bundle; few-shot needs a backbone",
        ));
    }
    let digests = m
        .artifacts
        .iter()
        .map(|a| a.sha256.as_str())
        .collect::<Vec<_>>()
        .join(",");
    // The default's key is the one earlier versions wrote, so their caches still hit.
    let (pp, key) = match what {
        Embedding::Cls => (
            m.preprocessing()?,
            format!(
                "{digests}|{}",
                serde_json::to_string(&m.preprocessing).unwrap_or_default()
            ),
        ),
        Embedding::PreLayernormCls(pp) => (
            pp.clone(),
            format!("{digests}|{}|cls_pre_layernorm", pp.to_json()),
        ),
    };
    let fingerprint = sha256_hex(key.as_bytes());
    let cache_path = bundle
        .dir()
        .join("cache")
        .join(format!("embeddings-{}.safetensors", &fingerprint[..16]));
    let hidden = m.model.hidden_size;
    // The cache is only an optimisation: one that does not parse is ignored,
    // and a damaged entry is a miss, embedded again and overwritten.
    let mut cache: BTreeMap<String, Tensor> = match std::fs::read(&cache_path) {
        Ok(bytes) => parse_safetensors(&bytes, &cache_path)
            .map(|v| {
                v.into_iter()
                    .filter(|(_, t)| is_embedding(t, hidden))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    let keys: Vec<String> = paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| sha256_hex(&b))
                .map_err(|e| Error::io(p, e))
        })
        .collect::<Result<_>>()?;
    let missing: Vec<usize> = (0..paths.len())
        .filter(|&i| !cache.contains_key(&keys[i]))
        .collect();
    let mut done = paths.len() - missing.len();
    progress(done);
    for chunk in missing.chunks(batch.max(1)) {
        let px = chunk
            .iter()
            .map(|&i| preprocess_path(&paths[i], &pp, m.model.num_channels))
            .collect::<Result<Vec<_>>>()?;
        let px = Tensor::stack(&px, 0);
        // (B, D): pre_layernorm_cls checks its shape itself.
        let cls = match what {
            Embedding::PreLayernormCls(_) => bundle.pre_layernorm_cls(&px)?,
            Embedding::Cls => {
                let out = bundle.forward(&px, None, None)?;
                let lhs = out.last_hidden_state.ok_or_else(|| {
                    Error::Forward("the backbone returned no last_hidden_state".into())
                })?;
                let shape = lhs.size();
                if shape.len() != 3 || shape[0] != chunk.len() as i64 || shape[2] != hidden {
                    return Err(Error::Forward(format!(
                        "the backbone's last_hidden_state has shape {shape:?}, expected [{}, tokens, {hidden}]",
                        chunk.len()
                    )));
                }
                lhs.select(1, 0)
            }
        };
        for (j, &i) in chunk.iter().enumerate() {
            cache.insert(keys[i].clone(), cls.get(j as i64).copy());
        }
        done += chunk.len();
        progress(done);
    }
    if !missing.is_empty() {
        if let Some(dir) = cache_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let named: Vec<(&str, &Tensor)> = cache.iter().map(|(k, v)| (k.as_str(), v)).collect();
        write_safetensors(&cache_path, &named)?;
    }
    let rows = keys
        .iter()
        .zip(paths)
        .map(|(k, p)| {
            cache
                .get(k)
                .map(|t| t.to_kind(Kind::Float))
                .ok_or_else(|| Error::file(p, "no embedding was made for this image"))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::f_stack(&rows, 0)
        .map_err(|e| Error::Forward(format!("cannot stack the embeddings: {e}")))
}

/// Whether a cache entry can stand for an embedding: a finite (hidden,) float row.
fn is_embedding(t: &Tensor, hidden: i64) -> bool {
    t.size() == [hidden]
        && matches!(
            t.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        )
        && all_finite(t)
}

pub fn normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    &x / x
        .norm_scalaropt_dim(2, [-1].as_slice(), true)
        .clamp_min(1e-12)
}

/// Beyond these a fit runs for hours without changing the head.
pub const MAX_EPOCHS: usize = 100_000;
pub const MAX_WEIGHT_DECAY: f64 = 1e6;

/// Why `epochs` cannot be fitted with, if it cannot (the caller names the setting).
pub fn check_epochs(epochs: usize) -> std::result::Result<(), String> {
    if (1..=MAX_EPOCHS).contains(&epochs) {
        Ok(())
    } else {
        Err(format!("must be in 1..={MAX_EPOCHS}, found {epochs}"))
    }
}

/// Why `weight_decay` cannot be fitted with, if it cannot.
pub fn check_weight_decay(weight_decay: f64) -> std::result::Result<(), String> {
    if (0.0..=MAX_WEIGHT_DECAY).contains(&weight_decay) {
        Ok(())
    } else {
        Err(format!(
            "must be finite and in [0, {MAX_WEIGHT_DECAY}], found {weight_decay:?}"
        ))
    }
}

/// Multinomial logistic regression, full batch, minimising mean cross-entropy
/// + weight_decay/2 · ‖W‖² (scikit-learn's objective with C = 1/(weight_decay·N)).
pub fn fit_linear(
    x: &Tensor,
    y: &Tensor,
    classes: i64,
    weight_decay: f64,
    epochs: usize,
    seed: i64,
) -> Result<Head> {
    check_weight_decay(weight_decay).map_err(|m| Error::input("weight_decay", m))?;
    check_epochs(epochs).map_err(|m| Error::input("epochs", m))?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let d = x.size()[1];
    let w = vs.root().zeros("weight", &[classes, d]);
    let b = vs.root().zeros("bias", &[classes]);
    let mut opt = nn::Adam::default()
        .build(&vs, 0.05)
        .map_err(|e| Error::Forward(format!("cannot build the optimizer: {e}")))?;
    for _ in 0..epochs {
        let logits = x.matmul(&w.tr()) + &b;
        let loss =
            logits.cross_entropy_for_logits(y) + (&w * &w).sum(Kind::Float) * (weight_decay / 2.0);
        opt.backward_step(&loss);
    }
    Ok(Head {
        weight: w.detach().copy(),
        bias: b.detach().copy(),
        scale: 1.0,
    })
}

/// Class means of the normalised embeddings, normalised: cosine similarity
/// times `temperature`.
pub fn fit_prototype(x: &Tensor, y: &Tensor, classes: i64, temperature: f64) -> Result<Head> {
    check_temperature(temperature).map_err(|m| Error::input("temperature", m))?;
    let rows: Vec<Tensor> = (0..classes)
        .map(|c| {
            x.index_select(0, &y.eq(c).nonzero().squeeze_dim(1))
                .mean_dim(0, false, Kind::Float)
        })
        .collect();
    Ok(Head {
        weight: normalize(&Tensor::stack(&rows, 0)),
        bias: Tensor::zeros([classes], (Kind::Float, Device::Cpu)),
        scale: temperature,
    })
}

pub fn accuracy(pred: &Tensor, y: &Tensor) -> f64 {
    pred.eq_tensor(y)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}
