//! The classification loss, with transformers' `problem_type` rules.

use tch::{Kind, Reduction, Tensor};

use crate::error::{Error, Result};

/// CrossEntropyLoss's `ignore_index`: a label the loss skips, as in transformers.
const IGNORE_INDEX: i64 = -100;

/// `problem_type` if set; else one label → regression, integer labels →
/// single-label cross-entropy, anything else → multi-label BCE with logits.
pub fn loss(logits: &Tensor, labels: &Tensor, problem_type: Option<&str>) -> Result<Tensor> {
    let num_labels = *logits.size().last().unwrap_or(&0);
    let integer_labels = matches!(labels.kind(), Kind::Int64 | Kind::Int);
    let problem = match problem_type {
        Some(p) => p,
        None if num_labels == 1 => "regression",
        None if num_labels > 1 && integer_labels => "single_label_classification",
        None => "multi_label_classification",
    };
    let bad = |m: String| Error::input("labels", m);
    let logits = logits.to_kind(Kind::Float);
    let out = match problem {
        "regression" => {
            let labels = labels.to_kind(Kind::Float);
            if num_labels == 1 {
                check_numel(&logits, &labels)?;
                logits
                    .squeeze()
                    .f_mse_loss(&labels.squeeze(), Reduction::Mean)
            } else {
                logits.f_mse_loss(&labels, Reduction::Mean)
            }
        }
        "single_label_classification" => {
            if !integer_labels {
                return Err(bad(format!(
                    "single-label classification needs integer labels, found {:?}",
                    labels.kind()
                )));
            }
            let labels = labels.to_kind(Kind::Int64).view([-1]);
            let in_range = labels
                .ge(0)
                .logical_and(&labels.lt(num_labels))
                .logical_or(&labels.eq(IGNORE_INDEX))
                .all()
                .f_int64_value(&[])
                .unwrap_or(0)
                == 1;
            if !in_range {
                return Err(bad(format!(
                    "class indices must be in 0..{num_labels} (or {IGNORE_INDEX}, ignored)"
                )));
            }
            logits
                .view([-1, num_labels])
                .f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, IGNORE_INDEX, 0.0)
        }
        "multi_label_classification" => logits.f_binary_cross_entropy_with_logits::<Tensor>(
            &labels.to_kind(Kind::Float),
            None,
            None,
            Reduction::Mean,
        ),
        other => return Err(bad(format!("unknown problem_type `{other}`"))),
    };
    out.map_err(|e| bad(crate::bundle::first_line(&e.to_string())))
}

fn check_numel(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.numel() != b.numel() {
        return Err(Error::input(
            "labels",
            format!("expected {} value(s), found {}", a.numel(), b.numel()),
        ));
    }
    Ok(())
}
