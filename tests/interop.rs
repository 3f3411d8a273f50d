//! Artifacts as an interface: a fine-tuned model exported from Python, swapped
//! into a bundle, run as a bare TorchScript file, and Rust-compiled artifacts
//! loaded by Python and by an application that links only the runtime.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_ok, case_dir, check_outputs, compile_case, read, root, run_bundle, scratch, vit_msn,
    MKL_AS_SHIPPED,
};

fn python(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut cmd = std::process::Command::new(root().join(".venv/bin/python"));
    cmd.arg("-c").arg(script);
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run python")
}

fn export(name: &str, extra: &[&str]) -> PathBuf {
    export_case("finetuned", name, extra)
}

/// graph/python/export.py on a fixture case's model.
fn export_case(case: &str, name: &str, extra: &[&str]) -> PathBuf {
    let out = scratch(&format!("interop-export-{name}")).join("bundle");
    let model = case_dir(case).join("model");
    let mut cmd = std::process::Command::new(root().join(".venv/bin/python"));
    cmd.env("VIT_MSN_BIN", common::bin())
        .arg(root().join("graph/python/export.py"))
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .args(extra);
    let result = cmd.output().expect("export.py");
    assert_ok(&result, "graph/python/export.py");
    out
}

/// Runs every run of the `finetuned` case through `vit-msn run --bundle` and
/// checks it against transformers.
fn check_bundle_against_reference(bundle: &Path, label: &str) {
    common::check_runs(
        "finetuned",
        bundle,
        &scratch(&format!("interop-check-{label}")),
        &[],
    );
}

#[test]
fn python_exporter_bundle_runs_in_rust_with_parity() {
    let bundle = export("f32", &["--resolutions", "64,80x96"]);
    check_bundle_against_reference(&bundle, "exported");
    // The same layout and signature as the Rust compiler's.
    let ours = compile_case("finetuned", "interop-rust", &["--resolutions", "64,80x96"]);
    let a = vit_msn::Manifest::read(&bundle).unwrap();
    let b = vit_msn::Manifest::read(&ours).unwrap();
    for (x, y) in a.artifacts.iter().zip(&b.artifacts) {
        assert_eq!((x.height, x.width, &x.file), (y.height, y.width, &y.file));
        assert_eq!(x.inputs, y.inputs);
        assert_eq!(x.outputs, y.outputs);
    }
    assert_eq!(a.model.labels, b.model.labels);
    check_bundle_against_reference(&ours, "compiled");
}

/// Configs at the edges of what transformers takes: `[height, width]` size
/// lists and no layers, exported at the trained and an interpolated
/// resolution.
#[test]
fn python_exporter_takes_list_sizes_and_no_layers() {
    for (case, resolutions) in [
        ("list_sizes", "32,40x48"),
        ("list_patch", "32,40x48"),
        ("no_layers", "32,40x48"),
    ] {
        let bundle = export_case(
            case,
            case,
            &[
                "--resolutions",
                resolutions,
                "--outputs",
                "hidden_states,attentions",
            ],
        );
        common::check_runs(case, &bundle, &scratch(&format!("interop-{case}")), &[]);
    }
}

#[test]
fn bundle_replace_checks_before_swapping() {
    let exported = export("replace", &["--resolutions", "64,80x96"]);
    let bundle = compile_case(
        "finetuned",
        "interop-replace",
        &["--resolutions", "64,80x96"],
    );
    let manifest_before = std::fs::read(bundle.join("manifest.json")).unwrap();

    // Refused: a backbone's artifact (no logits), another resolution's Rust
    // artifact (its graph is fixed to 80x96), garbage, a missing resolution.
    let backbone = compile_case("e2e_backbone", "interop-replace-backbone", &[]);
    let replace = |file: &Path, res: &str| {
        vit_msn(&[
            &"bundle",
            &"replace",
            &"--bundle",
            &bundle,
            &"--resolution",
            &res,
            &"--artifact",
            &file,
        ])
    };
    let wrong = replace(&backbone.join("model_64x64.pt"), "64");
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("model_64x64.pt: cannot load TorchScript: returns no `logits`"),
        "{err}"
    );
    let other = replace(&bundle.join("model_80x96.pt"), "64");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("its forward does not accept the bundle's inputs"),
        "{err}"
    );
    let garbage = scratch("interop-garbage").join("g.pt");
    std::fs::write(&garbage, b"nope").unwrap();
    let r = vit_msn(&[
        &"bundle",
        &"replace",
        &"--bundle",
        &bundle,
        &"--resolution",
        &"64",
        &"--artifact",
        &garbage,
    ]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("does not load"));
    let r = vit_msn(&[
        &"bundle",
        &"replace",
        &"--bundle",
        &bundle,
        &"--resolution",
        &"100",
        &"--artifact",
        &exported.join("model_64x64.pt"),
    ]);
    assert!(String::from_utf8_lossy(&r.stderr)
        .contains("100x100 is not in the bundle, which has 64x64, 80x96"));
    assert_eq!(
        std::fs::read(bundle.join("manifest.json")).unwrap(),
        manifest_before,
        "a refusal changed the bundle"
    );

    // Accepted: the exporter's file for the same resolution; digests rewritten.
    for res in ["64", "80x96"] {
        let file = exported.join(format!(
            "model_{}.pt",
            if res == "64" { "64x64" } else { res }
        ));
        assert_ok(
            &vit_msn(&[
                &"bundle",
                &"replace",
                &"--bundle",
                &bundle,
                &"--resolution",
                &res,
                &"--artifact",
                &file,
            ]),
            "replace",
        );
    }
    assert_eq!(
        std::fs::read(bundle.join("model_64x64.pt")).unwrap(),
        std::fs::read(exported.join("model_64x64.pt")).unwrap()
    );
    check_bundle_against_reference(&bundle, "replaced");
}

/// `torch.jit.trace(model, pixel_values)` of a transformers classifier: run
/// as it is, with the model folder's labels and preprocessing.
#[test]
fn bare_traced_classifier_runs() {
    let model = case_dir("finetuned").join("model");
    let pt = scratch("interop-bare").join("traced.pt");
    let trace = r#"
import sys, torch
from transformers import ViTMSNForImageClassification
m = ViTMSNForImageClassification.from_pretrained(sys.argv[1], torchscript=True).eval()
torch.jit.trace(m, torch.randn(1, 3, 64, 64)).save(sys.argv[2])
"#;
    assert_ok(&python(trace, &[&model, &pt]), "trace");
    let photos = root().join("src/cli/demo_photos");
    let bare = vit_msn(&[
        &"run",
        &"--artifact",
        &pt,
        &"--model",
        &model,
        &"--image",
        &photos,
        &"--json",
    ]);
    assert_ok(&bare, "run --artifact");
    let bundle = compile_case("finetuned", "interop-bare-bundle", &[]);
    let ours = vit_msn(&[&"run", &"--bundle", &bundle, &"--image", &photos, &"--json"]);
    assert_ok(&ours, "run --bundle");
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&bare.stdout).unwrap(),
        serde_json::from_slice(&ours.stdout).unwrap(),
    );
    let results = a["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for (x, y) in results.iter().zip(b["results"].as_array().unwrap()) {
        assert_eq!(x["top_k"][0]["label"], y["top_k"][0]["label"]);
        assert!(x["top_k"][0]["label"]
            .as_str()
            .unwrap()
            .starts_with("class_"));
        for (p, q) in x["logits"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["logits"].as_array().unwrap())
        {
            assert!((p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-4);
        }
    }
    // A mask on a file that takes none is a clear error.
    let r = vit_msn(&[
        &"run",
        &"--artifact",
        &pt,
        &"--model",
        &model,
        &"--image",
        &photos,
        &"--mask-ratio",
        &"0.3",
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("takes only pixel_values"));
    let labels = scratch("interop-labels").join("labels.json");
    std::fs::write(&labels, r#"["zero", "one", "two"]"#).unwrap();
    let camera = photos.join("camera.png");
    let r = vit_msn(&[
        &"run",
        &"--artifact",
        &pt,
        &"--labels",
        &labels,
        &"--resolution",
        &"64",
        &"--image",
        &camera,
        &"--json",
    ]);
    assert_ok(&r, "--labels");
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(
        ["zero", "one", "two"].contains(&v["results"][0]["top_k"][0]["label"].as_str().unwrap())
    );
}

/// `torch.jit.trace` of a transformers backbone, run with its model folder,
/// whose config has no `id2label`: the CLS embeddings are the bundle's.
/// Without `--model` or `--resolution` the images are resized to 224, which
/// this 64-pixel trace cannot take: the error says where the size came from.
#[test]
fn bare_traced_backbone_runs() {
    let model = case_dir("e2e_backbone").join("model");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert!(config.get("id2label").is_none());
    let dir = scratch("interop-bare-backbone");
    let pt = dir.join("traced.pt");
    let trace = r#"
import sys, torch
from transformers import ViTMSNModel
m = ViTMSNModel.from_pretrained(sys.argv[1], torchscript=True).eval()
torch.jit.trace(m, torch.randn(1, 3, 64, 64)).save(sys.argv[2])
"#;
    assert_ok(&python(trace, &[&model, &pt]), "trace");
    let photos = root().join("src/cli/demo_photos");
    let embeddings = |args: &[&dyn AsRef<std::ffi::OsStr>], name: &str| {
        let file = dir.join(format!("{name}.safetensors"));
        let mut full: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"run"];
        full.extend_from_slice(args);
        full.extend_from_slice(&[&"--image", &photos, &"--embeddings", &file]);
        assert_ok(&vit_msn(&full), name);
        vit_msn::tensors::read_safetensors(&file)
            .unwrap()
            .remove(0)
            .1
    };
    let bare = embeddings(&[&"--artifact", &pt, &"--model", &model], "bare");
    let bundle = compile_case("e2e_backbone", "interop-bare-backbone-bundle", &[]);
    let ours = embeddings(&[&"--bundle", &bundle], "bundle");
    assert_eq!(bare.size(), [5, 48]);
    let diff = (&bare - &ours).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "CLS embeddings differ by {diff}");

    let r = vit_msn(&[&"run", &"--artifact", &pt, &"--image", &photos]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(
            "traced.pt, images at 224x224 (ViT-MSN's default size; give --resolution or --model"
        ) && err.contains("forward failed"),
        "{err}"
    );
    // Labels belong to bare files; with a bundle they are a usage error.
    let r = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--labels",
        &model.join("config.json"),
        &"--image",
        &photos,
    ]);
    assert_eq!(r.status.code(), Some(2));
}

/// Python loads a Rust-compiled artifact and calls it with the three inputs:
/// the same numbers as the reference and as the Rust runtime.
#[test]
fn python_loads_rust_artifacts() {
    let bundle = compile_case(
        "finetuned",
        "interop-python",
        &["--resolutions", "64,80x96", "--outputs", "attentions"],
    );
    let dir = case_dir("finetuned");
    let out = scratch("interop-python-out").join("py.safetensors");
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
m = torch.jit.load(sys.argv[1])
x = load_file(sys.argv[2])
out = m(x["pixel_values"], x["bool_masked_pos"].bool(), x["head_mask"])
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"#;
    assert_ok(
        &python(
            script,
            &[
                &bundle.join("model_80x96.pt"),
                &dir.join("masked.in.safetensors"),
                &out,
            ],
        ),
        "python torch.jit.load",
    );
    let got = read(&out);
    let mut expected = read(&dir.join("masked.ref.safetensors"));
    expected.retain(|(n, _)| n == "logits");
    check_outputs(&got, &expected, 1e-4, "python");
    // Bit for bit where oneMKL runs the same kernels in both processes.
    let rust_out = scratch("interop-python-rust").join("rust.safetensors");
    assert_ok(
        &run_bundle(
            &bundle,
            &dir.join("masked.in.safetensors"),
            &rust_out,
            MKL_AS_SHIPPED,
        ),
        "rust run",
    );
    let rust = read(&rust_out);
    for name in ["logits", "attentions"] {
        let a = &got.iter().find(|(n, _)| n == name).unwrap().1;
        let b = &rust.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(a.equal(b), "{name}: Python and Rust differ");
    }
}

/// Python's `torch.jit.load` takes an int8 artifact (quantized::linear_dynamic
/// with its packed weights) as plain TorchScript, and computes exactly what
/// the Rust runtime does; both are PyTorch's dynamic quantization's numbers.
#[test]
fn python_loads_int8_artifacts() {
    let bundle = compile_case(
        "classifier_int8",
        "interop-python-int8",
        &[
            "--resolutions",
            "32,40",
            "--dtype",
            "int8",
            "--outputs",
            "hidden_states",
        ],
    );
    let dir = case_dir("classifier_int8");
    let work = scratch("interop-python-int8-out");
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
m = torch.jit.load(sys.argv[1])
assert "quantized::linear_dynamic" in str(m.forward.graph), "no int8 linear in the graph"
x = load_file(sys.argv[2])
# One row of heads for every layer, as the runtime broadcasts it (2 layers).
hm = x["head_mask"].expand(2, -1).contiguous()
out = m(x["pixel_values"], x["bool_masked_pos"].bool(), hm)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"#;
    let py_out = work.join("py.safetensors");
    let inputs = dir.join("masked.in.safetensors");
    assert_ok(
        &python(script, &[&bundle.join("model_40x40.pt"), &inputs, &py_out]),
        "python torch.jit.load",
    );
    let rust_out = work.join("rust.safetensors");
    assert_ok(
        &run_bundle(&bundle, &inputs, &rust_out, MKL_AS_SHIPPED),
        "rust run",
    );
    let (got, rust) = (read(&py_out), read(&rust_out));
    for name in ["logits", "hidden_states"] {
        let a = &got.iter().find(|(n, _)| n == name).unwrap().1;
        let b = &rust.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(a.equal(b), "{name}: Python and Rust differ");
    }
    let mut expected = read(&dir.join("masked.ref.safetensors"));
    expected.retain(|(n, _)| n == "logits");
    check_outputs(
        &got,
        &expected,
        1e-4,
        "python int8 vs PyTorch's dynamic quantization",
    );
}

/// examples/embed.rs: links only the runtime, loads a bundle, classifies a photo.
#[test]
fn embed_example_classifies() {
    let exe = root().join("target/debug/examples/embed");
    if !exe.is_file() {
        panic!(
            "{} was not built (cargo test builds examples)",
            exe.display()
        );
    }
    let bundle = compile_case("finetuned", "interop-embed", &[]);
    let out = std::process::Command::new(&exe)
        .arg(&bundle)
        .arg(root().join("src/cli/demo_photos/chelsea.jpg"))
        .output()
        .unwrap();
    assert_ok(&out, "embed example");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chelsea.jpg: class_"), "{text}");
}
