//! Low-shot classification on real labelled data (scikit-learn's handwritten
//! digits, 10 training images per class) with the deterministic untrained
//! backbone of the vit-msn-small shape, checked against scikit-learn on the
//! same embeddings.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, fixtures, root, run_bundle, scratch, vit_msn, MKL_AS_SHIPPED};

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
    // Compared bit for bit below: oneMKL's kernels as Python has them.
    let rust_out = work.join("rust.safetensors");
    assert_ok(
        &run_bundle(&linear, &px, &rust_out, MKL_AS_SHIPPED),
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
        root().join("src/cli/demo_photos/camera.png"),
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
        &root().join("src/cli"),
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
    assert_refused(&out, 2, "unknown method `svm`");
    let out = fit_with(&bundle, &dir, &dir.join("out"), &["--batch-size", "0"]);
    assert_refused(&out, 2, "--batch-size must be at least 1");
}

/// Two classes (`a`, `b`) of two test photos each, in `dir/train`.
fn photo_classes(dir: &Path) -> PathBuf {
    let photos = root().join("src/cli/demo_photos");
    let train = dir.join("train");
    for (class, files) in [
        ("a", ["astronaut.jpg", "camera.png"]),
        ("b", ["chelsea.jpg", "coffee.jpg"]),
    ] {
        std::fs::create_dir_all(train.join(class)).unwrap();
        for f in files {
            std::fs::copy(photos.join(f), train.join(class).join(f)).unwrap();
        }
    }
    train
}

fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn fit_with(bundle: &Path, train: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"fewshot",
        &"fit",
        &"--bundle",
        &bundle,
        &"--train",
        &train,
        &"--out",
        &out,
    ];
    for e in extra {
        args.push(e);
    }
    vit_msn(&args)
}

#[test]
fn fit_refuses_numbers_that_break_the_head() {
    let dir = scratch("fewshot-numbers");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-numbers-bundle", &[]);
    let out = dir.join("out");
    for (method, arg, needle) in [
        ("prototype", "--temperature=-10", "temperature"),
        ("prototype", "--temperature=0", "temperature"),
        ("prototype", "--temperature=nan", "temperature"),
        ("prototype", "--temperature=inf", "temperature"),
        ("prototype", "--temperature=1e300", "temperature"),
        ("linear", "--epochs=0", "epochs"),
        ("linear", "--epochs=100001", "epochs"),
        ("linear", "--weight-decay=1e308", "weight-decay"),
        ("linear", "--weight-decay=-1", "weight-decay"),
        ("linear", "--weight-decay=nan", "weight-decay"),
    ] {
        let got = fit_with(&bundle, &train, &out, &["--method", method, arg]);
        assert_refused(&got, 2, needle);
        assert!(!out.exists(), "{arg} wrote a bundle");
    }
}

#[test]
fn a_diverged_or_ambiguous_head_is_not_written() {
    use tch::{Kind, Tensor};
    use vit_msn::classifier::{write_classifier, FitReport, Head};

    let bundle = common::compile_case("e2e_backbone", "fewshot-diverged-bundle", &[]);
    let backbone = vit_msn::Bundle::load(&bundle, vit_msn::Device::Cpu).unwrap();
    let d = backbone.manifest().model.hidden_size;
    let out = scratch("fewshot-diverged").join("out");
    let report = FitReport {
        method: "linear".into(),
        classes: vec!["a".into(), "b".into()],
        train_images: 2,
        weight_decay: Some(0.1),
        weight_decay_chosen_on_validation: false,
        validation_accuracy: None,
        temperature: None,
        epochs: 1,
        seed: 0,
    };
    let opts = (Kind::Float, tch::Device::Cpu);
    let labels = ["a".to_string(), "b".to_string()];
    let nan = Head {
        weight: Tensor::full([2, d], f64::NAN, opts),
        bias: Tensor::zeros([2], opts),
        scale: 1.0,
    };
    let err = write_classifier(&backbone, &nan, &labels, &report, &out).unwrap_err();
    assert!(err.to_string().contains("the fit diverged"), "{err}");
    let inf_bias = Head {
        weight: Tensor::zeros([2, d], opts),
        bias: Tensor::full([2], f64::INFINITY, opts),
        scale: 1.0,
    };
    let err = write_classifier(&backbone, &inf_bias, &labels, &report, &out).unwrap_err();
    assert!(err.to_string().contains("the fit diverged"), "{err}");
    let fine = Head {
        weight: Tensor::zeros([2, d], opts),
        bias: Tensor::zeros([2], opts),
        scale: 1.0,
    };
    let twice = ["café".to_string(), "café".to_string()];
    let err = write_classifier(&backbone, &fine, &twice, &report, &out).unwrap_err();
    assert!(err.to_string().contains("more than once"), "{err}");
    assert!(!out.exists());
}

#[test]
fn non_utf8_class_folders_are_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let dir = scratch("fewshot-non-utf8");
    let photos = root().join("src/cli/demo_photos");
    let bad = dir.join("bad");
    // Both names read lossily as `caf�`.
    for (name, file) in [
        (&b"caf\xe9"[..], "astronaut.jpg"),
        (&b"caf\xe8"[..], "chelsea.jpg"),
        (&b"b"[..], "rocket.jpg"),
    ] {
        let class = bad.join(OsStr::from_bytes(name));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(photos.join(file), class.join(file)).unwrap();
    }
    let bundle = common::compile_case("e2e_backbone", "fewshot-non-utf8-bundle", &[]);
    let out = dir.join("out");
    let got = fit_with(&bundle, &bad, &out, &["--method", "prototype"]);
    assert_refused(&got, 1, "not valid UTF-8");
    assert!(String::from_utf8_lossy(&got.stderr).contains("caf\u{fffd}"));
    assert!(!out.exists());

    // eval refuses the same folder rather than matching it to a label.
    let train = photo_classes(&dir);
    assert_ok(
        &fit_with(&bundle, &train, &out, &["--method", "prototype"]),
        "fit",
    );
    let got = vit_msn(&[&"fewshot", &"eval", &"--bundle", &out, &"--test", &bad]);
    assert_refused(&got, 1, "not valid UTF-8");
}

#[test]
fn damaged_cache_entries_are_embedded_again() {
    use tch::{Kind, Tensor};
    use vit_msn::tensors::{parse_safetensors, write_safetensors};

    let dir = scratch("fewshot-damaged-cache");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-damaged-cache-bundle", &[]);
    let d = 48;
    let out = dir.join("out");
    let wd = ["--weight-decay", "0.1"];
    assert_ok(&fit_with(&bundle, &train, &out, &wd), "first fit");
    let cache: Vec<PathBuf> = std::fs::read_dir(bundle.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cache.len(), 1);
    let mut entries = parse_safetensors(&std::fs::read(&cache[0]).unwrap(), &cache[0]).unwrap();
    assert_eq!(entries.len(), 4);
    // A wrong shape, a wrong dtype and a non-finite row.
    entries[0].1 = Tensor::zeros([7], (Kind::Float, tch::Device::Cpu));
    entries[1].1 = Tensor::ones([d], (Kind::Int64, tch::Device::Cpu));
    entries[2].1 = Tensor::full([d], f64::NAN, (Kind::Float, tch::Device::Cpu));
    let named: Vec<(&str, &Tensor)> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_safetensors(&cache[0], &named).unwrap();

    let got = fit_with(&bundle, &train, &out, &wd);
    assert_ok(&got, "fit on a damaged cache");
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The damaged entries were replaced by fresh embeddings.
    let repaired = parse_safetensors(&std::fs::read(&cache[0]).unwrap(), &cache[0]).unwrap();
    assert_eq!(repaired.len(), 4);
    for (key, t) in &repaired {
        assert_eq!(t.size(), [d], "{key}");
        assert_eq!(t.kind(), Kind::Float, "{key}");
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{key}");
    }
}

#[test]
fn val_with_weight_decay_and_val_split_zero_are_refused() {
    let dir = scratch("fewshot-val-flags");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-val-flags-bundle", &[]);
    let out = dir.join("out");
    let missing = dir.join("missing");
    let got = fit_with(
        &bundle,
        &train,
        &out,
        &["--val", missing.to_str().unwrap(), "--weight-decay", "0.1"],
    );
    assert_refused(&got, 2, "--weight-decay");
    let got = fit_with(&bundle, &train, &out, &["--val-split", "0"]);
    assert_refused(&got, 2, "--val-split");
    // Without --weight-decay, a --val folder that is not there fails before any embedding.
    let got = fit_with(&bundle, &train, &out, &["--val", missing.to_str().unwrap()]);
    assert_refused(&got, 1, "missing");
    assert!(!bundle.join("cache").exists());
    assert!(!out.exists());
}

#[test]
fn eval_takes_one_class_and_aligns_its_table() {
    let dir = scratch("fewshot-eval-one-class");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-eval-one-class-bundle", &[]);
    let out = dir.join("out");
    assert_ok(
        &fit_with(&bundle, &train, &out, &["--weight-decay", "0.1"]),
        "fit",
    );
    let one = dir.join("one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::rename(train.join("a"), one.join("a")).unwrap();
    let report = eval_json(&out, &one);
    assert_eq!(report["images"], 2);
    assert_eq!(report["per_class"][0]["support"], 2);
    assert_eq!(report["per_class"][1]["support"], 0);

    let got = vit_msn(&[&"fewshot", &"eval", &"--bundle", &out, &"--test", &one]);
    assert_ok(&got, "eval table");
    let text = String::from_utf8_lossy(&got.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().find(|l| l.starts_with("class ")).unwrap();
    let row = lines.iter().find(|l| l.starts_with("a ")).unwrap();
    assert_eq!(row.len(), header.len(), "{header}\n{row}");
    assert!(row.ends_with("       2"), "{row}");
}

#[test]
fn default_out_of_bundle_dot_is_beside_the_bundle() {
    let dir = scratch("fewshot-bundle-dot");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-bundle-dot-bundle", &[]);
    let got = std::process::Command::new(common::bin())
        .current_dir(&bundle)
        .args([
            "fewshot",
            "fit",
            "--bundle",
            ".",
            "--weight-decay",
            "0.1",
            "--train",
        ])
        .arg(&train)
        .output()
        .unwrap();
    assert_ok(&got, "fit --bundle .");
    assert!(!bundle.join("bundle-fewshot").exists());
    let beside = bundle.with_file_name("bundle-fewshot");
    assert!(beside.join("manifest.json").is_file());
    assert!(String::from_utf8_lossy(&got.stdout).contains(&*beside.to_string_lossy()));
}

#[test]
fn eval_refuses_a_folder_whose_label_the_bundle_names_twice() {
    let dir = scratch("fewshot-eval-label-twice");
    let train = photo_classes(&dir);
    let bundle = common::compile_case("e2e_backbone", "fewshot-eval-label-twice-bundle", &[]);
    let out = dir.join("out");
    assert_ok(
        &fit_with(&bundle, &train, &out, &["--method", "prototype"]),
        "fit",
    );
    // As ImageNet's labels name `crane` twice.
    let path = out.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["model"]["labels"] = serde_json::json!(["b", "b"]);
    std::fs::write(&path, manifest.to_string()).unwrap();
    std::fs::remove_dir_all(train.join("a")).unwrap();
    let got = vit_msn(&[&"fewshot", &"eval", &"--bundle", &out, &"--test", &train]);
    assert_refused(&got, 1, "more than once");
}
