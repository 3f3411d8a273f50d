//! `vit-msn fewshot eval`: a classification bundle on labelled images, to
//! accuracy, per-class precision and recall, and the confusion matrix.

use std::fmt;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use tch::Tensor;
use vit_msn::bundle::LoadOptions;
use vit_msn::image::preprocess_path;
use vit_msn::{Device, Error};

use super::bar;
use crate::cli::fewshot_fit::LabelledImages;
use crate::cli::{usage, CliResult};

/// Accuracy, per-class precision and recall, and the confusion matrix of a
/// classification bundle on labelled images.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn fewshot eval --bundle artifacts/pets --test photos/test
  vit-msn fewshot eval --bundle artifacts/pets --test photos/test --json")]
pub struct EvalArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    test: PathBuf,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

pub fn eval(a: EvalArgs) -> CliResult {
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
