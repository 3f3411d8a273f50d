//! The runtime library and the binary's contract, beyond numerical parity.

mod common;

use std::sync::Arc;

use common::{case_dir, scratch, vit_msn};
use tch::{Device, Kind, Tensor};
use vit_msn::artifact::Artifact;
use vit_msn::bundle::{CpuLinears, LoadOptions};
use vit_msn::mkl::MklKernels;
use vit_msn::{Bundle, Error};

/// Compiles into a scratch folder of the calling test's own (`test`), so
/// tests running in parallel never share one.
fn compile(test: &str, case: &str, extra: &[&str]) -> std::path::PathBuf {
    common::compile_case(case, &format!("runtime-{test}"), extra)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// One artifact, traced at batch 2, serves other batch sizes, and each
/// sample's result equals running it alone.
#[test]
fn batch_is_dynamic_and_samples_are_independent() {
    let bundle = Bundle::load(
        compile("batch", "base", &["--outputs", "hidden_states,attentions"]),
        Device::Cpu,
    )
    .unwrap();
    tch::manual_seed(3);
    let px = Tensor::randn([5, 3, 32, 32], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([5, 16], (Kind::Float, Device::Cpu)).lt(0.4);
    let hm = Tensor::rand([2, 4], (Kind::Float, Device::Cpu));
    let all = bundle.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let lhs = all.last_hidden_state.as_ref().unwrap();
    assert_eq!(lhs.size(), [5, 17, 32]);
    for i in 0..5 {
        let one = bundle
            .forward(&px.narrow(0, i, 1), Some(&mask.narrow(0, i, 1)), Some(&hm))
            .unwrap();
        let scale = lhs.abs().max().double_value(&[]).max(1.0);
        assert!(max_diff(&one.last_hidden_state.unwrap(), &lhs.narrow(0, i, 1)) <= 1e-4 * scale);
        assert!(
            max_diff(
                &one.attentions.unwrap(),
                &all.attentions.as_ref().unwrap().narrow(1, i, 1)
            ) <= 1e-4
        );
    }
}

/// A (heads,) head mask is the same as that row repeated for every layer.
#[test]
fn head_mask_of_either_shape() {
    let bundle = Bundle::load(compile("head-mask", "sdpa", &[]), Device::Cpu).unwrap();
    let px = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let row = Tensor::from_slice(&[1.0f32, 0.0, 0.5, 0.25]);
    let a = bundle
        .forward(&px, None, Some(&row))
        .unwrap()
        .last_hidden_state
        .unwrap();
    let b = bundle
        .forward(&px, None, Some(&row.unsqueeze(0).repeat([2, 1])))
        .unwrap()
        .last_hidden_state
        .unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    let ones = bundle
        .forward(&px, None, None)
        .unwrap()
        .last_hidden_state
        .unwrap();
    assert!(max_diff(&a, &ones) > 1e-3, "the head mask changed nothing");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let bundle = Bundle::load(
        compile("bad-inputs", "base", &["--resolutions", "32,48x40"]),
        Device::Cpu,
    )
    .unwrap();
    let f = (Kind::Float, Device::Cpu);
    let px = Tensor::randn([2, 3, 32, 32], f);
    let input_err = |r: Result<vit_msn::Output, Error>| match r {
        Err(Error::Input { name, message }) => format!("{name}: {message}"),
        other => panic!("expected an input error, got {other:?}"),
    };
    let m = input_err(bundle.forward(&Tensor::randn([2, 3, 40, 40], f), None, None));
    assert!(
        m.contains("40x40 was not compiled") && m.contains("32x32, 48x40"),
        "{m}"
    );
    assert!(
        input_err(bundle.forward(&Tensor::randn([3, 32, 32], f), None, None)).contains("rank 4")
    );
    assert!(
        input_err(bundle.forward(&Tensor::randn([2, 1, 32, 32], f), None, None))
            .contains("3 channel")
    );
    assert!(
        input_err(bundle.forward(&Tensor::randn([0, 3, 32, 32], f), None, None)).contains("empty")
    );
    let nan = px.copy();
    let _ = nan.get(0).get(0).get(0).get(0).fill_(f64::NAN);
    assert!(input_err(bundle.forward(&nan, None, None)).starts_with("pixel_values: contains NaN"));
    let inf = px.copy();
    let _ = inf.get(1).get(2).get(3).get(4).fill_(f64::INFINITY);
    assert!(input_err(bundle.forward(&inf, None, None)).contains("NaN or infinite"));
    let ints = Tensor::zeros([2, 3, 32, 32], (Kind::Int64, Device::Cpu));
    assert!(input_err(bundle.forward(&ints, None, None)).contains("expected a float tensor"));
    // A batch larger than memory allows is refused before anything is
    // allocated (the input is an expanded view: no memory behind it).
    let huge = Tensor::zeros([1, 3, 32, 32], f).expand([50_000_000, 3, 32, 32], false);
    let m = input_err(bundle.forward(&huge, None, None));
    assert!(
        m.contains("a batch of 50000000 needs about") && m.contains("use smaller batches"),
        "{m}"
    );
    let mask = Tensor::zeros([2, 15], (Kind::Bool, Device::Cpu));
    assert!(input_err(bundle.forward(&px, Some(&mask), None)).starts_with("bool_masked_pos"));
    let hm = Tensor::ones([3], f);
    assert!(input_err(bundle.forward(&px, None, Some(&hm))).starts_with("head_mask"));
    let hm = Tensor::from_slice(&[1.0f32, -1.0, 1.0, 1.0]);
    assert!(input_err(bundle.forward(&px, None, Some(&hm))).contains("non-negative"));
    let hm = Tensor::from_slice(&[1.0f32, f32::NAN, 1.0, 1.0]);
    assert!(input_err(bundle.forward(&px, None, Some(&hm))).contains("finite"));
}

#[test]
fn tampered_artifact_is_refused() {
    let bundle = compile("tampered", "no_qkv_bias", &[]);
    let pt = bundle.join("model_32x32.pt");
    let mut bytes = std::fs::read(&pt).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&pt, bytes).unwrap();
    match Bundle::load(&bundle, Device::Cpu) {
        Err(Error::Digest { path, .. }) => assert!(path.ends_with("model_32x32.pt")),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a tampered artifact was loaded"),
    }
}

#[test]
fn cuda_where_none_exists_is_an_error() {
    if vit_msn::device::cuda_device_count() > 0 {
        return;
    }
    let err = vit_msn::parse_device("cuda").unwrap_err().to_string();
    assert!(
        err.contains("cuda:0") && err.contains("0 CUDA device"),
        "{err}"
    );
    let out = vit_msn(&[
        &"compile",
        &"--model",
        &case_dir("base").join("model"),
        &"--out",
        &scratch("cuda").join("b"),
        &"--device",
        &"cuda",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: device: cuda:0 was asked for"));
}

/// The bundle is `Send + Sync`: one loaded bundle serves many threads.
#[test]
fn shared_across_threads() {
    let bundle = Arc::new(Bundle::load(compile("threads", "sdpa", &[]), Device::Cpu).unwrap());
    let px = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let alone = bundle
        .forward(&px, None, None)
        .unwrap()
        .last_hidden_state
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let bundle = Arc::clone(&bundle);
            let px = px.copy();
            std::thread::spawn(move || {
                bundle
                    .forward(&px, None, None)
                    .unwrap()
                    .last_hidden_state
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(max_diff(&h.join().unwrap(), &alone), 0.0);
    }
}

/// `readelf -d` of the binary: its NEEDED libraries and RUNPATH.
fn dynamic_section() -> String {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(common::bin())
        .output()
        .expect("readelf");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The binary starts without LD_LIBRARY_PATH, and without libtorch_cuda:
/// that is loaded on demand (next test).
#[test]
fn binary_dynamic_section() {
    let text = dynamic_section();
    let runpath = text
        .lines()
        .find(|l| l.contains("(RUNPATH)"))
        .expect("no RUNPATH");
    assert!(
        runpath.contains("torch/lib") || runpath.contains(".libtorch/lib"),
        "{runpath}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("(NEEDED)") && l.contains("libtorch_cpu.so")),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("(NEEDED)") && l.contains("libtorch_cuda")),
        "{text}"
    );
    let status = std::process::Command::new(common::bin())
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .status()
        .unwrap();
    assert!(status.success());
}

/// Asking for CUDA loads libtorch's CUDA support, and what loads is real:
/// libtorch then has CUDA kernels (here it fails for want of a driver, not
/// for want of a CUDA backend).
#[test]
fn cuda_support_loads_on_demand() {
    let lib = vit_msn::device::load_cuda_support().expect("libtorch_cuda.so loads");
    assert!(lib.ends_with("libtorch_cuda.so"), "{}", lib.display());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(maps.contains("/libtorch_cuda.so"));
    if vit_msn::device::cuda_device_count() > 0 {
        let t = Tensor::ones([2], (Kind::Float, Device::Cuda(0)));
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 2.0);
        return;
    }
    let err = match Tensor::f_ones([2], (Kind::Float, Device::Cuda(0))) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("no CUDA device, yet a CUDA tensor was made"),
    };
    assert!(!err.contains("CUDA' backend"), "{err}");
}

/// A libtorch without CUDA support (no libtorch_cuda.so beside libtorch_cpu.so,
/// none on the search path): asking for CUDA is a one-line error, and the CPU
/// still works. The binary is copied with its RUNPATH blanked and run against a
/// folder of hard links to libtorch's libraries, minus libtorch_cuda.so.
#[test]
fn cuda_support_missing_is_a_clear_error() {
    let dir = common::scratch("no-libtorch-cuda");
    let libs = dir.join("lib");
    std::fs::create_dir(&libs).unwrap();
    let torch_lib = common::root()
        .join(".libtorch")
        .join("lib")
        .canonicalize()
        .unwrap();
    for entry in std::fs::read_dir(&torch_lib).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "libtorch_cuda.so" || !entry.file_type().unwrap().is_file() {
            continue;
        }
        // Hard links (same file system as the venv): /proc/self/maps then
        // names this folder, as it would for a real CPU-only libtorch.
        std::fs::hard_link(entry.path(), libs.join(&name))
            .unwrap_or_else(|e| panic!("hard link {}: {e}", entry.path().display()));
    }

    let text = dynamic_section();
    let runpath = text
        .lines()
        .find(|l| l.contains("(RUNPATH)"))
        .and_then(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .expect("no RUNPATH");
    let mut image = std::fs::read(common::bin()).unwrap();
    let needle: Vec<u8> = runpath.bytes().chain([0]).collect();
    let blank = b"/nonexistent";
    assert!(blank.len() < needle.len());
    let mut replaced = 0;
    let mut i = 0;
    while let Some(at) = image[i..]
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
    {
        let start = i + at;
        // Only whole strings (a NUL before), as the dynamic string table holds it.
        if start > 0 && image[start - 1] == 0 {
            image[start..start + needle.len()].fill(0);
            image[start..start + blank.len()].copy_from_slice(blank);
            replaced += 1;
        }
        i = start + needle.len();
    }
    assert!(replaced > 0, "RUNPATH `{runpath}` not found in the binary");
    let bin = dir.join("vit-msn");
    std::fs::write(&bin, &image).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // libtorch_cpu.so of the CUDA wheel needs CUDA's profiler library
    // (libcupti), which its RPATH finds relative to its own folder.
    let mut search = vec![libs.clone()];
    if let Ok(nvidia) = std::fs::read_dir(torch_lib.join("../../nvidia")) {
        search.extend(nvidia.flatten().map(|e| e.path().join("lib")));
    }
    let search = std::env::join_paths(search).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .args(args)
            .env("LD_LIBRARY_PATH", &search)
            .output()
            .unwrap()
    };
    let model = dir.join("m");
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"architectures": ["ViTMSNModel"], "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "image_size": 8, "patch_size": 4}"#,
    )
    .unwrap();
    let out = run(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "compile",
        "--model",
        model.to_str().unwrap(),
        "--out",
        dir.join("b").to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CUDA support could not be loaded") && stderr.contains("libtorch_cuda.so"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!dir.join("b").exists());
    let out = run(&[
        "compile",
        "--model",
        model.to_str().unwrap(),
        "--out",
        dir.join("b").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An application that links only the runtime does not pull in the compiler.
#[test]
fn runtime_does_not_depend_on_the_graph() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "vit-msn",
            "--no-default-features",
            "-e",
            "normal",
            "--offline",
        ])
        .current_dir(common::root())
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("tch v0.26"), "{tree}");
    assert!(!tree.contains("vit-msn-graph"), "{tree}");
}

/// `LoadOptions::resolutions` loads only the artifacts asked for (with the
/// same results, warmed up or not), yet still verifies every file.
#[test]
fn loading_some_resolutions_only() {
    let dir = compile("some-resolutions", "sdpa", &["--resolutions", "32,40x48"]);
    let only = |resolutions: Vec<(i64, i64)>, warm_up: bool| {
        Bundle::load_with(
            &dir,
            Device::Cpu,
            &LoadOptions {
                resolutions: Some(resolutions),
                warm_up,
                ..Default::default()
            },
        )
    };
    let all = Bundle::load(&dir, Device::Cpu).unwrap();
    let part = only(vec![(40, 48)], false).unwrap();
    tch::manual_seed(9);
    let px = Tensor::randn([2, 3, 40, 48], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([2, 30], (Kind::Float, Device::Cpu)).lt(0.3);
    let hm = Tensor::rand([4], (Kind::Float, Device::Cpu));
    let a = all.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let b = part.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let (a, b) = (a.last_hidden_state.unwrap(), b.last_hidden_state.unwrap());
    let scale = a.abs().max().double_value(&[]).max(1.0);
    assert!(max_diff(&a, &b) <= 1e-5 * scale, "{}", max_diff(&a, &b));

    let input_err = |r: vit_msn::Result<_>| match r {
        Err(Error::Input { message, .. }) => message,
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted"),
    };
    let small = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let message = input_err(part.forward(&small, None, None).map(|_| ()));
    assert!(
        message.contains("32x32 was compiled but not loaded (loaded: 40x48)"),
        "{message}"
    );
    let message = input_err(only(vec![(64, 64)], true).map(|_| ()));
    assert!(
        message.contains("64x64 was not compiled; this bundle has 32x32, 40x48"),
        "{message}"
    );

    // The artifact left out is still checked against its digest.
    let pt = dir.join("model_32x32.pt");
    let mut bytes = std::fs::read(&pt).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&pt, bytes).unwrap();
    match only(vec![(40, 48)], false) {
        Err(Error::Digest { path, .. }) => assert!(path.ends_with("model_32x32.pt")),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a bundle with a tampered artifact was loaded"),
    }
}

/// Prepacking the oneDNN linear weights at load packs every linear (fused
/// QKV, attention output, intermediate, output: 4 per layer) and leaves the
/// results as they were.
#[test]
fn prepacked_linears_give_the_same_results() {
    let dir = compile("prepack", "base", &[]);
    let packed = Bundle::load(&dir, Device::Cpu).unwrap();
    let plain = Bundle::load_with(
        &dir,
        Device::Cpu,
        &LoadOptions {
            prepack_linears: false,
            ..Default::default()
        },
    )
    .unwrap();
    tch::manual_seed(5);
    let px = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([3, 16], (Kind::Float, Device::Cpu)).lt(0.3);
    let hm = Tensor::rand([2, 4], (Kind::Float, Device::Cpu));
    let a = packed.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let b = plain.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let (a, b) = (a.last_hidden_state.unwrap(), b.last_hidden_state.unwrap());
    let scale = b.abs().max().double_value(&[]).max(1.0);
    assert!(max_diff(&a, &b) <= 1e-5 * scale, "{}", max_diff(&a, &b));

    let m = packed.manifest();
    let file = dir.join(&m.artifacts[0].file);
    let mut artifact = Artifact::load(&file, Device::Cpu).unwrap();
    let tokens = (m.artifacts[0].height / m.model.patch_size).pow(2) + 1;
    let layers = m.model.num_hidden_layers as usize;
    if common::test_device() == "cpu" {
        assert_eq!(artifact.prepack_linears(tokens).unwrap(), 4 * layers);
    }
    assert_eq!(artifact.prepack_linears(tokens).unwrap(), 0, "packed twice");
}

/// Splitting each fused GELU post-op off its oneDNN linear (the default on
/// CPUs without AVX-512) splits one linear per layer, the intermediate, and
/// computes the same function as the fused graph, on every CPU.
#[test]
fn split_gelu_gives_the_same_results() {
    let dir = compile("split-gelu", "base", &[]);
    let load = |fused| {
        let options = LoadOptions {
            fused_gelu: Some(fused),
            ..Default::default()
        };
        Bundle::load_with(&dir, Device::Cpu, &options).unwrap()
    };
    let (fused, split) = (load(true), load(false));
    tch::manual_seed(6);
    let px = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([3, 16], (Kind::Float, Device::Cpu)).lt(0.3);
    let hm = Tensor::rand([2, 4], (Kind::Float, Device::Cpu));
    let a = fused.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let b = split.forward(&px, Some(&mask), Some(&hm)).unwrap();
    let (a, b) = (a.last_hidden_state.unwrap(), b.last_hidden_state.unwrap());
    let scale = a.abs().max().double_value(&[]).max(1.0);
    assert!(max_diff(&a, &b) <= 1e-5 * scale, "{}", max_diff(&a, &b));

    let m = fused.manifest();
    let mut artifact = Artifact::load(&dir.join(&m.artifacts[0].file), Device::Cpu).unwrap();
    if common::test_device() == "cpu" {
        let layers = m.model.num_hidden_layers as usize;
        assert_eq!(artifact.split_gelu_post_ops().unwrap(), layers);
    }
    assert_eq!(artifact.split_gelu_post_ops().unwrap(), 0, "split twice");
}

/// oneMKL's packed sgemm in place of oneDNN's f32 linears computes the
/// same function, at batch 1 (the packed weight: 17 rows at 32x32) and at
/// batch 3 (ATen's linear on the dense weight the node keeps), with a mask
/// and a head mask, with GELU split off or fused; the bundle says which it
/// runs. On the artifact it rewrites the 4 linears of each layer once GELU
/// is split off (3 while it is fused), and nothing a second time.
#[test]
fn mkl_linears_give_the_same_results() {
    let dir = compile("mkl-linears", "base", &[]);
    let load = |linears, fused| {
        let options = LoadOptions {
            cpu_linears: Some(linears),
            fused_gelu: Some(fused),
            ..Default::default()
        };
        Bundle::load_with(&dir, Device::Cpu, &options).unwrap()
    };
    let onednn = load(CpuLinears::OneDnn, true);
    assert_eq!(onednn.cpu_linears(), Some(CpuLinears::OneDnn));
    for fused in [false, true] {
        let mkl = load(CpuLinears::Mkl, fused);
        assert_eq!(mkl.cpu_linears(), Some(CpuLinears::Mkl));
        for batch in [1, 3] {
            tch::manual_seed(7 + batch);
            let px = Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu));
            let mask = Tensor::rand([batch, 16], (Kind::Float, Device::Cpu)).lt(0.3);
            let hm = Tensor::rand([2, 4], (Kind::Float, Device::Cpu));
            let a = onednn.forward(&px, Some(&mask), Some(&hm)).unwrap();
            let b = mkl.forward(&px, Some(&mask), Some(&hm)).unwrap();
            let (a, b) = (a.last_hidden_state.unwrap(), b.last_hidden_state.unwrap());
            let scale = a.abs().max().double_value(&[]).max(1.0);
            let d = max_diff(&a, &b);
            assert!(d <= 1e-5 * scale, "batch {batch}, fused {fused}: {d}");
        }
    }

    let m = onednn.manifest();
    let layers = m.model.num_hidden_layers as usize;
    let tokens = (m.artifacts[0].height / m.model.patch_size).pow(2) + 1;
    let file = dir.join(&m.artifacts[0].file);
    let mut fused = Artifact::load(&file, Device::Cpu).unwrap();
    assert_eq!(fused.mkl_linears(tokens).unwrap(), 3 * layers);
    let mut split = Artifact::load(&file, Device::Cpu).unwrap();
    assert_eq!(split.split_gelu_post_ops().unwrap(), layers);
    assert_eq!(split.mkl_linears(tokens).unwrap(), 4 * layers);
    assert_eq!(split.mkl_linears(tokens).unwrap(), 0, "rewritten twice");
    assert_eq!(
        split.prepack_linears(tokens).unwrap(),
        0,
        "none left for oneDNN"
    );
}

/// oneMKL's sgemm is the default only where it was measured faster: no
/// AVX-512, and oneMKL on its AVX2 kernels because of the override.
#[test]
fn mkl_linears_are_the_default_only_on_avx2_with_the_override() {
    use CpuLinears::{Fbgemm, Mkl, OneDnn};
    assert_eq!(
        CpuLinears::by_default("f32", false, MklKernels::AmdAsIntel),
        Mkl
    );
    assert_eq!(
        CpuLinears::by_default("f32", true, MklKernels::AmdAsIntel),
        OneDnn
    );
    for other in [
        MklKernels::AsShipped,
        MklKernels::OptedOut,
        MklKernels::NotLinked,
    ] {
        // f32: oneDNN; int8: oneDNN only without AVX-512, whatever oneMKL does.
        for (dtype, avx512, want) in [
            ("f32", false, OneDnn),
            ("f32", true, OneDnn),
            ("int8", false, OneDnn),
            ("int8", true, Fbgemm),
        ] {
            let got = CpuLinears::by_default(dtype, avx512, other);
            assert_eq!(got, want, "{other:?} {dtype} avx512 {avx512}");
        }
    }
    assert_eq!(CpuLinears::parse("fbgemm"), Some(Fbgemm));
    assert_eq!(CpuLinears::parse("mkl"), Some(Mkl));
    assert_eq!(CpuLinears::parse(" onednn\n"), Some(OneDnn));
    assert_eq!(CpuLinears::parse("MKL"), None);
    assert_eq!(CpuLinears::resolve(Some(OneDnn), "f32").unwrap(), OneDnn);
    assert_eq!(CpuLinears::resolve(Some(Fbgemm), "int8").unwrap(), Fbgemm);
    // A GEMM that cannot run the dtype's linears is refused, naming both.
    for (choice, dtype) in [(Mkl, "int8"), (Fbgemm, "f32")] {
        let err = CpuLinears::resolve(Some(choice), dtype)
            .unwrap_err()
            .to_string();
        assert!(err.contains(choice.name()) && err.contains(dtype), "{err}");
    }
}

/// A `VIT_MSN_CPU_LINEARS` that names neither GEMM fails the load in one
/// line (here through `bench`); the variable and `bench --linears` choose
/// the GEMM, and the report says which ran.
#[test]
fn cpu_linears_env_is_checked_and_reported() {
    let dir = compile("linears-env", "base", &[]);
    let bench = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"bench",
            &"--bundle",
            &dir,
            &"--batch",
            &"1",
            &"--iters",
            &"1",
        ];
        args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        common::vit_msn_env(&args, env)
    };
    let out = bench(&[("VIT_MSN_CPU_LINEARS", "cublas")], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("VIT_MSN_CPU_LINEARS") && err.contains("cublas"),
        "{err}"
    );
    for (env, extra, want) in [
        ("mkl", &[][..], "mkl"),
        ("onednn", &[][..], "onednn"),
        ("onednn", &["--linears", "mkl"][..], "mkl"),
    ] {
        let mut extra = extra.to_vec();
        extra.push("--json");
        let out = bench(&[("VIT_MSN_CPU_LINEARS", env)], &extra);
        common::assert_ok(&out, "bench --json");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["linears"].as_str(), Some(want), "{env} {extra:?}");
    }
    let base = scratch("runtime-linears-env-baseline").join("base.json");
    let base_arg = base.display().to_string();
    let out = bench(&[], &["--linears", "onednn", "--save-baseline", &base_arg]);
    common::assert_ok(&out, "bench --save-baseline");
    let out = bench(
        &[],
        &[
            "--linears",
            "mkl",
            "--baseline",
            &base_arg,
            "--max-regression",
            "100000",
        ],
    );
    common::assert_ok(&out, "bench --baseline");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("linears: oneMKL's sgemm"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the baseline's linears ran on onednn; this run's run on mkl"),
        "{err}"
    );
}

/// The memory check counts heads × tokens² attention scores only for graphs
/// that hold them (those returning attentions); SDPA works in blocks. At 512
/// (4097 tokens), 150 images need about 2 GB without the scores, and about
/// 200 GB with them and the attentions output, so the same batch is refused
/// only by the second bundle.
#[test]
fn memory_check_counts_attention_scores_only_where_held() {
    let sdpa = common::compile_case("base", "runtime-memory-sdpa", &["--resolutions", "512"]);
    let eager = common::compile_case(
        "base",
        "runtime-memory-eager",
        &["--resolutions", "512", "--outputs", "attentions"],
    );
    let sdpa = Bundle::load(&sdpa, Device::Cpu).unwrap();
    sdpa.check_batch(150, 512, 512)
        .unwrap_or_else(|e| panic!("an SDPA bundle was refused: {e}"));
    let eager = Bundle::load(&eager, Device::Cpu).unwrap();
    let err = eager.check_batch(150, 512, 512).unwrap_err().to_string();
    assert!(err.contains("needs about"), "{err}");
}

/// The CUDA-graph library is built (the Makefile installs the CUDA headers it
/// needs) and loads, together with libtorch's CUDA support, without a GPU.
#[test]
fn cuda_graph_library_is_built_and_loads() {
    let lib = vit_msn::cuda_graph::library_path()
        .unwrap_or_else(|e| panic!("CUDA graphs unavailable: {e}"));
    assert!(
        lib.ends_with("libvit_msn_cuda_graphs.so"),
        "{}",
        lib.display()
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(maps.contains("/libvit_msn_cuda_graphs.so"));
}

/// With `cuda_graphs`, each input shape's forward is captured once and then
/// replayed: replays with new pixels, masks and head masks, at two batch
/// sizes and again at the first, give the eager forward's results. On the
/// CPU the option is refused.
#[test]
fn cuda_graphs_replay_the_eager_forward() {
    let graphs = LoadOptions {
        cuda_graphs: true,
        ..Default::default()
    };
    if common::test_device() == "cpu" {
        let dir = compile("graphs-cpu", "base", &[]);
        let err = match Bundle::load_with(&dir, Device::Cpu, &graphs) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("CUDA graphs were accepted on the CPU"),
        };
        assert!(err.contains("CUDA graphs need a CUDA device"), "{err}");
        return;
    }
    let device = vit_msn::parse_device(&common::test_device()).unwrap();
    for (case, extra, tol) in [
        ("base", &["--outputs", "hidden_states,attentions"][..], 1e-4),
        ("base", &[][..], 1e-4),
        ("classifier_bin", &[][..], 1e-4),
        // Another cuBLAS algorithm may round a bf16 result differently.
        ("artifact_bf16", &["--dtype", "bf16"][..], 3e-2),
    ] {
        let mut args = vec!["--device", "cuda"];
        args.extend_from_slice(extra);
        let dir = compile(&format!("graphs-{case}-{}", extra.len()), case, &args);
        let eager = Bundle::load(&dir, device).unwrap();
        let replayed = Bundle::load_with(&dir, device, &graphs).unwrap();
        let m = eager.manifest();
        let (h, w) = (m.artifacts[0].height, m.artifacts[0].width);
        let (layers, heads) = (m.model.num_hidden_layers, m.model.num_attention_heads);
        let patches = (h / m.model.patch_size) * (w / m.model.patch_size);
        tch::manual_seed(11);
        for batch in [2, 3, 2, 1] {
            for masked in [false, true] {
                let px = Tensor::randn([batch, 3, h, w], (Kind::Float, Device::Cpu));
                let mask = Tensor::rand([batch, patches], (Kind::Float, Device::Cpu)).lt(0.3);
                let hm = Tensor::rand([layers, heads], (Kind::Float, Device::Cpu));
                let (mask, hm) = if masked {
                    (Some(&mask), Some(&hm))
                } else {
                    (None, None)
                };
                let want = eager.forward(&px, mask, hm).unwrap();
                let got = replayed.forward(&px, mask, hm).unwrap();
                let (want, got) = (want.named(), got.named());
                assert_eq!(want.len(), got.len());
                for ((name, a), (_, b)) in want.iter().zip(&got) {
                    let scale = a.abs().max().double_value(&[]).max(1.0);
                    let diff = max_diff(a, b);
                    assert!(
                        diff <= tol * scale,
                        "{case} batch {batch} masked {masked}: `{name}` differs by {diff}"
                    );
                }
            }
        }
    }
}
