//! Numerical parity with transformers 4.46.3, one test per fixture case
//! (tests/fixtures/make_fixtures.py says what each case holds). f32 cases hold
//! max |got − ref| ≤ 1e-4 · max(1, max |ref|) on every output; the f16/bf16
//! artifact cases hold the bound written in their case.json against the f32
//! reference. On the CPU the linears run on oneDNN by default (GELU fused);
//! the `aten_*` tests cover the aten::linear path.

mod common;

macro_rules! parity {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            common::check_case(stringify!($name));
        }
    )*};
}

parity!(
    base,
    patch4,
    patch7,
    patch16,
    patch_remainder,
    list_sizes,
    list_patch,
    no_layers,
    channels1,
    no_qkv_bias,
    layer_norm_eps,
    sdpa,
    hidden_only,
    classifier_bin,
    classifier_regression,
    classifier_multilabel,
    classifier_sharded,
    classifier_sharded_bin,
    classifier_bf16,
    no_layers_classifier,
    weights_f16,
    weights_bf16,
    artifact_f16,
    artifact_bf16,
    vit_msn_small,
    vit_msn_small_bf16,
);

/// Every `hidden_act` that transformers accepts, plus selu.
#[test]
fn activations() {
    let names = [
        "gelu",
        "gelu_10",
        "gelu_fast",
        "gelu_new",
        "gelu_python",
        "gelu_pytorch_tanh",
        "gelu_accurate",
        "laplace",
        "leaky_relu",
        "linear",
        "mish",
        "quick_gelu",
        "relu",
        "relu2",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "swish",
        "tanh",
    ];
    for name in names {
        common::check_case(&format!("act_{name}"));
    }
}

/// The aten::linear path (MKL on CPU; what CUDA artifacts use), with the
/// activations that oneDNN would otherwise fuse.
#[test]
fn aten_linear() {
    for case in [
        "base",
        "sdpa",
        "classifier_bin",
        "classifier_regression",
        "artifact_bf16",
        "act_gelu",
        "act_gelu_pytorch_tanh",
        "act_relu",
    ] {
        common::check_case_with(case, &["--linear", "aten"]);
    }
}

/// Both GEMMs for the f32 linears on the CPU, whichever this CPU defaults
/// to: oneMKL's packed sgemm (`VIT_MSN_CPU_LINEARS=mkl`; the batch-1 runs
/// take the packed weight, the others ATen's linear) and oneDNN's.
#[test]
fn cpu_linears() {
    for (linears, cases) in [
        (
            "mkl",
            &[
                "base",
                "sdpa",
                "no_qkv_bias",
                "classifier_bin",
                "act_relu",
                "vit_msn_small",
            ][..],
        ),
        ("onednn", &["sdpa", "vit_msn_small"][..]),
    ] {
        for case in cases {
            common::check_case_env(case, &[("VIT_MSN_CPU_LINEARS", linears)]);
        }
    }
}

/// Explicit attention (two batched matmuls around a softmax), which bf16
/// artifacts compute by default where oneDNN has bf16 linears: forced here so
/// that every CPU runs it, in f32 (against the f32 bound) and bf16, with the
/// head mask, the CLS-only last layer of a classifier, and aten linears.
#[test]
fn explicit_attention() {
    for case in [
        "sdpa",
        "hidden_only",
        "classifier_regression",
        "vit_msn_small",
        "artifact_bf16",
        "classifier_bf16",
        "vit_msn_small_bf16",
    ] {
        common::check_case_with(case, &["--attention", "explicit"]);
    }
    common::check_case_with(
        "artifact_bf16",
        &["--attention", "explicit", "--linear", "aten"],
    );
}

/// Which attention each bf16 artifact records: explicit (recorded as `eager`,
/// since it holds the scores) at up to 257 tokens where the compiler chose
/// oneDNN's bf16 linears, else SDPA; `--attention sdpa` overrides it.
#[test]
fn bf16_attention_choice() {
    // Patch 8: 128x128 is 257 tokens, 136x136 is 290.
    let attentions = |name: &str, extra: &[&str]| {
        let mut args = vec!["--dtype", "bf16", "--resolutions", "128,136"];
        args.extend_from_slice(extra);
        let bundle = common::compile_case("artifact_bf16", name, &args);
        let text = std::fs::read_to_string(bundle.join("manifest.json")).expect("manifest");
        let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest json");
        let onednn = manifest["cpu_features"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "onednn_bf16"));
        let got: Vec<String> = manifest["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .map(|a| a["attention"].as_str().unwrap_or("none").to_string())
            .collect();
        (onednn, got)
    };
    let (onednn, got) = attentions("attention-choice-default", &[]);
    let small = if onednn { "eager" } else { "sdpa" };
    assert_eq!(got, [small, "sdpa"], "onednn_bf16: {onednn}");
    let (_, got) = attentions("attention-choice-sdpa", &["--attention", "sdpa"]);
    assert_eq!(got, ["sdpa", "sdpa"]);
    let (_, got) = attentions("attention-choice-aten", &["--linear", "aten"]);
    assert_eq!(got, ["sdpa", "sdpa"]);
}

/// Replayed CUDA graphs (`run --cuda-graphs`), on CUDA. On the CPU the flag is
/// a usage error, which is checked instead.
#[test]
fn cuda_graphs() {
    if common::test_device() == "cpu" {
        let bundle = common::compile_case("base", "parity-cuda-graphs-cpu", &[]);
        let dir = common::case_dir("base");
        let out = common::vit_msn(&[
            &"run",
            &"--bundle",
            &bundle,
            &"--inputs",
            &dir.join("plain_32x32.in.safetensors"),
            &"--output",
            &common::scratch("parity-cuda-graphs-cpu-out").join("o.safetensors"),
            &"--cuda-graphs",
        ]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--cuda-graphs needs --device cuda"),
            "{stderr}"
        );
        return;
    }
    for case in ["base", "sdpa", "classifier_bin", "artifact_bf16"] {
        common::check_case_run_with(case, &[], &["--cuda-graphs"]);
    }
}
