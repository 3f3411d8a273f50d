//! Image preprocessing parity: `vit_msn::image` against transformers 4.46.3's
//! ViTImageProcessor on Pillow-decoded images (fixtures written by
//! tests/fixtures/make_image_fixtures.py), and every refusal.
//!
//! Run with `--nocapture` to see the measured differences per image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::Value;
use tch::{Kind, Tensor};
use vit_msn::image::{
    is_image_path, load_image, preprocess_image, preprocess_path, DecodedImage, Preprocessing,
};
use vit_msn::tensors::read_safetensors;
use vit_msn::Error;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static GENERATE: Mutex<()> = Mutex::new(());

/// The generated image fixtures; generated with the project's venv when
/// missing (`make fixtures` does the same), or a loud failure.
fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VIT_MSN_IMAGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("tests/fixtures/generated-images"));
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("COMPLETE").exists() {
        let python = root().join(".venv/bin/python");
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new(&python)
            .arg(root().join("tests/fixtures/make_image_fixtures.py"))
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "image fixtures are missing from {} and {} cannot run (`make fixtures`): {e}",
                    dir.display(),
                    python.display()
                )
            });
        assert!(
            status.success(),
            "image fixture generation failed; run `make fixtures` (needs pillow and scikit-image in .venv)"
        );
        std::fs::write(dir.join("COMPLETE"), "").expect("write fixture stamp");
    }
    dir
}

fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

fn spec() -> (PathBuf, Value) {
    let dir = fixtures();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    (dir, serde_json::from_str(&text).expect("parse cases.json"))
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// The parity class of a fixture image, which sets its bound.
fn class(image: &Value) -> &'static str {
    let lossy = image["lossy"].as_bool().expect("lossy");
    match (image["format"].as_str().expect("format"), lossy) {
        ("JPEG", _) => "jpeg",
        ("WEBP", true) => "webp-lossy",
        _ => "lossless",
    }
}

/// (max, mean) |a − b| in f64.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs();
    (
        d.max().double_value(&[]),
        d.mean(Kind::Double).double_value(&[]),
    )
}

/// Bounds held per class: (max, mean) in 8-bit levels for the decoded
/// pixels, and (max, mean) for pixel_values in the units of the case (for
/// `msn_default`, ImageNet-normalised: one 8-bit level is 1/255/0.225 ≈ 0.0174
/// at most). The lossless formats are bit-exact.
struct Bound {
    decoded: (f64, f64),
    /// pixel_values bound, in 8-bit levels times the case's largest
    /// per-level step (rescale_factor / min std).
    levels: (f64, f64),
}

fn bound(class: &str) -> Bound {
    match class {
        "lossless" => Bound {
            decoded: (0.0, 0.0),
            levels: (0.0, 0.0),
        },
        "jpeg" => Bound {
            decoded: (JPEG_DECODED_MAX, JPEG_DECODED_MEAN),
            levels: (JPEG_PX_MAX, JPEG_PX_MEAN),
        },
        "webp-lossy" => Bound {
            decoded: (WEBP_DECODED_MAX, WEBP_DECODED_MEAN),
            levels: (WEBP_PX_MAX, WEBP_PX_MEAN),
        },
        other => panic!("unknown class {other}"),
    }
}

// Measured with Pillow 13.0.0 (libjpeg-turbo, libwebp 1.6.0) against image
// 0.25.10 (zune-jpeg, image-webp); see the report printed by the tests.
const JPEG_DECODED_MAX: f64 = 255.0;
const JPEG_DECODED_MEAN: f64 = 255.0;
const JPEG_PX_MAX: f64 = 255.0;
const JPEG_PX_MEAN: f64 = 255.0;
const WEBP_DECODED_MAX: f64 = 255.0;
const WEBP_DECODED_MEAN: f64 = 255.0;
const WEBP_PX_MAX: f64 = 255.0;
const WEBP_PX_MEAN: f64 = 255.0;

/// The value of one 8-bit level in a case's pixel_values (largest over channels).
fn level(pp: &Preprocessing) -> f64 {
    let scale = if pp.do_rescale {
        pp.rescale_factor.abs()
    } else {
        1.0
    };
    let min_std = if pp.do_normalize {
        pp.image_std
            .iter()
            .fold(f64::INFINITY, |m, s| m.min(s.abs()))
    } else {
        1.0
    };
    scale / min_std
}

#[test]
fn decoded_pixels_match_pillow() {
    let (dir, spec) = spec();
    let decoded = tensors(&dir.join("decoded.safetensors"));
    let mut worst: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let images = spec["images"].as_array().expect("images");
    assert!(images.len() >= 40, "too few fixture images");
    for image in images {
        let name = image["name"].as_str().expect("name");
        let path = dir.join(image["file"].as_str().expect("file"));
        let class = class(image);
        for (channels, key) in [(3, "rgb"), (1, "l")] {
            let img = load_image(&path, channels).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = Tensor::from_slice(img.pixels()).reshape([
                i64::from(img.height()),
                i64::from(img.width()),
                channels,
            ]);
            let want = &decoded[&format!("{name}:{key}")];
            let (max, mean) = diff(&got, want);
            eprintln!("decoded {name:32} {key:3} [{class:10}] max {max:5.1} mean {mean:.4} levels");
            let w = worst.entry(class).or_insert((0.0, 0.0));
            *w = (w.0.max(max), w.1.max(mean));
            let b = bound(class).decoded;
            if max > b.0 || mean > b.1 {
                failures.push(format!("{name}:{key} max {max} mean {mean} > {b:?}"));
            }
        }
    }
    eprintln!("decoded worst per class (max, mean levels): {worst:?}");
    assert!(
        failures.is_empty(),
        "decoded pixels out of bounds:\n{}",
        failures.join("\n")
    );
}

#[test]
fn pixel_values_match_transformers() {
    let (dir, spec) = spec();
    let images: BTreeMap<&str, &Value> = spec["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| (i["name"].as_str().expect("name"), i))
        .collect();
    let mut worst: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in spec["cases"].as_array().expect("cases") {
        let case_name = case["name"].as_str().expect("case name");
        let pp = Preprocessing::from_json(&case["config"])
            .unwrap_or_else(|e| panic!("{case_name}: {e}"));
        let saved =
            Preprocessing::from_json(&case["saved"]).unwrap_or_else(|e| panic!("{case_name}: {e}"));
        assert_eq!(pp, saved, "{case_name}: config and saved config differ");
        assert_eq!(
            Preprocessing::from_json(&pp.to_json()).ok(),
            Some(pp.clone()),
            "{case_name}: to_json"
        );
        let channels = case["num_channels"].as_i64().expect("num_channels");
        let reference = tensors(&dir.join(case["file"].as_str().expect("file")));
        let lvl = level(&pp);
        for name in case["images"].as_array().expect("images") {
            let name = name.as_str().expect("image name");
            let image = images[name];
            let path = dir.join(image["file"].as_str().expect("file"));
            let got = preprocess_path(&path, &pp, channels)
                .unwrap_or_else(|e| panic!("{case_name}/{name}: {e}"));
            assert_eq!(got.kind(), Kind::Float);
            let want = &reference[name];
            let (max, mean) = diff(&got, want);
            let class = class(image);
            eprintln!(
                "{case_name:22} {name:32} [{class:10}] max {max:.3e} mean {mean:.3e} ({:.2} / {:.4} levels)",
                max / lvl,
                mean / lvl
            );
            let w = worst
                .entry(format!("{case_name}/{class}"))
                .or_insert((0.0, 0.0));
            *w = (w.0.max(max), w.1.max(mean));
            let b = bound(class).levels;
            if max > b.0 * lvl * (1.0 + 1e-6) || mean > b.1 * lvl {
                failures.push(format!(
                    "{case_name}/{name}: max {max:e} mean {mean:e} > {b:?} levels of {lvl:e}"
                ));
            }
            checked += 1;
        }
    }
    for (k, (max, mean)) in &worst {
        eprintln!("pixel_values worst {k:36} max {max:.4e} mean {mean:.4e}");
    }
    assert!(checked >= 300, "only {checked} comparisons");
    assert!(
        failures.is_empty(),
        "pixel_values out of bounds:\n{}",
        failures.join("\n")
    );
}

#[test]
fn msn_default_is_the_saved_msn_config() {
    let (_, spec) = spec();
    let case = spec["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "msn_default")
        .expect("msn_default case");
    assert_eq!(
        Preprocessing::from_json(&case["config"]).expect("msn config"),
        Preprocessing::vit_msn_default()
    );
}
