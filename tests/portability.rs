//! Bundles compiled on one CPU and run on another. Every machine here can
//! compute as an AVX2-only CPU (AMD Zen 3) does, under
//! `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` ([`common::AVX2_ONLY`]):
//! bundles compiled normally and run so, compiled and run so, in f32, f16 and
//! bf16, each held to its dtype's bounds against the transformers reference.
//! (`make test` also runs the whole parity suite under that setting.)

mod common;

use common::{assert_ok, case_dir, check_runs_env, scratch, vit_msn, vit_msn_env, AVX2_ONLY};
use vit_msn::cpu::{Cpu, CpuFeature};
use vit_msn::Manifest;

/// Compiles a fixture case with its own compile arguments plus `extra`,
/// under `env`; returns the bundle.
fn compile_env(case: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = case_dir(case);
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let bundle = scratch(name).join("bundle");
    let model = dir.join("model");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"compile", &"--model", &model, &"--out", &bundle];
    let own: Vec<String> = spec["compile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    args.extend(own.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    assert_ok(&vit_msn_env(&args, env), &format!("{case}: compile"));
    bundle
}

/// A failure with one `error:` line holding every needle, and never oneDNN's
/// own words.
fn refused_in_one_line(result: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr}");
    }
    assert!(!stderr.contains("primitive descriptor"), "{stderr}");
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect()
}

/// Whether oneDNN's bf16 kernel runs in this test process's setting (the
/// parity suite may itself run under AVX2_ONLY).
fn onednn_bf16_here() -> bool {
    Cpu::detect().has(CpuFeature::OnednnBf16)
}

#[test]
fn bf16_compiled_here_runs_as_on_an_avx2_cpu() {
    let case = "artifact_bf16";
    let bundle = compile_env(case, "portability-bf16-here", &[], &[]);
    let manifest = Manifest::read(&bundle).unwrap();
    // Default flags tie bf16 to oneDNN's kernel only where this CPU has it,
    // and the manifest says so.
    let expected: Vec<CpuFeature> = if onednn_bf16_here() {
        vec![CpuFeature::OnednnBf16]
    } else {
        Vec::new()
    };
    assert_eq!(manifest.cpu_features, expected);
    let work = scratch("portability-bf16-here-run");
    for stderr in check_runs_env(case, &bundle, &work, &[], AVX2_ONLY) {
        // One warning line: no native bf16 there, f32 is faster.
        let w = warnings(&stderr);
        assert_eq!(w.len(), 1, "{stderr}");
        assert!(
            w[0].contains("no native bf16") && w[0].contains("--dtype f32"),
            "{stderr}"
        );
        assert!(!stderr.contains("primitive descriptor"), "{stderr}");
    }
}

#[test]
fn f16_and_f32_compiled_here_run_as_on_an_avx2_cpu() {
    for (case, dtype) in [("artifact_f16", "f16"), ("base", "f32"), ("sdpa", "f32")] {
        let bundle = compile_env(case, &format!("portability-{case}-here"), &[], &[]);
        let work = scratch(&format!("portability-{case}-here-run"));
        for stderr in check_runs_env(case, &bundle, &work, &[], AVX2_ONLY) {
            let w = warnings(&stderr);
            if dtype == "f32" {
                assert!(w.is_empty(), "{stderr}");
            } else {
                assert_eq!(w.len(), 1, "{stderr}");
                assert!(w[0].contains("no native f16"), "{stderr}");
            }
        }
    }
}

#[test]
fn compiled_and_run_as_on_an_avx2_cpu() {
    for case in ["artifact_bf16", "artifact_f16", "classifier_bf16", "base"] {
        let bundle = compile_env(case, &format!("portability-{case}-avx2"), &[], AVX2_ONLY);
        // Nothing there to tie the artifacts to.
        assert!(Manifest::read(&bundle).unwrap().cpu_features.is_empty());
        let work = scratch(&format!("portability-{case}-avx2-run"));
        check_runs_env(case, &bundle, &work, &[], AVX2_ONLY);
        // And back on this machine.
        let work = scratch(&format!("portability-{case}-avx2-back"));
        check_runs_env(case, &bundle, &work, &[], &[]);
    }
}

#[test]
fn onednn_bf16_is_refused_in_one_line_where_the_cpu_lacks_it() {
    let model = case_dir("artifact_bf16").join("model");
    let out = scratch("portability-refuse").join("bundle");
    let result = vit_msn_env(
        &[
            &"compile",
            &"--model",
            &model,
            &"--out",
            &out,
            &"--dtype",
            &"bf16",
            &"--linear",
            &"onednn",
        ],
        AVX2_ONLY,
    );
    refused_in_one_line(&result, &["AVX-512", "leave out --linear onednn"]);
    assert!(!out.exists());
}

/// A bundle whose artifacts use oneDNN's bf16 kernel, compiled here; None,
/// with the reason printed, where this CPU has no such kernel.
fn onednn_bf16_bundle(name: &str) -> Option<std::path::PathBuf> {
    if !onednn_bf16_here() {
        eprintln!(
            "skipped: this CPU ({}) has no oneDNN bf16 kernel (AVX-512 or AVX2-VNNI-2), so no artifact can be compiled with it here",
            Cpu::detect().summary()
        );
        return None;
    }
    Some(compile_env(
        "artifact_bf16",
        name,
        &["--linear", "onednn"],
        &[],
    ))
}

#[test]
fn onednn_bf16_bundle_falls_back_and_bare_file_is_refused_at_load() {
    let Some(bundle) = onednn_bf16_bundle("portability-onednn") else {
        return;
    };
    assert_eq!(
        Manifest::read(&bundle).unwrap().cpu_features,
        [CpuFeature::OnednnBf16]
    );
    // The bundle: its linears fall back to aten::linear, within the bounds.
    let work = scratch("portability-onednn-run");
    for stderr in check_runs_env("artifact_bf16", &bundle, &work, &[], AVX2_ONLY) {
        let w = warnings(&stderr);
        assert_eq!(w.len(), 1, "{stderr}");
        assert!(w[0].contains("run as aten::linear"), "{stderr}");
    }
    // The bare file cannot be rewritten: refused at load, in one line.
    let photo = common::root().join("src/cli/demo_photos/coffee.jpg");
    let result = vit_msn_env(
        &[
            &"run",
            &"--artifact",
            &bundle.join("model_32x32.pt"),
            &"--model",
            &case_dir("artifact_bf16").join("model"),
            &"--image",
            &photo,
        ],
        AVX2_ONLY,
    );
    refused_in_one_line(&result, &["onednn_bf16", "AVX-512", "--linear aten"]);
}

#[test]
fn replace_with_an_onednn_artifact_as_on_an_avx2_cpu() {
    let Some(onednn) = onednn_bf16_bundle("portability-replace-src") else {
        return;
    };
    let bundle = compile_env(
        "artifact_bf16",
        "portability-replace",
        &["--linear", "aten"],
        &[],
    );
    assert!(Manifest::read(&bundle).unwrap().cpu_features.is_empty());
    let result = vit_msn_env(
        &[
            &"bundle",
            &"replace",
            &"--bundle",
            &bundle,
            &"--resolution",
            &"32",
            &"--artifact",
            &onednn.join("model_32x32.pt"),
        ],
        AVX2_ONLY,
    );
    assert_ok(&result, "bundle replace");
    // The bundle now needs what the new file needs.
    assert_eq!(
        Manifest::read(&bundle).unwrap().cpu_features,
        [CpuFeature::OnednnBf16]
    );
    let work = scratch("portability-replace-run");
    check_runs_env("artifact_bf16", &bundle, &work, &[], AVX2_ONLY);
}

#[test]
fn inspect_and_bench_name_the_cpu_features() {
    let bundle = compile_env("base", "portability-inspect", &[], &[]);
    let out = vit_msn(&[&"inspect", &bundle]);
    assert_ok(&out, "inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cpu features used: no CPU-specific kernels"),
        "{text}"
    );
    assert!(text.contains("this cpu: "), "{text}");
    let out = vit_msn_env(&[&"inspect", &bundle, &"--json"], AVX2_ONLY);
    assert_ok(&out, "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["this_cpu"]
            .as_str()
            .unwrap()
            .contains("oneDNN capped at AVX2"),
        "{v}"
    );
    let out = vit_msn(&[
        &"bench",
        &"--bundle",
        &bundle,
        &"--batch",
        &"1",
        &"--iters",
        &"1",
        &"--warmup",
        &"0",
        &"--json",
    ]);
    assert_ok(&out, "bench --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cpu"].as_str(), Some(Cpu::detect().summary().as_str()));
    assert_eq!(v["cpu_features"], serde_json::json!([]));
    let out = vit_msn(&[
        &"bench",
        &"--bundle",
        &bundle,
        &"--batch",
        &"1",
        &"--iters",
        &"1",
    ]);
    assert_ok(&out, "bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cpu: ") && text.contains("bundle uses: "),
        "{text}"
    );
}

/// `--linear onednn` in f16, which oneDNN runs on AVX512-FP16 (or
/// AVX2-VNNI-2) CPUs: within the f16 bounds here, and, falling back to
/// aten::linear, as on an AVX2-only CPU. Elsewhere it is refused in one line.
#[test]
fn onednn_f16_where_the_cpu_has_it() {
    if !Cpu::detect().has(CpuFeature::OnednnF16) {
        let model = case_dir("artifact_f16").join("model");
        let out = scratch("portability-onednn-f16-refused").join("bundle");
        let result = vit_msn(&[
            &"compile",
            &"--model",
            &model,
            &"--out",
            &out,
            &"--dtype",
            &"f16",
            &"--linear",
            &"onednn",
        ]);
        refused_in_one_line(&result, &["AVX512-FP16", "leave out --linear onednn"]);
        eprintln!(
            "skipped the f16 oneDNN parity runs: this CPU ({}) has no oneDNN f16 kernel",
            Cpu::detect().summary()
        );
        return;
    }
    let bundle = compile_env(
        "artifact_f16",
        "portability-onednn-f16",
        &["--linear", "onednn"],
        &[],
    );
    assert_eq!(
        Manifest::read(&bundle).unwrap().cpu_features,
        [CpuFeature::OnednnF16]
    );
    check_runs_env(
        "artifact_f16",
        &bundle,
        &scratch("portability-onednn-f16-run"),
        &[],
        &[],
    );
    for stderr in check_runs_env(
        "artifact_f16",
        &bundle,
        &scratch("portability-onednn-f16-avx2"),
        &[],
        AVX2_ONLY,
    ) {
        assert!(stderr.contains("run as aten::linear"), "{stderr}");
    }
}
