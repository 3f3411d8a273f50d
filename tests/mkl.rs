//! oneMKL's AVX-512 kernels on AMD CPUs (src/mkl.rs): the executables
//! export the vendor-check override, and oneMKL's own banner
//! (`MKL_VERBOSE=1`) names the kernels this CPU and setting should get. The
//! expectation is read from /proc/cpuinfo here, not from the runtime's code.
//! Parity with the override in effect is the whole parity suite's job (it
//! runs as this machine is, and under [`common::AVX2_ONLY`]); here one f32
//! case is also held to its reference with the override off.

mod common;

use common::{assert_ok, check_runs_env, compile_case, scratch, AVX2_ONLY};
use vit_msn::mkl::{status, MklKernels};

fn cpuinfo_field(name: &str) -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

/// Whether the hardware has the AVX-512 that oneMKL's AVX-512 kernels need.
fn hardware_avx512() -> bool {
    let flags = cpuinfo_field("flags");
    let all: Vec<&str> = flags.split_whitespace().collect();
    ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
        .iter()
        .all(|f| all.contains(f))
}

const CASE: &str = "finetuned";

/// The fixture case compiled with its own arguments (SDPA in f32, whose
/// matmuls are oneMKL's sgemm).
fn bundle(name: &str) -> std::path::PathBuf {
    let spec = common::case_spec(&common::case_dir(CASE));
    let args: Vec<String> = spec["compile"]
        .as_array()
        .expect("compile arguments")
        .iter()
        .map(|a| a.as_str().expect("argument").to_owned())
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    compile_case(CASE, name, &args)
}

/// oneMKL's banner line from a `vit-msn run` of the case under `env` alone
/// (whatever caps this test process runs under are removed).
fn banner(bundle: &std::path::Path, env: &[(&str, &str)]) -> String {
    let spec = common::case_spec(&common::case_dir(CASE));
    let inputs = common::case_dir(CASE).join(spec["runs"][0]["inputs"].as_str().expect("inputs"));
    let out = scratch("mkl-banner").join("out.safetensors");
    let mut cmd = std::process::Command::new(common::bin());
    cmd.args(["run", "--bundle"])
        .arg(bundle)
        .arg("--inputs")
        .arg(&inputs);
    cmd.arg("--output").arg(&out);
    for var in [
        "ONEDNN_MAX_CPU_ISA",
        "DNNL_MAX_CPU_ISA",
        "ATEN_CPU_CAPABILITY",
        "MKL_ENABLE_INSTRUCTIONS",
        vit_msn::mkl::OPT_OUT,
    ] {
        cmd.env_remove(var);
    }
    cmd.env("MKL_VERBOSE", "1").envs(env.iter().copied());
    let result = cmd.output().expect("run vit-msn");
    assert_ok(&result, "run with MKL_VERBOSE=1");
    let stdout = String::from_utf8_lossy(&result.stdout);
    stdout
        .lines()
        .find(|l| l.starts_with("MKL_VERBOSE oneMKL"))
        .unwrap_or_else(|| panic!("no oneMKL banner in:\n{stdout}"))
        .to_owned()
}

#[test]
fn this_test_binary_exports_the_override() {
    // build.rs links every executable of this package so; without it
    // oneMKL would call its own check and the status would say so.
    assert_ne!(status(), MklKernels::NotLinked);
    let amd = cpuinfo_field("vendor_id") == "AuthenticAMD";
    // This process may itself run under AVX2_ONLY (make test runs the
    // suite so), which leaves oneMKL as shipped.
    let capped = std::env::var("ATEN_CPU_CAPABILITY").is_ok_and(|v| v == "avx2")
        || !vit_msn::cpu::Cpu::detect().avx512();
    let opted_out = std::env::var(vit_msn::mkl::OPT_OUT).is_ok_and(|v| v == "0");
    assert_eq!(
        status() == MklKernels::Avx512OnAmd,
        amd && hardware_avx512() && !capped && !opted_out,
        "{status:?}",
        status = status()
    );
}

/// Environment variables for a child process.
type Env<'a> = &'a [(&'a str, &'a str)];

#[test]
fn onemkl_takes_avx512_kernels_on_amd_unless_capped_or_opted_out() {
    let bundle = bundle("mkl-case");
    let amd = cpuinfo_field("vendor_id") == "AuthenticAMD";
    let intel = cpuinfo_field("vendor_id") == "GenuineIntel";
    let avx512 = hardware_avx512();
    let off: &[(&str, &str)] = &[(vit_msn::mkl::OPT_OUT, "0")];
    let on: &[(&str, &str)] = &[(vit_msn::mkl::OPT_OUT, "1")];
    // (setting, whether oneMKL should name AVX-512). On Intel's CPUs oneMKL
    // picks as it ships whatever the setting; on AMD's only the override
    // gives it AVX-512, and only where ATen and oneDNN may use it too.
    let cases: [(&str, Env, bool); 3] = [
        ("as is", on, avx512 && (intel || amd)),
        ("opted out", off, avx512 && intel),
        ("as an AVX2-only CPU", AVX2_ONLY, avx512 && intel),
    ];
    for (what, env, want) in cases {
        let line = banner(&bundle, env);
        assert_eq!(line.contains("AVX-512"), want, "{what}: {line}");
    }
}

#[test]
fn f32_parity_holds_with_onemkl_as_shipped() {
    let bundle = bundle("mkl-shipped");
    let work = scratch("mkl-shipped-run");
    check_runs_env(CASE, &bundle, &work, &[], &[(vit_msn::mkl::OPT_OUT, "0")]);
}
