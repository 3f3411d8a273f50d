//! `vit-msn fewshot`: `fit` here (the fitting itself is in fewshot_fit.rs),
//! `eval` in fewshot/eval.rs.

mod eval;
mod msn;

use std::fmt;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use tch::{Kind, Tensor};
use vit_msn::bundle::LoadOptions;
use vit_msn::classifier::{check_temperature, write_classifier, FitReport};
use vit_msn::writer::BundleWriter;
use vit_msn::{Device, Error};

use super::fewshot_fit::{
    accuracy, check_epochs, check_weight_decay, embed, fit_linear, fit_prototype, LabelledImages,
};
use super::{usage, CliResult};

/// Low-shot classification: fit a head on a few labelled images, ship it as a classifier bundle.
#[derive(Args)]
pub struct FewshotArgs {
    #[command(subcommand)]
    command: FewshotCommand,
}

#[derive(Subcommand)]
enum FewshotCommand {
    // Boxed: its flags outweigh eval's many times over.
    Fit(Box<FitArgs>),
    Eval(eval::EvalArgs),
}

/// Fit a linear probe or class prototypes on a backbone's CLS embeddings and
/// compile backbone + head into a classification bundle (every resolution the
/// backbone bundle has).
#[derive(Args)]
#[command(
    after_help = "TRAIN holds one sub-folder of images per class; the folder names are the labels.
Embeddings are cached in the backbone bundle's cache/ folder by image content.

Examples:
  vit-msn fewshot fit --bundle artifacts/small --train photos/train --out artifacts/pets
  vit-msn fewshot fit --bundle artifacts/small --train photos/train --method prototype
  vit-msn fewshot fit --bundle artifacts/small --train train --val val
  vit-msn fewshot fit --bundle artifacts/small --train train --weight-decay 1e-3
  vit-msn fewshot fit --bundle artifacts/small --protocol msn --train imagenet/train \
                      --train-list imagenet_subsets1/5imgs_class.txt --out artifacts/small-5shot"
)]
struct FitArgs {
    /// A backbone bundle.
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    train: PathBuf,
    /// linear (logistic regression on L2-normalised embeddings) or prototype (cosine to class means).
    #[arg(long, default_value = "linear")]
    method: String,
    /// Where the classification bundle goes (default: BUNDLE-fewshot, beside BUNDLE).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validation images (ImageFolder), for choosing the weight decay.
    #[arg(long, conflicts_with_all = ["val_split", "weight_decay"])]
    val: Option<PathBuf>,
    /// Fraction of each class held out for choosing the weight decay, in (0, 1).
    #[arg(long, default_value_t = 0.2, conflicts_with = "weight_decay")]
    val_split: f64,
    /// Full-batch optimisation steps (linear), 1 to 100000.
    #[arg(long, default_value_t = 300)]
    epochs: usize,
    /// L2 penalty (linear), 0 to 1e6; chosen on the validation images when not given.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Softmax temperature of the cosine similarities (prototype), over 0 and at most 10000.
    #[arg(long, default_value_t = 10.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// default (--method's heads) or msn: facebookresearch/msn's logistic_eval.py exactly (docs/low-shot.md).
    #[arg(long, default_value = "default")]
    protocol: String,
    /// A subset file (MSN's format: one nXXXXXXXX_NNNN.JPEG a line), read against --train as ImageNet's train/ folder.
    #[arg(long)]
    train_list: Option<PathBuf>,
    /// msn: the L2 penalty before its division by the number of training images [default: 0.00025].
    #[arg(long)]
    lambd: Option<f64>,
    /// msn: stop at this relative duality gap, in (0, 1) [default: 0.001].
    #[arg(long)]
    tol: Option<f64>,
    /// msn: torchvision Resize, the shorter side [default: 256].
    #[arg(long)]
    resize: Option<u32>,
    /// msn: torchvision CenterCrop, at most --resize [default: 224].
    #[arg(long)]
    crop: Option<u32>,
}

pub fn fewshot(a: FewshotArgs) -> CliResult {
    match a.command {
        FewshotCommand::Fit(f) => fit(*f),
        FewshotCommand::Eval(e) => eval::eval(e),
    }
}

/// A progress bar on a terminal; hidden otherwise.
fn bar(len: usize, what: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {what}"))
    {
        b.set_style(style);
    }
    b
}

const WEIGHT_DECAYS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

fn fit(a: FitArgs) -> CliResult {
    if a.protocol == "msn" {
        return fit_msn(a);
    }
    if a.protocol != "default" {
        return Err(usage(format!(
            "--protocol: unknown protocol `{}` (expected default or msn)",
            a.protocol
        )));
    }
    let msn_only = [
        ("--lambd", a.lambd.is_some()),
        ("--tol", a.tol.is_some()),
        ("--resize", a.resize.is_some()),
        ("--crop", a.crop.is_some()),
    ];
    if let Some((flag, _)) = msn_only.iter().find(|(_, given)| *given) {
        return Err(usage(format!("{flag} is for --protocol msn")));
    }
    if !matches!(a.method.as_str(), "linear" | "prototype") {
        return Err(usage(format!(
            "--method: unknown method `{}` (expected linear or prototype)",
            a.method
        )));
    }
    // Every number is checked before the slow part: a bad one gives a broken head.
    if !(a.val_split > 0.0 && a.val_split < 1.0) {
        return Err(usage(format!(
            "--val-split must be in (0, 1), found {:?} (give --weight-decay to fit without holding images out)",
            a.val_split
        )));
    }
    if a.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    check_epochs(a.epochs).map_err(|m| usage(format!("--epochs {m}")))?;
    check_temperature(a.temperature).map_err(|m| usage(format!("--temperature {m}")))?;
    if let Some(wd) = a.weight_decay {
        check_weight_decay(wd).map_err(|m| usage(format!("--weight-decay {m}")))?;
    }
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.bundle));
    // Before the slow part: the bundle written at the end may replace only an older bundle.
    let mut inputs = vec![a.bundle.as_path(), a.train.as_path()];
    inputs.extend(a.val.as_deref());
    inputs.extend(a.train_list.as_deref());
    BundleWriter::check_target(&out, &inputs)?;
    let backbone =
        vit_msn::Bundle::load_for_images(&a.bundle, Device::Cpu, LoadOptions::default())?;
    let train = msn::training_images(&a.train, a.train_list.as_deref())?;
    let val = match &a.val {
        Some(dir) => {
            let val = LabelledImages::read(dir)?;
            if val.classes != train.classes {
                return Err(Error::file(dir, "its class folders differ from --train's").into());
            }
            Some(val)
        }
        None => None,
    };
    let classes = train.classes.len() as i64;
    let paths: Vec<PathBuf> = train.items.iter().map(|(p, _)| p.clone()).collect();
    let progress = bar(paths.len(), "train images embedded");
    let x = embed(&backbone, &paths, a.batch_size, |n| {
        progress.set_position(n as u64)
    })?;
    progress.finish_and_clear();
    let y = train.labels();

    let mut report = FitReport {
        method: a.method.clone(),
        classes: train.classes.clone(),
        train_images: paths.len(),
        weight_decay: None,
        weight_decay_chosen_on_validation: false,
        validation_accuracy: None,
        temperature: None,
        epochs: a.epochs,
        seed: a.seed,
    };
    let head = if a.method == "prototype" {
        report.temperature = Some(a.temperature);
        fit_prototype(&x, &y, classes, a.temperature)?
    } else {
        let wd = match a.weight_decay {
            Some(w) => w,
            None => {
                let (xf, yf, xv, yv) = match &val {
                    Some(val) => {
                        let vp: Vec<PathBuf> = val.items.iter().map(|(p, _)| p.clone()).collect();
                        let xv = embed(&backbone, &vp, a.batch_size, |_| {})?;
                        (x.shallow_clone(), y.shallow_clone(), xv, val.labels())
                    }
                    None => split(&x, &y, classes, a.val_split, a.seed)?,
                };
                let mut best = (f64::MIN, WEIGHT_DECAYS[0]);
                for wd in WEIGHT_DECAYS {
                    let acc = accuracy(
                        &fit_linear(&xf, &yf, classes, wd, a.epochs, a.seed)?.predict(&xv),
                        &yv,
                    );
                    // Ties go to the stronger penalty.
                    if acc >= best.0 {
                        best = (acc, wd);
                    }
                }
                report.weight_decay_chosen_on_validation = true;
                report.validation_accuracy = Some(best.0);
                best.1
            }
        };
        report.weight_decay = Some(wd);
        fit_linear(&x, &y, classes, wd, a.epochs, a.seed)?
    };
    let train_accuracy = accuracy(&head.predict(&x), &y);
    write_classifier(&backbone, &head, &train.classes, &report, &out)?;
    print!(
        "{}",
        FitSummary {
            report,
            train_accuracy,
            out
        }
    );
    Ok(())
}

/// `fit --protocol msn`: the options of the default fit do not apply.
fn fit_msn(a: FitArgs) -> CliResult {
    let default_only = [
        ("--method", a.method != "linear"),
        ("--val", a.val.is_some()),
        ("--val-split", a.val_split != 0.2),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--temperature", a.temperature != 10.0),
        ("--seed", a.seed != 0),
    ];
    if let Some((flag, _)) = default_only.iter().find(|(_, given)| *given) {
        return Err(usage(format!(
            "{flag} does not apply to --protocol msn (its logistic regression is fixed; see --lambd, --tol, --epochs)"
        )));
    }
    if a.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.bundle));
    msn::fit(msn::MsnArgs {
        bundle: a.bundle,
        train: a.train,
        train_list: a.train_list,
        out,
        lambd: a.lambd.unwrap_or(0.00025),
        tol: a.tol.unwrap_or(1e-3),
        max_epochs: a.epochs,
        resize: a.resize.unwrap_or(256),
        crop: a.crop.unwrap_or(224),
        batch_size: a.batch_size,
    })
}

/// What `fewshot fit` prints when the bundle is written.
struct FitSummary {
    /// As recorded in the bundle's manifest.
    report: FitReport,
    train_accuracy: f64,
    out: PathBuf,
}

impl fmt::Display for FitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        writeln!(
            f,
            "{} classes, {} training images, method {}",
            r.classes.len(),
            r.train_images,
            r.method
        )?;
        if let Some(wd) = r.weight_decay {
            match r.validation_accuracy {
                Some(v) => writeln!(
                    f,
                    "weight decay {wd} (chosen on validation, accuracy {v:.3})"
                )?,
                None => writeln!(f, "weight decay {wd}")?,
            }
        }
        writeln!(f, "training accuracy {:.3}", self.train_accuracy)?;
        writeln!(f, "wrote the classifier bundle {}", self.out.display())
    }
}

/// `BUNDLE-fewshot` beside the bundle; `--bundle .` names no folder, so its
/// canonical path does (else the default would land inside the bundle).
fn default_out(bundle: &std::path::Path) -> PathBuf {
    let named = match bundle.file_name() {
        Some(_) => bundle.to_path_buf(),
        None => std::fs::canonicalize(bundle).unwrap_or_else(|_| bundle.to_path_buf()),
    };
    let name = named
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    named.with_file_name(format!("{name}-fewshot"))
}

/// A stratified split: `fraction` of each class (at least one image, and at
/// least one left to train on) held out, chosen from `seed`.
fn split(
    x: &Tensor,
    y: &Tensor,
    classes: i64,
    fraction: f64,
    seed: i64,
) -> Result<(Tensor, Tensor, Tensor, Tensor), Box<dyn std::error::Error>> {
    tch::manual_seed(seed);
    let (mut fit_idx, mut val_idx) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let idx = y.eq(c).nonzero().squeeze_dim(1);
        let n = idx.size()[0];
        if n < 2 {
            return Err(format!("class {c} has {n} image(s); choosing the weight decay needs 2 or more per class (or give --weight-decay)").into());
        }
        let perm = idx.index_select(0, &Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)));
        let k = ((n as f64 * fraction).round() as i64).clamp(1, n - 1);
        val_idx.push(perm.narrow(0, 0, k));
        fit_idx.push(perm.narrow(0, k, n - k));
    }
    let (fi, vi) = (Tensor::cat(&fit_idx, 0), Tensor::cat(&val_idx, 0));
    Ok((
        x.index_select(0, &fi),
        y.index_select(0, &fi),
        x.index_select(0, &vi),
        y.index_select(0, &vi),
    ))
}
