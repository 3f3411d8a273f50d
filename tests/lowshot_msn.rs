//! MSN's low-shot preprocessing against torchvision
//! (tests/lowshot/msn_reference.py).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, root, scratch};
use tch::Tensor;
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
