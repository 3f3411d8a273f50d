//! oneMKL's kernels on AMD CPUs (src/mkl.rs): the executables
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

/// The best kernels oneMKL has for this CPU's feature bits, as it names
/// them in its banner (its AVX-512 ones need F, BW, VL and DQ).
#[derive(Debug, PartialEq)]
enum Kernels {
    Avx512,
    Avx2,
    Generic,
}

fn by_feature_bits() -> Kernels {
    let flags = cpuinfo_field("flags");
    let all: Vec<&str> = flags.split_whitespace().collect();
    if ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
        .iter()
        .all(|f| all.contains(f))
    {
        Kernels::Avx512
    } else if all.contains(&"avx2") {
        Kernels::Avx2
    } else {
        Kernels::Generic
    }
}

/// The kernels a banner line names.
fn named(line: &str) -> Kernels {
    if line.contains("AVX-512") {
        Kernels::Avx512
    } else if line.contains("AVX2") {
        Kernels::Avx2
    } else {
        Kernels::Generic
    }
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
    let opted_out = std::env::var(vit_msn::mkl::OPT_OUT).is_ok_and(|v| v == "0");
    assert_eq!(
        status() == MklKernels::AmdAsIntel,
        amd && by_feature_bits() != Kernels::Generic && !opted_out,
        "{status:?}",
        status = status()
    );
}

/// Environment variables for a child process.
type Env<'a> = &'a [(&'a str, &'a str)];

#[test]
fn onemkl_picks_by_feature_bits_on_amd_unless_opted_out() {
    let bundle = bundle("mkl-case");
    let vendor = cpuinfo_field("vendor_id");
    // Whether oneMKL picks by feature bits as shipped (Intel's CPUs) or
    // with the override (AMD's with AVX2); otherwise it runs its generic
    // kernels.
    let intel = vendor == "GenuineIntel";
    let told = vendor == "AuthenticAMD" && by_feature_bits() != Kernels::Generic;
    let by_bits = |picks: bool| {
        if picks {
            by_feature_bits()
        } else {
            Kernels::Generic
        }
    };
    // The AVX2 stand-in caps oneMKL (MKL_ENABLE_INSTRUCTIONS) as an
    // AVX2-only CPU has it.
    let capped = |picks: bool| match by_bits(picks) {
        Kernels::Avx512 => Kernels::Avx2,
        other => other,
    };
    let off: &[(&str, &str)] = &[(vit_msn::mkl::OPT_OUT, "0")];
    let on: &[(&str, &str)] = &[(vit_msn::mkl::OPT_OUT, "1")];
    let cases: [(&str, Env, Kernels); 3] = [
        ("as is", on, by_bits(intel || told)),
        ("opted out", off, by_bits(intel)),
        ("as an AVX2-only CPU", AVX2_ONLY, capped(intel || told)),
    ];
    for (what, env, want) in cases {
        let line = banner(&bundle, env);
        assert_eq!(named(&line), want, "{what}: {line}");
    }
}

#[test]
fn f32_parity_holds_with_onemkl_as_shipped() {
    let bundle = bundle("mkl-shipped");
    let work = scratch("mkl-shipped-run");
    check_runs_env(CASE, &bundle, &work, &[], &[(vit_msn::mkl::OPT_OUT, "0")]);
}
