//! Low-shot classification on real labelled data (scikit-learn's handwritten
//! digits, 10 training images per class) with the deterministic untrained
//! backbone of the vit-msn-small shape, checked against scikit-learn on the
//! same embeddings.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, fixtures, root, scratch, vit_msn};

fn backbone() -> PathBuf {
    let dir = scratch("fewshot-backbone");
    let model = dir.join("model");
    let config = serde_json::json!({
        "architectures": ["ViTMSNModel"], "hidden_size": 384, "num_hidden_layers": 12,
        "num_attention_heads": 6, "intermediate_size": 1536, "image_size": 224, "patch_size": 16,
    });
    vit_msn_graph::untrained::write_untrained_checkpoint(&model, &config, 0).unwrap();
    let bundle = dir.join("bundle");
    assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &bundle]),
        "compile backbone",
    );
    bundle
}

fn eval_json(bundle: &Path, test: &Path) -> serde_json::Value {
    let out = vit_msn(&[
        &"fewshot",
        &"eval",
        &"--bundle",
        &bundle,
        &"--test",
        &test,
        &"--json",
    ]);
    assert_ok(&out, "fewshot eval");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn linear_and_prototype_heads_on_digits() {
    let digits = fixtures().join("digits");
    let (train, test) = (digits.join("train"), digits.join("test"));
    let backbone = backbone();
    let work = scratch("fewshot-work");

    // Linear probe, weight decay chosen on a validation split.
    let linear = work.join("linear");
    assert_ok(
        &vit_msn(&[
            &"fewshot",
            &"fit",
            &"--bundle",
            &backbone,
            &"--train",
            &train,
            &"--out",
            &linear,
        ]),
        "fit linear",
    );
    let cache: Vec<PathBuf> = std::fs::read_dir(backbone.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cache.len(), 1);
    let cached_at = std::fs::metadata(&cache[0]).unwrap().modified().unwrap();
    let lin = eval_json(&linear, &test);
    let lin_acc = lin["accuracy"].as_f64().unwrap();
    eprintln!("linear probe: test accuracy {lin_acc:.3}");
    // Chance is 0.1; measured 0.573 on the development machine (scikit-learn: 0.567).
    assert!(lin_acc >= 0.4, "linear accuracy {lin_acc}");
    assert_eq!(lin["confusion_matrix"].as_array().unwrap().len(), 10);
    assert_eq!(lin["per_class"][3]["support"], 15);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(linear.join("manifest.json")).unwrap())
            .unwrap();
    let wd = manifest["fewshot"]["weight_decay"].as_f64().unwrap();
    assert_eq!(manifest["task"], "classification");
    assert_eq!(manifest["model"]["labels"][7], "digit_7");

    // Prototypes; the second fit embeds nothing again (the cache is not rewritten).
    let proto = work.join("proto");
    assert_ok(
        &vit_msn(&[
            &"fewshot",
            &"fit",
            &"--bundle",
            &backbone,
            &"--train",
            &train,
            &"--out",
            &proto,
            &"--method",
            &"prototype",
        ]),
        "fit prototype",
    );
    assert_eq!(
        std::fs::metadata(&cache[0]).unwrap().modified().unwrap(),
        cached_at
    );
    let proto_acc = eval_json(&proto, &test)["accuracy"].as_f64().unwrap();
    eprintln!("prototypes: test accuracy {proto_acc:.3}");
    // Measured 0.527, the same as numpy's nearest normalised class mean.
    assert!(proto_acc >= 0.4, "prototype accuracy {proto_acc}");

    // scikit-learn on the same embeddings (from `vit-msn run --embeddings`).
    let (tr, te) = (work.join("train.npy"), work.join("test.npy"));
    assert_ok(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &backbone,
            &"--image",
            &train,
            &"--embeddings",
            &tr,
        ]),
        "embed train",
    );
    assert_ok(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &backbone,
            &"--image",
            &test,
            &"--embeddings",
            &te,
        ]),
        "embed test",
    );
    let script = r#"
import json, sys, numpy as np
from sklearn.linear_model import LogisticRegression
tr, te, wd = np.load(sys.argv[1]), np.load(sys.argv[2]), float(sys.argv[3])
norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
tr, te = norm(tr), norm(te)
ytr, yte = np.repeat(np.arange(10), 10), np.repeat(np.arange(10), 15)
lr = LogisticRegression(C=1.0 / (wd * len(tr)), max_iter=10000).fit(tr, ytr)
protos = norm(np.stack([tr[ytr == c].mean(0) for c in range(10)]))
print(json.dumps({"linear": float((lr.predict(te) == yte).mean()),
                  "prototype": float(((te @ protos.T).argmax(1) == yte).mean())}))
"#;
    let py = std::process::Command::new(root().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(&tr)
        .arg(&te)
        .arg(wd.to_string())
        .output()
        .unwrap();
    assert_ok(&py, "scikit-learn reference");
    let reference: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let (sk_lin, sk_proto) = (
        reference["linear"].as_f64().unwrap(),
        reference["prototype"].as_f64().unwrap(),
    );
    eprintln!("scikit-learn: linear {sk_lin:.3}, prototypes {sk_proto:.3}");
    assert!(
        (lin_acc - sk_lin).abs() <= 0.05,
        "linear {lin_acc} vs scikit-learn {sk_lin}"
    );
    assert!(
        (proto_acc - sk_proto).abs() <= 0.014,
        "prototypes {proto_acc} vs numpy {sk_proto}"
    );

    // --val: the weight decay chosen on given validation images (here the
    // training images, already cached), recorded in the manifest.
    let with_val = work.join("with-val");
    assert_ok(
        &vit_msn(&[
            &"fewshot",
            &"fit",
            &"--bundle",
            &backbone,
            &"--train",
            &train,
            &"--val",
            &train,
            &"--out",
            &with_val,
        ]),
        "fit --val",
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(with_val.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["fewshot"]["weight_decay_chosen_on_validation"], true);

    // The classifier is one TorchScript file per resolution: Python loads it
    // and gets the Rust runtime's logits.
    let px = work.join("px.safetensors");
    let one = test.join("digit_3").join("10.png");
    assert_ok(
        &vit_msn(&[
            &"preprocess",
            &"--image",
            &one,
            &"--bundle",
            &linear,
            &"--output",
            &px,
        ]),
        "preprocess",
    );
    let rust_out = work.join("rust.safetensors");
    assert_ok(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &linear,
            &"--inputs",
            &px,
            &"--output",
            &rust_out,
        ]),
        "run --inputs",
    );
    let py_out = work.join("py.safetensors");
    let load = r#"
import sys, torch
from safetensors.torch import load_file, save_file
m = torch.jit.load(sys.argv[1])
px = load_file(sys.argv[2])["pixel_values"]
out = m(px, torch.zeros(1, 196, dtype=torch.bool), torch.ones(12, 6))
save_file({"logits": out["logits"].contiguous()}, sys.argv[3])
"#;
    let py = std::process::Command::new(root().join(".venv/bin/python"))
        .args(["-c", load])
        .arg(linear.join("model_224x224.pt"))
        .arg(&px)
        .arg(&py_out)
        .output()
        .unwrap();
    assert_ok(&py, "python loads the few-shot classifier");
    let a = common::read(&py_out).remove(0).1;
    let b = common::read(&rust_out)
        .into_iter()
        .find(|(n, _)| n == "logits")
        .unwrap()
        .1;
    assert!(a.equal(&b), "Python and Rust logits differ");

    // The classifier is an ordinary bundle: `vit-msn run` names the digits.
    let one = test.join("digit_3").join("10.png");
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &linear,
        &"--image",
        &one,
        &"--top-k",
        &"1",
    ]);
    assert_ok(&out, "run the few-shot classifier");
    assert!(String::from_utf8_lossy(&out.stdout).contains("digit_"));
}

#[test]
fn fewshot_errors() {
    let dir = scratch("fewshot-errors");
    let one_class = dir.join("train").join("only");
    std::fs::create_dir_all(&one_class).unwrap();
    std::fs::copy(
        root().join("tests/data/photos/camera.png"),
        one_class.join("a.png"),
    )
    .unwrap();
    let bundle = common::compile_case("e2e_backbone", "fewshot-errors-bundle", &[]);
    let out = vit_msn(&[
        &"fewshot",
        &"fit",
        &"--bundle",
        &bundle,
        &"--train",
        &dir.join("train"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs at least two class folders"));
    let classifier = common::compile_case("e2e_classifier", "fewshot-errors-classifier", &[]);
    let out = vit_msn(&[
        &"fewshot",
        &"fit",
        &"--bundle",
        &classifier,
        &"--train",
        &root().join("tests/data"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = vit_msn(&[
        &"fewshot",
        &"fit",
        &"--bundle",
        &bundle,
        &"--train",
        &dir,
        &"--method",
        &"svm",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown method `svm`"));
}
