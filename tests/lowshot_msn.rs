//! `fewshot fit --protocol msn` against the references of MSN's
//! `logistic_eval.py` (tests/lowshot/msn_reference.py): torchvision's
//! Resize + CenterCrop pixels, transformers' `hidden_states[-1][:, 0]`, and
//! scikit-learn's `LogisticRegression(fit_intercept=False, C=1/lambd)`,
//! end to end on images of several aspect ratios.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, root, scratch, vit_msn};
use tch::{Kind, Tensor};
use vit_msn::bundle::LoadOptions;
use vit_msn::image::{preprocess_path, Preprocessing};

fn reference(step: &str, out: &Path, extra: &[&Path]) {
    let got = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/lowshot/msn_reference.py"))
        .arg(step)
        .arg(out)
        .args(extra)
        .output()
        .expect("run the reference");
    assert_ok(&got, &format!("msn_reference.py {step}"));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn resize_and_center_crop_are_torchvision_s() {
    let dir = scratch("msn-pixels");
    reference("pixels", &dir, &[]);
    let want: std::collections::BTreeMap<String, Tensor> =
        common::read(&dir.join("pixels.safetensors"))
            .into_iter()
            .collect();
    let cases = read_json(&dir.join("pixels.json"));
    let cases = cases.as_array().unwrap();
    // Photos of five aspect ratios, RGBA, grey, palette.
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for case in cases {
        let pp = Preprocessing::msn_eval(
            case["resize"].as_u64().unwrap() as u32,
            case["crop"].as_u64().unwrap() as u32,
        )
        .unwrap();
        let file = PathBuf::from(case["file"].as_str().unwrap());
        let got = preprocess_path(&file, &pp, 3).unwrap();
        let key = case["key"].as_str().unwrap();
        let want = &want[key];
        assert_eq!(got.size(), want.size(), "{key} {}", file.display());
        // The bound the image-parity tests hold for these formats: none.
        let max = (&got - want).abs().max().double_value(&[]);
        assert_eq!(max, 0.0, "{key} {}: max |diff| {max}", file.display());
    }
}

/// The reference's model and images, and its backbone compiled.
fn msn_case(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    reference("setup", &dir, &[]);
    let bundle = dir.join("bundle");
    assert_ok(
        &vit_msn(&[
            &"compile",
            &"--model",
            &dir.join("model"),
            &"--out",
            &bundle,
        ]),
        "compile",
    );
    (dir, bundle)
}

#[test]
fn pre_layernorm_cls_is_transformers_last_hidden_state_cls() {
    let (dir, bundle) = msn_case("msn-features");
    reference("features", &dir, &[]);
    let t = common::read(&dir.join("features.safetensors"));
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let (px, want) = (get("pixel_values"), get("expected"));
    let options = LoadOptions {
        pre_layernorm_cls: true,
        ..Default::default()
    };
    let b = vit_msn::Bundle::load_with(&bundle, vit_msn::Device::Cpu, &options).unwrap();
    let got = b.pre_layernorm_cls(&px).unwrap();
    let scale = want.abs().max().double_value(&[]).max(1.0);
    let max = (&got - &want).abs().max().double_value(&[]);
    eprintln!("pre-layernorm CLS: max |diff| {max:.3e} (scale {scale:.2})");
    assert!(max <= 1e-4 * scale, "max |diff| {max}");
    // The forward pass itself is unchanged by the rewrite.
    let plain = vit_msn::Bundle::load(&bundle, vit_msn::Device::Cpu).unwrap();
    let a = plain
        .forward(&px, None, None)
        .unwrap()
        .last_hidden_state
        .unwrap();
    let c = b
        .forward(&px, None, None)
        .unwrap()
        .last_hidden_state
        .unwrap();
    assert!(a.equal(&c));
    // And the features differ from the normalised CLS the default fit uses.
    assert!(!a
        .select(1, 0)
        .to_kind(Kind::Float)
        .allclose(&got, 1e-3, 1e-3, false));
    // Without the option, or on a classifier, it is refused.
    assert!(plain.pre_layernorm_cls(&px).is_err());
}

#[test]
fn msn_protocol_end_to_end_against_scikit_learn() {
    let (dir, bundle) = msn_case("msn-e2e");
    let out = dir.join("classifier");
    let list = dir.join("5imgs_class.txt");
    let fit = vit_msn(&[
        &"fewshot",
        &"fit",
        &"--protocol",
        &"msn",
        &"--bundle",
        &bundle,
        &"--train",
        &dir.join("train"),
        &"--train-list",
        &list,
        &"--resize",
        &"40",
        &"--crop",
        &"32",
        &"--out",
        &out,
    ]);
    assert_ok(&fit, "fit --protocol msn");
    eprintln!("{}", String::from_utf8_lossy(&fit.stdout));
    let m = read_json(&out.join("manifest.json"));
    assert_eq!(m["preprocessing"]["image_processor_type"], "torchvision");
    assert_eq!(m["preprocessing"]["resize"], 40);
    assert_eq!(m["fewshot"]["protocol"], "msn");
    assert_eq!(m["fewshot"]["train_images"], 20);
    assert_eq!(m["fewshot"]["lambda"], 0.00025 / 20.0);

    reference("compare", &dir, &[&out]);
    let c = read_json(&dir.join("compare.json"));
    let cmp = c.to_string();
    eprintln!("{cmp}");
    let f = |k: &str| c[k].as_f64().unwrap();
    assert_eq!(f("bias_max_abs"), 0.0);
    assert!(f("test_images") >= 200.0);
    // The same objective's minimiser, to the protocol's tolerance.
    assert!(f("coef_rel_diff") <= 0.02, "coefficients {cmp}");
    assert!(f("agreement") >= 0.99, "predictions {cmp}");
    assert!(
        (f("bundle_accuracy_on_torchvision_pixels") - f("sklearn_accuracy")).abs() <= 0.01,
        "{cmp}"
    );

    // fewshot eval preprocesses as the manifest says, and finds the same accuracy.
    let eval = vit_msn(&[
        &"fewshot",
        &"eval",
        &"--bundle",
        &out,
        &"--test",
        &dir.join("test"),
        &"--json",
    ]);
    assert_ok(&eval, "fewshot eval");
    let e: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let acc = e["accuracy"].as_f64().unwrap();
    assert_eq!(e["labels"].as_array().unwrap().len(), 4);
    assert_eq!(e["confusion_matrix"].as_array().unwrap().len(), 4);
    assert!(
        (acc - f("sklearn_accuracy")).abs() <= 0.01,
        "eval {acc} vs {cmp}"
    );
}

fn fit_msn(
    bundle: &Path,
    train: &Path,
    crop: &str,
    extra: &[&dyn AsRef<std::ffi::OsStr>],
) -> std::process::Output {
    let out = train.with_file_name("out");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"fewshot",
        &"fit",
        &"--protocol",
        &"msn",
        &"--bundle",
        &bundle,
        &"--train",
        &train,
        &"--resize",
        &"72",
        &"--crop",
        &crop,
        &"--out",
        &out,
    ];
    args.extend_from_slice(extra);
    vit_msn(&args)
}

fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn train_lists_and_flags_are_checked() {
    let dir = scratch("msn-lists");
    let train = dir.join("train");
    let photos = root().join("src/cli/demo_photos");
    for (wnid, file) in [
        ("n01", "astronaut.jpg"),
        ("n02", "chelsea.jpg"),
        ("n03", "coffee.jpg"),
    ] {
        std::fs::create_dir_all(train.join(wnid)).unwrap();
        std::fs::copy(
            photos.join(file),
            train.join(wnid).join(format!("{wnid}_1.jpg")),
        )
        .unwrap();
    }
    let bundle = common::compile_case("e2e_backbone", "msn-lists-bundle", &[]);
    let list = dir.join("list.txt");
    let with = |text: &str| {
        std::fs::write(&list, text).unwrap();
        fit_msn(&bundle, &train, "64", &[&"--train-list", &list])
    };
    assert_refused(
        &with("n01_1.jpg\nn02_1.jpg\nn03_9.jpg\n"),
        1,
        "n03_9.jpg not found",
    );
    assert_refused(&with("n01_1.jpg\nn02_1.jpg\n"), 1, "class `n03`");
    assert_refused(
        &with("n01_1.jpg\nn02_1.jpg\nn03_1.jpg\nn01_1.jpg\n"),
        1,
        "listed twice",
    );
    assert_refused(&with("n01_1.jpg\nfoo.jpg\n"), 1, "line 2");
    assert_refused(&with("n01_1.jpg\nn09_1.jpg\n"), 1, "not found");
    assert!(!dir.join("out").exists());
    // A whole list fits, and the manifest names it.
    assert_ok(
        &with("n01_1.jpg\n\nn02_1.jpg\nn03_1.jpg\n"),
        "fit with a list",
    );
    let m = read_json(&dir.join("out/manifest.json"));
    assert_eq!(m["fewshot"]["train_images"], 3);
    assert_eq!(m["preprocessing"]["crop_size"]["height"], 64);

    // Flags of the other protocol are refused, before anything loads.
    let out = dir.join("out2");
    for (extra, needle) in [
        (vec!["--method", "prototype"], "--method"),
        (vec!["--weight-decay", "0.1"], "--weight-decay"),
        (vec!["--lambd", "0"], "--lambd"),
        (vec!["--tol", "1"], "--tol"),
        (vec!["--crop", "80"], "--crop"),
    ] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"fewshot",
            &"fit",
            &"--protocol",
            &"msn",
            &"--bundle",
            &bundle,
            &"--train",
            &train,
            &"--out",
            &out,
            &"--resize",
            &"72",
        ];
        for e in &extra {
            args.push(e);
        }
        assert_refused(&vit_msn(&args), 2, needle);
    }
    let default_with_lambd = vit_msn(&[
        &"fewshot",
        &"fit",
        &"--bundle",
        &bundle,
        &"--train",
        &train,
        &"--out",
        &out,
        &"--lambd",
        &"0.1",
    ]);
    assert_refused(&default_with_lambd, 2, "--lambd is for --protocol msn");
    // A crop the backbone was not compiled for.
    let got = fit_msn(&bundle, &train, "48", &[]);
    assert_refused(&got, 1, "no artifact for the 48x48 crop");
    assert!(!out.exists());
}
