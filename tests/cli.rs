//! Every command of the binary, run on real files: photos through the image
//! pipeline and the model, compared with transformers where there is a number.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, case_dir, read, root, scratch, vit_msn};
use tch::{Kind, Tensor};

fn photos() -> PathBuf {
    root().join("src/cli/demo_photos")
}

fn compile(case: &str, name: &str, extra: &[&str]) -> PathBuf {
    common::compile_case(case, &format!("cli-bundle-{name}"), extra)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit code 1, `error: ...` naming `needle`.
fn fails(out: &std::process::Output, needle: &str) {
    fails_with(out, 1, needle);
}

/// A usage error: exit code 2, `error: ...` naming `needle`.
fn usage_fails(out: &std::process::Output, needle: &str) {
    fails_with(out, 2, needle);
}

fn fails_with(out: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "expected `{needle}` in: {err}"
    );
}

/// Runs the binary with a deadline, so a regression that blocks or loops
/// fails instead of hanging the suite.
fn run_within(seconds: u64, args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut child = std::process::Command::new(common::bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > seconds {
            let _ = child.kill();
            panic!(
                "vit-msn {:?} did not finish within {seconds} s",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Reference tensors of an end-to-end case, and the photo names in order.
fn reference(case: &str) -> (Tensor, Tensor, Vec<String>) {
    let dir = case_dir(case);
    let t = read(&dir.join("photos.ref.safetensors"));
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("photos.json")).unwrap()).unwrap();
    (get("pixel_values"), get("expected"), names)
}

/// Bound on |got − ref| / max(1, max|ref|) of model outputs computed from our
/// pixel_values instead of the reference processor's. PNG and JPEG (decoded
/// with libjpeg-turbo's code at Pillow's settings) give the same pixels and
/// pixel_values as PIL + transformers, so outputs agree to f32 precision.
const E2E_TOL: f64 = 1e-4;

#[test]
fn image_to_logits_matches_transformers() {
    let bundle = compile("e2e_classifier", "e2e-classifier", &[]);
    let (_, expected, names) = reference("e2e_classifier");
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--image",
        &photos(),
        &"--json",
        &"--top-k",
        &"2",
    ]);
    assert_ok(&out, "run --image");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), names.len());
    for (i, (r, name)) in results.iter().zip(&names).enumerate() {
        assert!(
            r["image"].as_str().unwrap().ends_with(name.as_str()),
            "order: {r} vs {name}"
        );
        assert_eq!(r["top_k"].as_array().unwrap().len(), 2);
        let logits: Vec<f32> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let (diff, bound, ok) = common::within(
            &Tensor::from_slice(&logits),
            &expected.get(i as i64),
            E2E_TOL,
        );
        eprintln!("{name}: logits max |diff| {diff:e}");
        assert!(ok, "{name}: logits differ by {diff} > {bound}");
        let exact = name.ends_with(".png");
        if exact {
            assert!(
                diff <= 1e-4 * bound / E2E_TOL,
                "{name}: PNG should match to f32 precision, diff {diff}"
            );
        }
    }
}

#[test]
fn image_to_embedding_matches_transformers_and_saves_npy() {
    let bundle = compile("e2e_backbone", "e2e-backbone", &[]);
    let (_, expected, names) = reference("e2e_backbone");
    let dir = scratch("cli-embeddings");
    let st = dir.join("emb.safetensors");
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--image",
        &photos(),
        &"--embeddings",
        &st,
        &"--batch-size",
        &"2",
    ]);
    assert_ok(&out, "run --embeddings");
    let text = stdout(&out);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("CLS embedding dim 48"))
            .count(),
        names.len(),
        "{text}"
    );
    let got = read(&st).remove(0).1;
    assert_eq!(got.size(), [names.len() as i64, 48]);
    for (i, name) in names.iter().enumerate() {
        let (diff, bound, ok) =
            common::within(&got.get(i as i64), &expected.get(i as i64), E2E_TOL);
        eprintln!("{name}: CLS max |diff| {diff:e}");
        assert!(ok, "{name}: CLS differs by {diff} > {bound}");
    }
    // The same embeddings as .npy, in the same batches (oneMKL's f32 GEMM,
    // the default on some CPUs, may round a row differently in another
    // batch size).
    let npy = dir.join("emb.npy");
    assert_ok(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--image",
            &photos(),
            &"--embeddings",
            &npy,
            &"--batch-size",
            &"2",
        ]),
        "npy",
    );
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'shape': (5, 48)") && header.contains("'<f4'"),
        "{header}"
    );
    let values: Vec<f32> = bytes[10 + header_len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(Tensor::from_slice(&values).view([5, 48]), got);
}

#[test]
fn preprocess_writes_the_runtime_pixel_values() {
    let bundle = compile("e2e_backbone", "preprocess", &[]);
    let (reference_px, _, names) = reference("e2e_backbone");
    let out_file = scratch("cli-preprocess").join("px.safetensors");
    let out = vit_msn(&[
        &"preprocess",
        &"--image",
        &photos(),
        &"--bundle",
        &bundle,
        &"--output",
        &out_file,
    ]);
    assert_ok(&out, "preprocess");
    let px = read(&out_file).remove(0).1;
    assert_eq!(px.size(), reference_px.size());
    for (i, name) in names.iter().enumerate() {
        let d = (px.get(i as i64) - reference_px.get(i as i64)).abs();
        let (max, mean) = (
            d.max().double_value(&[]),
            d.mean(Kind::Float).double_value(&[]),
        );
        eprintln!("{name}: pixel_values max {max:e} mean {mean:e}");
        // One 8-bit level is 1/255/std ≈ 0.0175 after normalisation.
        assert!(
            max <= 0.0176 * 4.0 && mean <= 0.005,
            "{name}: max {max} mean {mean}"
        );
        if name.ends_with(".png") {
            assert!(max <= 1e-5, "{name}: PNG should be exact, max {max}");
        }
    }
    // --model takes the folder's preprocessor_config.json: the same result.
    let again = scratch("cli-preprocess-model").join("px.safetensors");
    let model = case_dir("e2e_backbone").join("model");
    assert_ok(
        &vit_msn(&[
            &"preprocess",
            &"--image",
            &photos(),
            &"--model",
            &model,
            &"--output",
            &again,
        ]),
        "--model",
    );
    assert_eq!(read(&again).remove(0).1, px);
}

#[test]
fn inspect_bundle_and_pt() {
    let bundle = compile(
        "base",
        "inspect",
        &["--resolutions", "32,48x40", "--outputs", "attentions"],
    );
    let out = vit_msn(&[&"inspect", &bundle]);
    assert_ok(&out, "inspect");
    let text = stdout(&out);
    for needle in [
        "task:     backbone",
        "48x40: model_48x40.pt",
        "verified",
        "in  bool_masked_pos",
        "out attentions",
        "dtype:    f32",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let out = vit_msn(&[&"inspect", &bundle, &"--json"]);
    assert_ok(&out, "inspect --json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["artifacts"].as_array().unwrap().len(), 2);
    assert_eq!(v["digests_ok"][0]["ok"], true);
    // A tampered artifact is listed as such, and inspect fails.
    let tampered = compile("base", "inspect-tampered", &["--resolutions", "32,48x40"]);
    let mut bytes = std::fs::read(tampered.join("model_48x40.pt")).unwrap();
    bytes.push(0);
    std::fs::write(tampered.join("model_48x40.pt"), bytes).unwrap();
    let out = vit_msn(&[&"inspect", &tampered]);
    assert!(stdout(&out).contains("MISMATCH"), "{}", stdout(&out));
    fails(&out, "sha256 of model_48x40.pt does not match the manifest");
    let out = vit_msn(&[&"inspect", &tampered, &"--json"]);
    assert!(stdout(&out).contains("\"ok\": false"), "{}", stdout(&out));
    fails(&out, "model_48x40.pt");
    let out = vit_msn(&[&"inspect", &bundle.join("model_32x32.pt")]);
    assert_ok(&out, "inspect .pt");
    let text = stdout(&out);
    assert!(
        text.contains("forward(__torch__.VitMsn self, Tensor pixel_values, Tensor bool_masked_pos, Tensor head_mask) -> Dict(str, Tensor)"),
        "{text}"
    );
    assert!(text.contains("\"attentions\""), "{text}");
    let garbage = scratch("cli-inspect-garbage").join("x.pt");
    std::fs::write(&garbage, b"not torchscript").unwrap();
    fails(&vit_msn(&[&"inspect", &garbage]), "x.pt");
}

#[test]
fn attention_maps_at_the_image_size() {
    let bundle = compile("e2e_backbone", "attention", &["--outputs", "attentions"]);
    let dir = scratch("cli-attention");
    for (layer, head) in [
        ("last", "mean"),
        ("0", "1"),
        ("rollout", "mean"),
        ("rollout", "3"),
    ] {
        let png = dir.join(format!("{layer}-{head}.png"));
        let out = vit_msn(&[
            &"attention",
            &"--bundle",
            &bundle,
            &"--image",
            &photos().join("chelsea.jpg"),
            &"--out",
            &png,
            &"--layer",
            &layer,
            &"--head",
            &head,
        ]);
        assert_ok(&out, "attention");
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (451, 300));
    }
    for (flag, value, needle) in [
        ("--head", "9", "--head 9 is not in 0..4"),
        ("--layer", "99", "--layer 99 is not in 0.."),
    ] {
        usage_fails(
            &vit_msn(&[
                &"attention",
                &"--bundle",
                &bundle,
                &"--image",
                &photos().join("chelsea.jpg"),
                &"--out",
                &dir.join("x.png"),
                &flag,
                &value,
            ]),
            needle,
        );
    }
    let plain = compile("e2e_backbone", "attention-plain", &[]);
    fails(
        &vit_msn(&[
            &"attention",
            &"--bundle",
            &plain,
            &"--image",
            &photos().join("chelsea.jpg"),
            &"--out",
            &dir.join("y.png"),
        ]),
        "compile with --outputs attentions",
    );
}

/// --mask-ratio/--seed and --head-mask give what the library computes with
/// the same mask and head mask, and change the result.
#[test]
fn masks_from_the_command_line() {
    let bundle = compile("e2e_backbone", "masks", &[]);
    let dir = scratch("cli-masks");
    let run = |extra: &[&dyn AsRef<std::ffi::OsStr>], name: &str| -> Tensor {
        let file = dir.join(format!("{name}.safetensors"));
        let photo_dir = photos();
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"run",
            &"--bundle",
            &bundle,
            &"--image",
            &photo_dir,
            &"--embeddings",
            &file,
        ];
        args.extend_from_slice(extra);
        assert_ok(&vit_msn(&args), name);
        read(&file).remove(0).1
    };
    let plain = run(&[], "plain");
    let masked = run(
        &[
            &"--mask-ratio",
            &"0.5",
            &"--seed",
            &"7",
            &"--head-mask",
            &"0:1,3;1:*",
        ],
        "masked",
    );
    assert!((&plain - &masked).abs().max().double_value(&[]) > 1e-3);

    let b = vit_msn::Bundle::load(&bundle, tch::Device::Cpu).unwrap();
    let pp = b.manifest().preprocessing().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(photos())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| vit_msn::image::is_image_path(p))
        .collect();
    files.sort();
    let px = Tensor::stack(
        &files
            .iter()
            .map(|p| vit_msn::image::preprocess_path(p, &pp, 3).unwrap())
            .collect::<Vec<_>>(),
        0,
    );
    let mask = vit_msn::inputs::random_mask(5, 16, 0.5, 7).unwrap();
    assert_eq!(
        mask.sum(Kind::Int64).int64_value(&[]),
        5 * 8,
        "exactly half of each image's patches"
    );
    let hm = vit_msn::inputs::parse_head_mask("0:1,3;1:*", 2, 4).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(hm.flatten(0, -1)).unwrap(),
        [1., 0., 1., 0., 0., 0., 0., 0.]
    );
    let lib = b
        .forward(&px, Some(&mask), Some(&hm))
        .unwrap()
        .last_hidden_state
        .unwrap()
        .select(1, 0);
    assert!((&lib - &masked).abs().max().double_value(&[]) <= 1e-5);

    // The same mask from a file.
    let mask_file = dir.join("mask.safetensors");
    vit_msn::tensors::write_safetensors(&mask_file, &[("bool_masked_pos", &mask)]).unwrap();
    let hm_file = dir.join("hm.safetensors");
    vit_msn::tensors::write_safetensors(&hm_file, &[("head_mask", &hm)]).unwrap();
    let from_files = run(
        &[&"--mask-file", &mask_file, &"--head-mask-file", &hm_file],
        "files",
    );
    assert_eq!(from_files, masked);

    usage_fails(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--image",
            &photos(),
            &"--head-mask",
            &"9:1",
        ]),
        "`9` is not a layer index",
    );
    usage_fails(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--image",
            &photos(),
            &"--mask-ratio",
            &"1.5",
        ]),
        "--mask-ratio 1.5 is not in [0, 1]",
    );
}

#[test]
fn image_errors_name_the_file() {
    let bundle = compile("e2e_classifier", "image-errors", &[]);
    let dir = scratch("cli-image-errors");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "no images here").unwrap();
    fails(
        &vit_msn(&[&"run", &"--bundle", &bundle, &"--image", &empty]),
        "holds no images",
    );
    let fake = dir.join("fake.jpg");
    std::fs::write(&fake, b"this is not a jpeg").unwrap();
    fails(
        &vit_msn(&[&"run", &"--bundle", &bundle, &"--image", &fake]),
        "fake.jpg",
    );
    fails(
        &vit_msn(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--image",
            &dir.join("missing.png"),
        ]),
        "missing.png",
    );
    usage_fails(&vit_msn(&[&"run", &"--bundle", &bundle]), "give --image");
    assert_eq!(vit_msn(&[&"run", &"--bogus"]).status.code(), Some(2));
}

#[test]
fn help_has_examples() {
    for cmd in [
        "compile",
        "run",
        "preprocess",
        "inspect",
        "attention",
        "demo",
        "init",
    ] {
        let out = vit_msn(&[&cmd, &"--help"]);
        assert_ok(&out, cmd);
        assert!(
            stdout(&out).contains("Examples:"),
            "{cmd} --help has no examples"
        );
    }
}

#[test]
fn demo_runs_out_of_the_box() {
    let out_dir = scratch("cli-demo").join("demo");
    let out = vit_msn(&[&"demo", &"--out", &out_dir]);
    assert_ok(&out, "demo");
    let text = stdout(&out);
    for needle in [
        "UNTRAINED",
        "CLS embedding size: 384",
        "224x224:",
        "160x160:",
        "chelsea.jpg",
        "attention map",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    assert!(Path::new(&format!("{}-attention.png", out_dir.display())).is_file());

    // The demo's checkpoint is a real Hugging Face folder: transformers loads
    // it, and its logits on the demo photos are ours.
    let model = format!("{}-model", out_dir.display());
    let photo_dir = format!("{}-photos", out_dir.display());
    let script = r#"
import json, os, sys, torch
from PIL import Image
from transformers import ViTImageProcessor, ViTMSNForImageClassification
model_dir, photo_dir = sys.argv[1], sys.argv[2]
m = ViTMSNForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
p = ViTImageProcessor.from_pretrained(model_dir)
names = sorted(os.listdir(photo_dir))
with torch.no_grad():
    logits = m(**p([Image.open(os.path.join(photo_dir, n)).convert("RGB") for n in names], return_tensors="pt")).logits
print(json.dumps({"names": names, "logits": logits.tolist()}))
"#;
    let py = std::process::Command::new(root().join(".venv/bin/python"))
        .args(["-c", script, &model, &photo_dir])
        .output()
        .unwrap();
    assert_ok(&py, "transformers on the demo model");
    let reference: serde_json::Value = serde_json::from_str(&stdout(&py)).unwrap();
    let ours = vit_msn(&[
        &"run",
        &"--bundle",
        &out_dir,
        &"--image",
        &photo_dir,
        &"--json",
    ]);
    assert_ok(&ours, "run on the demo photos");
    let ours: serde_json::Value = serde_json::from_str(&stdout(&ours)).unwrap();
    for (i, r) in ours["results"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f32> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want: Vec<f32> = reference["logits"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let (diff, bound, ok) =
            common::within(&Tensor::from_slice(&got), &Tensor::from_slice(&want), 1e-4);
        assert!(ok, "demo photo {i}: logits differ by {diff} > {bound}");
    }
    // A warm repeat reuses the bundle.
    let again = vit_msn(&[&"demo", &"--out", &out_dir]);
    assert_ok(&again, "demo again");
    assert!(stdout(&again).contains("using the bundle"));
}

/// `init` writes a Hugging Face folder for any config: transformers loads it,
/// and the compiled bundle gives transformers' logits.
#[test]
fn init_writes_a_checkpoint_for_a_config() {
    let dir = scratch("cli-init");
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "vit_msn", "architectures": ["ViTMSNForImageClassification"],
            "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 96, "hidden_act": "gelu_new", "image_size": 40,
            "patch_size": 8, "qkv_bias": false, "num_labels": 4}"#,
    )
    .unwrap();
    let model = dir.join("model");
    assert_ok(
        &vit_msn(&[
            &"init",
            &"--config",
            &config,
            &"--out",
            &model,
            &"--seed",
            &"3",
        ]),
        "init",
    );
    let bundle = dir.join("bundle");
    assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &bundle]),
        "compile",
    );
    let photo = photos().join("chelsea.jpg");
    let ours = vit_msn(&[&"run", &"--bundle", &bundle, &"--image", &photo, &"--json"]);
    assert_ok(&ours, "run");
    let ours: serde_json::Value = serde_json::from_str(&stdout(&ours)).unwrap();
    let script = r#"
import json, sys, torch
from PIL import Image
from transformers import ViTImageProcessor, ViTMSNForImageClassification
m = ViTMSNForImageClassification.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
p = ViTImageProcessor(size={"height": 40, "width": 40}, resample=2, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
with torch.no_grad():
    print(json.dumps(m(**p(Image.open(sys.argv[2]).convert("RGB"), return_tensors="pt")).logits[0].tolist()))
"#;
    let py = std::process::Command::new(root().join(".venv/bin/python"))
        .args([
            std::ffi::OsStr::new("-c"),
            script.as_ref(),
            model.as_os_str(),
            photo.as_os_str(),
        ])
        .output()
        .unwrap();
    assert_ok(&py, "transformers on the init model");
    let want: Vec<f64> = serde_json::from_str(&stdout(&py)).unwrap();
    let got: Vec<f64> = ours["results"][0]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), 4);
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * scale, "{got:?} vs {want:?}");
    }
    // No staging folder is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".model") || n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    fails(
        &vit_msn(&[
            &"init",
            &"--config",
            &model.join("model.safetensors"),
            &"--out",
            &dir.join("x"),
        ]),
        "not JSON",
    );
}

/// A FIFO where a file is expected (config, weights, manifest, image,
/// tensors, labels) is refused by name, never opened: opening it would block.
#[test]
fn fifos_are_refused_not_read() {
    let dir = scratch("cli-fifo");
    let mkfifo = |p: &Path| {
        let _ = std::fs::remove_file(p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let run = |args: &[&dyn AsRef<std::ffi::OsStr>]| run_within(60, args);

    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(case_dir("base").join("model").join(f), model.join(f)).unwrap();
    }
    mkfifo(&model.join("model.safetensors"));
    fails(
        &run(&[&"compile", &"--model", &model, &"--out", &dir.join("b1")]),
        "no weights file",
    );
    mkfifo(&model.join("config.json"));
    fails(
        &run(&[&"compile", &"--model", &model, &"--out", &dir.join("b2")]),
        "config.json: not a regular file",
    );

    let bundle = compile("base", "fifo", &[]);
    let fifo = dir.join("fifo.jpg");
    mkfifo(&fifo);
    fails(
        &run(&[&"run", &"--bundle", &bundle, &"--image", &fifo]),
        "not a regular file",
    );
    fails(
        &run(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--inputs",
            &fifo,
            &"--output",
            &dir.join("o.safetensors"),
        ]),
        "fifo.jpg: not a regular file",
    );
    fails(
        &run(&[
            &"bench",
            &"--bundle",
            &bundle,
            &"--baseline",
            &fifo,
            &"--iters",
            &"1",
        ]),
        "fifo.jpg: not a regular file",
    );
    let broken = dir.join("bundle");
    std::fs::create_dir_all(&broken).unwrap();
    mkfifo(&broken.join("manifest.json"));
    fails(
        &run(&[
            &"run",
            &"--bundle",
            &broken,
            &"--image",
            &photos().join("chelsea.jpg"),
        ]),
        "manifest.json: not a regular file",
    );
}

/// A folder of images with symlinks back to itself and to its parent: each
/// image is read once, and the walk ends.
#[test]
fn symlink_loops_in_image_folders_end() {
    let dir = scratch("cli-symlink-loop");
    let photos_dir = dir.join("photos");
    std::fs::create_dir_all(photos_dir.join("sub")).unwrap();
    std::fs::copy(photos().join("coffee.jpg"), photos_dir.join("coffee.jpg")).unwrap();
    std::os::unix::fs::symlink(".", photos_dir.join("self")).unwrap();
    std::os::unix::fs::symlink("..", photos_dir.join("sub").join("up")).unwrap();
    std::os::unix::fs::symlink("..", photos_dir.join("up")).unwrap();
    let bundle = compile("base", "cli-symlink-loop-bundle", &[]);
    let out = run_within(60, &[&"run", &"--bundle", &bundle, &"--image", &photos_dir]);
    assert_ok(&out, "run on a folder with symlink loops");
    let text = stdout(&out);
    assert_eq!(text.matches("coffee.jpg").count(), 1, "{text}");
}

/// `run --artifact` on TorchScript files whose output is empty, of another
/// batch, or whose graph raises: one-line errors with the cause, never a
/// panic.
#[test]
fn bare_artifacts_with_empty_outputs_or_raising_graphs_fail_clearly() {
    let dir = scratch("cli-bare-hostile");
    let script = r#"
import sys, torch
class ZeroLogits(torch.nn.Module):
    def forward(self, x: torch.Tensor): return torch.zeros(x.shape[0], 0)
class ZeroTokens(torch.nn.Module):
    def forward(self, x: torch.Tensor): return torch.zeros(x.shape[0], 0, 8)
class OtherBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor): return torch.zeros(x.shape[0] + 1, 3)
class ThreeClasses(torch.nn.Module):
    def forward(self, x: torch.Tensor): return torch.zeros(x.shape[0], 3)
class Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        raise RuntimeError("the real reason")
        return x
class RaisesValue(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        raise ValueError("a value reason")
        return x
for cls in [ZeroLogits, ZeroTokens, OtherBatch, ThreeClasses, Raises, RaisesValue]:
    torch.jit.script(cls()).save(f"{sys.argv[1]}/{cls.__name__}.pt")
"#;
    // From a file: torch.jit.script reads the classes' source.
    let script_file = dir.join("make_modules.py");
    std::fs::write(&script_file, script).unwrap();
    let py = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(&script_file)
        .arg(&dir)
        .output()
        .unwrap();
    assert_ok(&py, "scripting the test modules");
    let labels = dir.join("labels.json");
    std::fs::write(&labels, r#"["a", "b", "c", "d", "e"]"#).unwrap();
    let image = photos().join("chelsea.jpg");
    for (file, extra, needle) in [
        (
            "ZeroLogits",
            None,
            "output `logits` has no classes (shape [1, 0])",
        ),
        (
            "ZeroTokens",
            None,
            "output `last_hidden_state` has no tokens (shape [1, 0, 8])",
        ),
        (
            "OtherBatch",
            None,
            "output `logits` has shape [2, 3] for a batch of 1",
        ),
        (
            "ThreeClasses",
            Some(&labels),
            "5 label names were given, but the model returns 3 logits",
        ),
        ("Raises", None, "in the TorchScript graph: the real reason"),
        (
            "RaisesValue",
            None,
            "in the TorchScript graph: ValueError: a value reason",
        ),
    ] {
        let pt = dir.join(format!("{file}.pt"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"run",
            &"--artifact",
            &pt,
            &"--resolution",
            &"32",
            &"--image",
            &image,
        ];
        if let Some(labels) = &extra {
            args.extend([&"--labels" as &dyn AsRef<std::ffi::OsStr>, labels]);
        }
        let out = run_within(120, &args);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{file}"
        );
        fails(&out, needle);
    }
}

/// Pillow's rule for image sizes, from the header and before decoding, in
/// every format: more than 2 × 89,478,485 pixels is refused whatever the
/// shape, and a long thin strip Pillow decodes is decoded.
#[test]
fn image_size_limit_is_pillows_pixel_count() {
    let dir = scratch("cli-image-pixel-limit");
    let out_file = dir.join("px.safetensors");
    let preprocess = |image: &Path| {
        run_within(
            60,
            &[&"preprocess", &"--image", &image, &"--output", &out_file],
        )
    };
    let wide = dir.join("wide_17000x8.png");
    image::RgbImage::from_pixel(17000, 8, image::Rgb([200, 100, 50]))
        .save(&wide)
        .unwrap();
    assert_ok(&preprocess(&wide), "preprocess a 17000x8 PNG");
    assert_eq!(read(&out_file)[0].1.size(), [1, 3, 224, 224]);

    // A JPEG of a few hundred bytes claiming 16000x16000 (its SOF0 patched).
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([10, 20, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0x3E, 0x80, 0x3E, 0x80]);
    // GIF and BMP headers claiming 14000x14000 (each side within 16384).
    let gif = b"GIF89a\xb0\x36\xb0\x36\x80\x00\x00\x00\x00\x00\xff\xff\xff\
        \x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";
    let mut bmp = b"BM".to_vec();
    for v in [58u32, 0, 54, 40, 14000, 14000] {
        bmp.extend_from_slice(&v.to_le_bytes());
    }
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    bmp.extend_from_slice(&[0; 28]);
    for (name, bytes, pixels) in [
        ("bomb_16000.jpg", &jpeg[..], "256000000"),
        ("bomb_14000.gif", &gif[..], "196000000"),
        ("bomb_14000.bmp", &bmp[..], "196000000"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = preprocess(&path);
        fails(
            &out,
            &format!("{pixels} pixels exceeds the limit of 178956970 pixels"),
        );
    }
}

/// Without --resolution, images take the preprocessing's size; a bundle not
/// compiled at it runs at its only resolution, or names the ones it has.
#[test]
fn images_take_the_only_compiled_resolution() {
    let photo = photos().join("coffee.jpg");
    let only = compile("base", "cli-only-resolution", &["--resolutions", "48x40"]);
    let out = vit_msn(&[&"run", &"--bundle", &only, &"--image", &photo]);
    assert_ok(&out, "run on a bundle compiled at 48x40 only");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the only compiled resolution"), "{err}");

    let two = compile(
        "base",
        "cli-two-resolutions",
        &["--resolutions", "40,48x40"],
    );
    usage_fails(
        &vit_msn(&[&"run", &"--bundle", &two, &"--image", &photo]),
        "which this bundle was not compiled for; give --resolution, one of 40x40, 48x40",
    );
}

/// Probabilities as the head means them: softmax for single-label heads, a
/// sigmoid of each logit for multi-label heads and single-logit heads.
#[test]
fn probabilities_follow_the_problem_type() {
    let photo = photos().join("coffee.jpg");
    for (case, sigmoid) in [
        ("classifier_multilabel", true),
        ("classifier_regression", true),
        ("classifier_sharded", false),
    ] {
        let bundle = compile(
            case,
            &format!("cli-probabilities-{case}"),
            &["--resolutions", "32"],
        );
        let out = vit_msn(&[&"run", &"--bundle", &bundle, &"--image", &photo, &"--json"]);
        assert_ok(&out, case);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let r = &v["results"][0];
        let logits: Vec<f64> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let total: f64 = logits.iter().map(|l| l.exp()).sum();
        for t in r["top_k"].as_array().unwrap() {
            let l = logits[t["index"].as_u64().unwrap() as usize];
            let want = if sigmoid {
                1.0 / (1.0 + (-l).exp())
            } else {
                l.exp() / total
            };
            let got = t["probability"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-5, "{case}: {got} vs {want}");
        }
    }
}

/// A bare artifact takes its sizes from `--model`'s config.json, where
/// transformers allows `[height, width]` lists: the same masked embeddings as
/// the bundle compiled from that folder.
#[test]
fn bare_artifact_with_list_sizes_in_the_config() {
    let model = case_dir("list_patch").join("model");
    let bundle = compile("list_patch", "list-sizes", &[]);
    let dir = scratch("cli-list-sizes");
    let embeddings = |target: &[&dyn AsRef<std::ffi::OsStr>], name: &str| {
        let file = dir.join(format!("{name}.safetensors"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"run"];
        args.extend_from_slice(target);
        let photos = photos();
        args.extend_from_slice(&[
            &"--image",
            &photos,
            &"--mask-ratio",
            &"0.5",
            &"--seed",
            &"3",
            &"--head-mask",
            &"1:0",
            &"--embeddings",
            &file,
        ]);
        assert_ok(&vit_msn(&args), name);
        read(&file).remove(0).1
    };
    let pt = bundle.join("model_32x32.pt");
    let bare = embeddings(&[&"--artifact", &pt, &"--model", &model], "bare");
    let ours = embeddings(&[&"--bundle", &bundle], "bundle");
    assert_eq!(bare.size(), [5, 32]);
    let diff = (&bare - &ours).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "CLS embeddings differ by {diff}");
}
