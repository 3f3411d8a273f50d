//! `vit-msn fewshot fit --protocol msn`: the low-shot evaluation of
//! facebookresearch/msn (`logistic_eval.py`), step by step:
//! torchvision `Resize(256)` + `CenterCrop(224)`; the CLS token of the last
//! block before the final layer norm; each row centred on its own mean, then
//! L2-normalised; a multinomial logistic regression without intercept,
//! mean loss + λ/2·‖W‖² with λ = lambd/N, stopped at a relative duality gap
//! of `tol` or after `max_epochs` passes (cyanure's `MultiClassifier`).
//! Also MSN's subset files (`--train-list`). docs/low-shot.md has the rest.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};
use vit_msn::bundle::LoadOptions;
use vit_msn::classifier::{write_msn_classifier, Head};
use vit_msn::error::{Error, Result};
use vit_msn::image::Preprocessing;
use vit_msn::manifest::Manifest;
use vit_msn::writer::BundleWriter;
use vit_msn::Bundle;

use super::bar;
use crate::cli::fewshot_fit::{accuracy, check_epochs, embed_as, Embedding, LabelledImages};
use crate::cli::{usage, CliResult};

/// The most L-BFGS pairs kept (scikit-learn's lbfgs keeps 10).
const MEMORY: usize = 10;

/// Reads an MSN subset file (`imagenet_subsets1/5imgs_class.txt`,
/// `1percent.txt`: one `nXXXXXXXX_NNNN.JPEG` a line, the class being the
/// name's wnid prefix) against an ImageNet-style `train/` folder
/// (`train/<wnid>/<file>`). The classes are the folder's sub-folders, as
/// torchvision's ImageFolder finds them; each needs one listed image or more.
/// Both protocols' labelled training images: the ImageFolder `train`, or
/// the files `list` names in it; at least two classes.
pub fn training_images(train: &Path, list: Option<&Path>) -> Result<LabelledImages> {
    let images = match list {
        Some(list) => read_train_list(list, train)?,
        None => LabelledImages::read(train)?,
    };
    if images.classes.len() < 2 {
        return Err(Error::file(
            train,
            "needs at least two class folders with images (the ImageFolder layout)",
        ));
    }
    Ok(images)
}

pub fn read_train_list(list: &Path, train: &Path) -> Result<LabelledImages> {
    let text = vit_msn::files::read_input_text(list)?;
    let mut classes: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(train).map_err(|e| Error::io(train, e))? {
        let path = entry.map_err(|e| Error::io(train, e))?.path();
        if !path.is_dir() {
            continue;
        }
        match path.file_name().and_then(|n| n.to_str()) {
            Some(name) => classes.push(name.to_string()),
            None => {
                return Err(Error::file(
                    &path,
                    "the class folder's name is not valid UTF-8; labels must be text (rename the folder)",
                ))
            }
        }
    }
    classes.sort();
    let mut seen = BTreeSet::new();
    let mut items: Vec<(PathBuf, i64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        let at = |message: String| Error::file(list, format!("line {}: {message}", i + 1));
        if name.contains('/') || name.contains('\\') {
            return Err(at(format!(
                "`{name}` is not a file name (the list names files of train/<wnid>/)"
            )));
        }
        let Some((wnid, _)) = name.split_once('_') else {
            return Err(at(format!(
                "`{name}` does not start with its class (nXXXXXXXX_…)"
            )));
        };
        if !seen.insert(name.to_string()) {
            return Err(at(format!("`{name}` is listed twice")));
        }
        let path = train.join(wnid).join(name);
        let class = classes.binary_search_by(|c| c.as_str().cmp(wnid));
        match class {
            Ok(c) if path.is_file() => items.push((path, c as i64)),
            _ => return Err(at(format!("{} not found", path.display()))),
        }
    }
    let mut counts = vec![0usize; classes.len()];
    for (_, c) in &items {
        counts[*c as usize] += 1;
    }
    if let Some(empty) = counts.iter().position(|&n| n == 0) {
        return Err(Error::file(
            list,
            format!(
                "class `{}` (a folder of {}) has no images in the list",
                classes[empty],
                train.display()
            ),
        ));
    }
    if classes.len() < 2 {
        return Err(Error::file(
            train,
            "needs at least two class folders (the ImageNet train/<wnid>/ layout)",
        ));
    }
    // ImageFolder's order: by class, then by name.
    items.sort();
    Ok(LabelledImages { classes, items })
}

/// cyanure's `preprocess(centering=True, normalize=True, columns=False)`:
/// each row minus its own mean, then divided by its L2 norm, in f32 as the
/// classifier artifact computes it.
pub fn centre_and_normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let centred = &x - x.mean_dim(-1, true, Kind::Float);
    &centred
        / centred
            .norm_scalaropt_dim(2, [-1].as_slice(), true)
            .clamp_min(1e-12)
}

/// How the fit ended.
#[derive(Debug, Clone, Serialize)]
pub struct Solved {
    /// Passes over the training features (objective evaluations).
    pub epochs: usize,
    pub relative_duality_gap: f64,
    pub objective: f64,
}

/// Mean cross-entropy + λ/2·‖W‖² at `w` (K, D), its gradient, and the
/// class probabilities, in f64.
fn objective(x: &Tensor, onehot: &Tensor, w: &Tensor, lambda: f64) -> (f64, Tensor, Tensor) {
    let n = x.size()[0] as f64;
    let logp = x.matmul(&w.tr()).log_softmax(-1, Kind::Double);
    let loss = -(&logp * onehot).sum(Kind::Double).double_value(&[]) / n;
    let p = logp.exp();
    let grad = (&p - onehot).tr().matmul(x) / n + w * lambda;
    let f = loss + 0.5 * lambda * dot(w, w);
    (f, grad, p)
}

/// The Fenchel dual at the probabilities `p` of the primal point `w` (the
/// dual point each primal point gives): −mean Σ p log p − λ/2·‖W(p)‖² with
/// W(p) = −(P − Y)ᵀX / (λN), which is w − grad/λ. The gap to the primal
/// bounds how far the objective is from its minimum.
fn dual(p: &Tensor, w: &Tensor, grad: &Tensor, lambda: f64) -> f64 {
    let n = p.size()[0] as f64;
    let neg_entropy = (p * p.clamp_min(1e-300).log())
        .sum(Kind::Double)
        .double_value(&[])
        / n;
    let wp = w - grad / lambda;
    -neg_entropy - 0.5 * lambda * dot(&wp, &wp)
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).sum(Kind::Double).double_value(&[])
}

fn relative_gap(primal: f64, dual: f64) -> f64 {
    (primal - dual) / primal.abs().max(1e-300)
}

/// Multinomial logistic regression without intercept on `x` (N, D) with
/// labels `y` in 0..classes: minimises mean cross-entropy + λ/2·‖W‖²
/// (scikit-learn's objective with C = 1/(λN)) by L-BFGS from zero, until the
/// relative duality gap is at most `tol` or `max_epochs` passes are spent.
pub fn fit_logistic(
    x: &Tensor,
    y: &Tensor,
    classes: i64,
    lambda: f64,
    tol: f64,
    max_epochs: usize,
) -> Result<(Head, Solved)> {
    if !(lambda > 0.0 && lambda.is_finite()) {
        return Err(Error::input(
            "lambda",
            format!("must be positive, found {lambda:?}"),
        ));
    }
    let x = x.to_kind(Kind::Double);
    let d = x.size()[1];
    let onehot = y.one_hot(classes).to_kind(Kind::Double);
    let mut w = Tensor::zeros([classes, d], (Kind::Double, Device::Cpu));
    let (mut f, mut g, mut p) = objective(&x, &onehot, &w, lambda);
    let mut epochs = 1;
    let mut gap = relative_gap(f, dual(&p, &w, &g, lambda));
    let mut pairs: VecDeque<(Tensor, Tensor, f64)> = VecDeque::new();
    while gap > tol && epochs < max_epochs {
        // The two-loop recursion: dir = −H·g.
        let mut q = g.copy();
        let mut alphas = Vec::with_capacity(pairs.len());
        for (s, yv, rho) in pairs.iter().rev() {
            let a = rho * dot(s, &q);
            q -= yv * a;
            alphas.push(a);
        }
        let gamma = match pairs.back() {
            Some((s, yv, _)) => dot(s, yv) / dot(yv, yv),
            None => 1.0 / dot(&g, &g).sqrt().max(1e-300),
        };
        let mut r = q * gamma;
        for ((s, yv, rho), a) in pairs.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(yv, &r);
            r += s * (a - b);
        }
        let mut dir = -r;
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            // Curvature pairs gone stale: restart from steepest descent.
            pairs.clear();
            dir = -&g / dot(&g, &g).sqrt().max(1e-300);
            slope = dot(&g, &dir);
        }
        // Backtracking (Armijo) from the full step.
        let mut t = 1.0;
        let (w_new, f_new, g_new, p_new) = loop {
            let w_try = &w + &dir * t;
            let (f_try, g_try, p_try) = objective(&x, &onehot, &w_try, lambda);
            epochs += 1;
            if f_try <= f + 1e-4 * t * slope || epochs >= max_epochs || t < 1e-12 {
                break (w_try, f_try, g_try, p_try);
            }
            t *= 0.5;
        };
        if f_new > f {
            // No decrease even at the smallest step: as close as f64 gets.
            break;
        }
        let s = &w_new - &w;
        let yv = &g_new - &g;
        let sy = dot(&s, &yv);
        if sy > 1e-20 {
            pairs.push_back((s, yv, 1.0 / sy));
            if pairs.len() > MEMORY {
                pairs.pop_front();
            }
        }
        (w, f, g, p) = (w_new, f_new, g_new, p_new);
        gap = relative_gap(f, dual(&p, &w, &g, lambda));
    }
    let head = Head {
        weight: w.to_kind(Kind::Float),
        bias: Tensor::zeros([classes], (Kind::Float, Device::Cpu)),
        scale: 1.0,
    };
    Ok((
        head,
        Solved {
            epochs,
            relative_duality_gap: gap,
            objective: f,
        },
    ))
}

/// What `fit --protocol msn` did, recorded in the classifier's manifest
/// (`fewshot`) and printed.
#[derive(Debug, Clone, Serialize)]
pub struct MsnFitReport {
    pub protocol: &'static str,
    pub classes: Vec<String>,
    pub train_images: usize,
    /// The subset file the training images came from, if one was given.
    pub train_list: Option<PathBuf>,
    pub resize: u32,
    pub crop: u32,
    pub lambd: f64,
    /// lambd / N, the penalty the objective uses.
    pub lambda: f64,
    pub tol: f64,
    pub max_epochs: usize,
    pub solved: Solved,
    pub train_accuracy: f64,
}

impl fmt::Display for MsnFitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} classes, {} training images, protocol msn (Resize {} + CenterCrop {}, CLS before the final layer norm, centred and normalised)",
            self.classes.len(),
            self.train_images,
            self.resize,
            self.crop
        )?;
        let s = &self.solved;
        let stop = if s.relative_duality_gap <= self.tol {
            "converged"
        } else {
            "stopped at the epoch limit"
        };
        writeln!(
            f,
            "logistic regression, lambd {} (lambda {:e}): {stop} after {} epochs, relative duality gap {:.2e} (tol {})",
            self.lambd, self.lambda, s.epochs, s.relative_duality_gap, self.tol
        )?;
        writeln!(f, "training accuracy {:.3}", self.train_accuracy)
    }
}

/// What `fit --protocol msn` takes from the command line.
pub struct MsnArgs {
    pub bundle: PathBuf,
    pub train: PathBuf,
    pub train_list: Option<PathBuf>,
    pub out: PathBuf,
    pub lambd: f64,
    pub tol: f64,
    pub max_epochs: usize,
    pub resize: u32,
    pub crop: u32,
    pub batch_size: usize,
}

/// Largest `--lambd`: beyond it the head is all but zero.
const MAX_LAMBD: f64 = 1e6;

/// Checks the numbers (before anything slow), embeds, fits, writes the bundle.
pub fn fit(a: MsnArgs) -> CliResult {
    if !(a.lambd > 0.0 && a.lambd <= MAX_LAMBD) {
        return Err(usage(format!(
            "--lambd must be in (0, {MAX_LAMBD}], found {:?}",
            a.lambd
        )));
    }
    if !(a.tol > 0.0 && a.tol < 1.0) {
        return Err(usage(format!("--tol must be in (0, 1), found {:?}", a.tol)));
    }
    check_epochs(a.max_epochs).map_err(|m| usage(format!("--epochs {m}")))?;
    let pp = Preprocessing::msn_eval(a.resize, a.crop).map_err(|_| {
        usage(format!(
            "--crop {} must be at most --resize {} (and both 1 to {})",
            a.crop,
            a.resize,
            vit_msn::image::MAX_TARGET_SIDE
        ))
    })?;
    let mut inputs = vec![a.bundle.as_path(), a.train.as_path()];
    inputs.extend(a.train_list.as_deref());
    BundleWriter::check_target(&a.out, &inputs)?;
    let manifest = Manifest::read(&a.bundle)?;
    if manifest.is_classifier() {
        return Err(Error::file(
            &a.bundle,
            "is a classifier bundle; few-shot needs a backbone",
        )
        .into());
    }
    let crop = (i64::from(a.crop), i64::from(a.crop));
    let options = LoadOptions {
        pre_layernorm_cls: true,
        ..LoadOptions::default()
    }
    .single_use(&manifest, crop)
    .map_err(|_| {
        Error::file(
            &a.bundle,
            format!(
                "has no artifact for the {0}x{0} crop (it has {1}); compile the backbone with --resolutions {0}",
                a.crop,
                manifest.resolutions().join(", ")
            ),
        )
    })?;
    let backbone = Bundle::load_manifest(&a.bundle, manifest, vit_msn::Device::Cpu, &options)?;
    let train = training_images(&a.train, a.train_list.as_deref())?;
    let paths: Vec<PathBuf> = train.items.iter().map(|(p, _)| p.clone()).collect();
    let progress = bar(paths.len(), "train images embedded");
    let raw = embed_as(
        &backbone,
        &Embedding::PreLayernormCls(pp.clone()),
        &paths,
        a.batch_size,
        |n| progress.set_position(n as u64),
    )?;
    progress.finish_and_clear();
    let x = centre_and_normalize(&raw);
    let y = train.labels();
    let lambda = a.lambd / paths.len() as f64;
    let classes = train.classes.len() as i64;
    let (head, solved) = fit_logistic(&x, &y, classes, lambda, a.tol, a.max_epochs)?;
    let report = MsnFitReport {
        protocol: "msn",
        classes: train.classes.clone(),
        train_images: paths.len(),
        train_list: a.train_list.clone(),
        resize: a.resize,
        crop: a.crop,
        lambd: a.lambd,
        lambda,
        tol: a.tol,
        max_epochs: a.max_epochs,
        solved,
        train_accuracy: accuracy(&head.predict(&x), &y),
    };
    write_msn_classifier(&backbone, &head, &train.classes, &report, &pp, &a.out)?;
    print!("{report}");
    println!("wrote the classifier bundle {}", a.out.display());
    Ok(())
}
