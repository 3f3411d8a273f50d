use std::fmt;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;
use tch::{Kind, Tensor};
use vit_msn::bundle::LoadOptions;
use vit_msn::classifier::{check_temperature, write_classifier, FitReport};
use vit_msn::image::preprocess_path;
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
    Fit(FitArgs),
    Eval(EvalArgs),
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
  vit-msn fewshot fit --bundle artifacts/small --train train --weight-decay 1e-3"
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
}

/// Accuracy, per-class precision and recall, and the confusion matrix of a
/// classification bundle on labelled images.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn fewshot eval --bundle artifacts/pets --test photos/test
  vit-msn fewshot eval --bundle artifacts/pets --test photos/test --json")]
struct EvalArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    test: PathBuf,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

pub fn fewshot(a: FewshotArgs) -> CliResult {
    match a.command {
        FewshotCommand::Fit(f) => fit(f),
        FewshotCommand::Eval(e) => eval(e),
    }
}

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
    BundleWriter::check_target(&out, &inputs)?;
    let backbone =
        vit_msn::Bundle::load_for_images(&a.bundle, Device::Cpu, LoadOptions::default())?;
    let train = LabelledImages::read(&a.train)?;
    if train.classes.len() < 2 {
        return Err(Error::file(
            &a.train,
            "needs at least two class folders with images (the ImageFolder layout)",
        )
        .into());
    }
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

fn eval(a: EvalArgs) -> CliResult {
    if a.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    let bundle = vit_msn::Bundle::load_for_images(&a.bundle, Device::Cpu, LoadOptions::default())?;
    let m = bundle.manifest();
    if !m.is_classifier() {
        return Err(Error::file(&a.bundle, "is a backbone bundle; eval needs a classifier").into());
    }
    let test = LabelledImages::read(&a.test)?;
    let labels = &m.model.labels;
    let truth: Vec<i64> = test
        .items
        .iter()
        .map(|(_, c)| {
            let name = &test.classes[*c as usize];
            // ImageNet's labels, for one, name `crane` twice: a folder of that
            // name cannot say which class it holds.
            let mut found = labels.iter().enumerate().filter(|(_, l)| *l == name);
            match (found.next(), found.next()) {
                (Some((i, _)), None) => Ok(i as i64),
                (Some(_), Some(_)) => Err(Error::file(
                    &a.test.join(name),
                    format!("the bundle's labels name `{name}` more than once; cannot tell which class this folder holds"),
                )),
                (None, _) => Err(Error::file(
                    &a.test.join(name),
                    format!(
                        "class `{name}` is not one of the bundle's labels ({})",
                        labels.join(", ")
                    ),
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    let pp = m.preprocessing()?;
    let progress = bar(test.items.len(), "test images");
    let mut pred = Vec::new();
    for chunk in test.items.chunks(a.batch_size) {
        let px = chunk
            .iter()
            .map(|(p, _)| preprocess_path(p, &pp, m.model.num_channels))
            .collect::<Result<Vec<_>, _>>()?;
        let logits = bundle
            .forward(&Tensor::stack(&px, 0), None, None)?
            .logits
            .ok_or("no logits")?;
        pred.extend(Vec::<i64>::try_from(logits.argmax(-1, false))?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let report = EvalReport::new(a.bundle, a.test, labels.clone(), &truth, &pred);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// What `fewshot eval` finds: printed as text, or as JSON with `--json`
/// (fields in alphabetical order, the keys as earlier versions printed them).
#[derive(Serialize)]
struct EvalReport {
    accuracy: f64,
    bundle: PathBuf,
    /// Rows: the true class; columns: the predicted one; in label order.
    confusion_matrix: Vec<Vec<usize>>,
    images: usize,
    labels: Vec<String>,
    per_class: Vec<ClassScores>,
    test: PathBuf,
}

/// One class's precision and recall (none where nothing was predicted as,
/// or is, that class) and how many test images it has.
#[derive(Serialize)]
struct ClassScores {
    label: String,
    precision: Option<f64>,
    recall: Option<f64>,
    support: usize,
}

impl EvalReport {
    /// `truth` and `pred` are class indices into `labels`, one per image.
    fn new(
        bundle: PathBuf,
        test: PathBuf,
        labels: Vec<String>,
        truth: &[i64],
        pred: &[i64],
    ) -> Self {
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (t, p) in truth.iter().zip(pred) {
            confusion[*t as usize][*p as usize] += 1;
        }
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        let ratio = |a: usize, b: usize| {
            if b == 0 {
                None
            } else {
                Some(a as f64 / b as f64)
            }
        };
        let per_class = (0..k)
            .map(|i| {
                let predicted: usize = (0..k).map(|r| confusion[r][i]).sum();
                let actual: usize = confusion[i].iter().sum();
                ClassScores {
                    label: labels[i].clone(),
                    precision: ratio(confusion[i][i], predicted),
                    recall: ratio(confusion[i][i], actual),
                    support: actual,
                }
            })
            .collect();
        Self {
            accuracy: correct as f64 / truth.len() as f64,
            bundle,
            confusion_matrix: confusion,
            images: truth.len(),
            labels,
            per_class,
            test,
        }
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let correct: usize = (0..self.labels.len())
            .map(|i| self.confusion_matrix[i][i])
            .sum();
        writeln!(
            f,
            "accuracy {:.3} ({correct}/{} images)",
            self.accuracy, self.images
        )?;
        writeln!(
            f,
            "{:<20} {:>9} {:>9} {:>8}",
            "class", "precision", "recall", "support"
        )?;
        let score = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        for c in &self.per_class {
            writeln!(
                f,
                "{:<20} {:>9} {:>9} {:>8}",
                c.label,
                score(c.precision),
                score(c.recall),
                c.support
            )?;
        }
        writeln!(
            f,
            "confusion matrix (rows: true class, columns: predicted, in label order):"
        )?;
        for row in &self.confusion_matrix {
            let cells: String = row.iter().map(|n| format!("{n:>4}")).collect();
            writeln!(f, "  {cells}")?;
        }
        Ok(())
    }
}
