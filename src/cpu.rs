//! What this CPU offers libtorch, and which CPU features an artifact uses.
//!
//! Bundles are compiled on one machine and run on others, and x86-64 CPUs
//! differ: an AVX2-only one (AMD Zen 3) has no oneDNN kernel for a bf16 or
//! f16 inner product at all, and computes bf16 and f16 far slower than f32.
//! The compiler records what an artifact needs ([`CpuFeature`]); the runtime
//! compares it with [`Cpu::detect`] at load.
//!
//! The instruction sets are read from `/proc/cpuinfo` (the kernel's flags
//! already account for what the OS enabled) and capped, as oneDNN caps them,
//! by `ONEDNN_MAX_CPU_ISA` (or its older name `DNNL_MAX_CPU_ISA`): a machine
//! told `ONEDNN_MAX_CPU_ISA=AVX2` behaves as an AVX2-only one, here and in
//! libtorch alike.

use std::collections::BTreeSet;
use std::sync::OnceLock;

pub use vit_msn_format::CpuFeature;

/// oneDNN's x86-64 instruction-set levels, lowest first, by the names
/// `ONEDNN_MAX_CPU_ISA` takes. AVX2-VNNI-2 stands beside them (see
/// [`Cpu::avx2_vnni_2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Isa {
    Sse41,
    Avx,
    Avx2,
    Avx2Vnni,
    Avx512Core,
    Avx512CoreVnni,
    Avx512CoreBf16,
    Avx512CoreFp16,
    Avx512CoreAmx,
    Avx512CoreAmxFp16,
}

impl Isa {
    /// An `ONEDNN_MAX_CPU_ISA` value; `None` for `ALL`, unset or unknown
    /// (oneDNN ignores a value it does not know).
    fn from_env_value(v: &str) -> Option<(Isa, bool)> {
        // (level, whether AVX2-VNNI-2 stays allowed)
        Some(match v.trim().to_ascii_uppercase().as_str() {
            "SSE41" => (Isa::Sse41, false),
            "AVX" => (Isa::Avx, false),
            "AVX2" => (Isa::Avx2, false),
            "AVX2_VNNI" => (Isa::Avx2Vnni, false),
            "AVX2_VNNI_2" => (Isa::Avx2Vnni, true),
            "AVX512_CORE" => (Isa::Avx512Core, false),
            "AVX512_CORE_VNNI" => (Isa::Avx512CoreVnni, false),
            "AVX512_CORE_BF16" => (Isa::Avx512CoreBf16, false),
            "AVX512_CORE_FP16" | "AVX10_1_512" => (Isa::Avx512CoreFp16, true),
            "AVX512_CORE_AMX" | "AVX10_1_512_AMX" => (Isa::Avx512CoreAmx, true),
            "AVX512_CORE_AMX_FP16" | "AVX10_1_512_AMX_FP16" => (Isa::Avx512CoreAmxFp16, true),
            _ => return None,
        })
    }
}

/// The CPU features that matter to libtorch's kernels, as this process sees them.
#[derive(Debug, Clone)]
pub struct Cpu {
    /// `model name` from /proc/cpuinfo.
    pub model: String,
    /// The relevant /proc/cpuinfo flags the hardware reports.
    pub flags: BTreeSet<String>,
    /// `ONEDNN_MAX_CPU_ISA` when it caps what oneDNN may use.
    pub onednn_max_isa: Option<String>,
    level: Isa,
    avx2_vnni_2: bool,
}

/// The /proc/cpuinfo flags that decide a kernel, shown by `inspect` and `bench`.
const RELEVANT_FLAGS: &[&str] = &[
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx_vnni_int8",
    "avx_ne_convert",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
];

impl Cpu {
    /// This machine, read once per process.
    pub fn detect() -> &'static Cpu {
        static CPU: OnceLock<Cpu> = OnceLock::new();
        CPU.get_or_init(|| {
            let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let cap = std::env::var("ONEDNN_MAX_CPU_ISA")
                .or_else(|_| std::env::var("DNNL_MAX_CPU_ISA"))
                .ok();
            Cpu::from_cpuinfo(&info, cap.as_deref())
        })
    }

    /// From /proc/cpuinfo's text and an `ONEDNN_MAX_CPU_ISA` value.
    pub fn from_cpuinfo(info: &str, onednn_max_isa: Option<&str>) -> Cpu {
        let field = |name: &str| {
            info.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let all: BTreeSet<&str> = flags.split_whitespace().collect();
        let has = |f: &str| all.contains(f);
        let hw = if !has("avx2") {
            if has("avx") {
                Isa::Avx
            } else {
                Isa::Sse41
            }
        } else if !["avx512f", "avx512bw", "avx512vl", "avx512dq"]
            .iter()
            .all(|f| has(f))
        {
            if has("avx_vnni") {
                Isa::Avx2Vnni
            } else {
                Isa::Avx2
            }
        } else if has("amx_tile") && has("amx_bf16") && has("avx512_fp16") && has("amx_fp16") {
            Isa::Avx512CoreAmxFp16
        } else if has("amx_tile") && has("amx_bf16") && has("avx512_bf16") {
            Isa::Avx512CoreAmx
        } else if has("avx512_fp16") && has("avx512_bf16") {
            Isa::Avx512CoreFp16
        } else if has("avx512_bf16") {
            Isa::Avx512CoreBf16
        } else if has("avx512_vnni") {
            Isa::Avx512CoreVnni
        } else {
            Isa::Avx512Core
        };
        let hw_vnni_2 = has("avx_ne_convert") && has("avx_vnni_int8");
        let cap = onednn_max_isa.and_then(Isa::from_env_value);
        let (level, avx2_vnni_2) = match cap {
            Some((max, vnni_2)) => (hw.min(max), hw_vnni_2 && vnni_2),
            None => (hw, hw_vnni_2),
        };
        Cpu {
            model: field("model name"),
            flags: RELEVANT_FLAGS
                .iter()
                .filter(|f| has(f))
                .map(|f| f.to_string())
                .collect(),
            onednn_max_isa: cap.and(onednn_max_isa.map(|s| s.trim().to_owned())),
            level,
            avx2_vnni_2,
        }
    }

    /// Whether oneDNN can run `feature`'s kernels here.
    pub fn has(&self, feature: CpuFeature) -> bool {
        self.avx2_vnni_2
            || match feature {
                CpuFeature::OnednnBf16 => self.level >= Isa::Avx512Core,
                CpuFeature::OnednnF16 => self.level >= Isa::Avx512CoreFp16,
            }
    }

    /// Whether oneDNN may use AVX-512 here. Without it (AVX2), oneDNN's GELU
    /// post-op makes the fused linear slower than the linear and a separate
    /// GELU, so the runtime splits them at load.
    pub fn avx512(&self) -> bool {
        self.level >= Isa::Avx512Core
    }

    /// Whether `dtype` (`f32`, `f16`, `bf16`) has instructions of its own
    /// here. Without them libtorch converts every element to f32 and back,
    /// which makes bf16 and f16 several times slower than f32.
    pub fn native(&self, dtype: &str) -> bool {
        match dtype {
            "bf16" => self.avx2_vnni_2 || self.level >= Isa::Avx512CoreBf16,
            "f16" => self.avx2_vnni_2 || self.level >= Isa::Avx512CoreFp16,
            _ => true,
        }
    }

    /// The features of `wanted` that this CPU lacks.
    pub fn missing(&self, wanted: &[CpuFeature]) -> Vec<CpuFeature> {
        wanted.iter().copied().filter(|f| !self.has(*f)).collect()
    }

    /// One line for a bf16 or f16 bundle on a CPU without native support for
    /// its dtype; `None` for f32 or where the dtype is native.
    pub fn slow_dtype_warning(&self, dtype: &str) -> Option<String> {
        if self.native(dtype) {
            return None;
        }
        let needs = match dtype {
            "bf16" => "avx512_bf16, amx_bf16 or AVX2-VNNI-2",
            _ => "avx512_fp16 or AVX2-VNNI-2",
        };
        Some(format!(
            "warning: this CPU has no native {dtype} arithmetic ({needs}{}), so {dtype} runs several times slower than f32 here: compile with --dtype f32 for this CPU",
            self.cap_note()
        ))
    }

    fn cap_note(&self) -> String {
        match &self.onednn_max_isa {
            Some(cap) => format!("; ONEDNN_MAX_CPU_ISA={cap} caps it"),
            None => String::new(),
        }
    }

    /// `model: flags`, with the oneDNN cap if any, for `inspect` and `bench`.
    pub fn summary(&self) -> String {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let model = if self.model.is_empty() {
            "unknown CPU"
        } else {
            &self.model
        };
        let mut s = format!("{model}: {}", flags.join(" "));
        if let Some(cap) = &self.onednn_max_isa {
            s.push_str(&format!(" (oneDNN capped at {cap} by ONEDNN_MAX_CPU_ISA)"));
        }
        s
    }
}

/// Physical cores of this machine (distinct core ids per package), the
/// default for intra-op threads; logical CPUs where /proc does not say.
pub fn physical_cores() -> i64 {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::BTreeSet::new();
    let mut package = String::new();
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => package = v.trim().to_owned(),
                "core id" => {
                    cores.insert((package.clone(), v.trim().to_owned()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        (cores.len() as i64).min(logical)
    }
}

/// A bundle's features for `inspect` and `bench`: their names, or that it
/// needs none.
pub fn cpu_features_text(features: &[CpuFeature]) -> String {
    if features.is_empty() {
        return "no CPU-specific kernels (runs on every x86-64 CPU)".into();
    }
    features
        .iter()
        .map(|f| format!("{f} ({})", f.needs()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes [`Cpu::slow_dtype_warning`] to stderr, once per dtype per
/// process; `fallback` names the oneDNN kernel that this CPU lacks, whose
/// linears then run through ATen's GEMM.
pub fn warn_if_slow(dtype: &str, fallback: Option<CpuFeature>) {
    static WARNED: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let Some(mut line) = Cpu::detect().slow_dtype_warning(dtype) else {
        return;
    };
    if let Some(f) = fallback {
        line.push_str(&format!(
            "; its {f} linears run as aten::linear, since this CPU lacks {}",
            f.needs()
        ));
    }
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.insert(dtype.to_owned()) {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN3: &str =
        "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_1 avx avx2 fma f16c vaes\n";
    const ZEN4: &str = "model name\t: AMD EPYC 9B14\nflags\t\t: avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16\n";
    const SPR: &str = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx avx2 fma avx_vnni avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16\n";

    #[test]
    fn levels() {
        let zen3 = Cpu::from_cpuinfo(ZEN3, None);
        assert!(!zen3.has(CpuFeature::OnednnBf16) && !zen3.native("bf16"));
        assert_eq!(zen3.model, "AMD EPYC 7B13");
        let zen4 = Cpu::from_cpuinfo(ZEN4, None);
        assert!(zen4.has(CpuFeature::OnednnBf16) && zen4.native("bf16"));
        assert!(!zen4.has(CpuFeature::OnednnF16) && !zen4.native("f16"));
        let spr = Cpu::from_cpuinfo(SPR, None);
        assert!(spr.has(CpuFeature::OnednnF16) && spr.native("f16") && spr.native("bf16"));
    }

    #[test]
    fn onednn_cap() {
        let capped = Cpu::from_cpuinfo(SPR, Some("avx2"));
        assert!(!capped.has(CpuFeature::OnednnBf16) && !capped.native("bf16"));
        assert!(capped.slow_dtype_warning("bf16").is_some());
        assert!(capped.summary().contains("capped at avx2"));
        // AVX-512 without bf16 instructions: the kernel exists, emulated.
        let core = Cpu::from_cpuinfo(SPR, Some("AVX512_CORE"));
        assert!(core.has(CpuFeature::OnednnBf16) && !core.native("bf16"));
        // An unknown value caps nothing, as in oneDNN.
        let odd = Cpu::from_cpuinfo(SPR, Some("nonsense"));
        assert!(odd.native("f16") && odd.onednn_max_isa.is_none());
        assert!(Cpu::from_cpuinfo(SPR, None)
            .slow_dtype_warning("f32")
            .is_none());
    }
}
