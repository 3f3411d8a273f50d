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
