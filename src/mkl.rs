//! oneMKL's AVX2 and AVX-512 kernels on AMD CPUs.
//!
//! The PyPI libtorch carries oneMKL 2024 inside `libtorch_cpu.so`, and
//! libtorch's f32 GEMMs on the CPU go to it: the matmuls inside
//! `scaled_dot_product_attention` and every `aten::linear`. oneMKL picks its
//! kernels by vendor before instruction set: on a CPU that is not Intel's it
//! runs its generic kernels ("Intel(R) Architecture processors" in its
//! `MKL_VERBOSE=1` banner), on AMD Zen 3 (AVX2) and Zen 4 (AVX-512, VNNI and
//! BF16, as Intel's Ice Lake and Sapphire Rapids have) alike. It asks two of
//! its own functions, `mkl_serv_intel_cpu` and `mkl_serv_intel_cpu_true`,
//! which `libtorch_cpu.so` exports and calls through its PLT, so a
//! definition in the executable takes their place. The ones below answer
//! "Intel" on an AMD CPU with AVX2 (see [`decide`]), and everywhere else
//! pass the question on to oneMKL's own; oneMKL then reads the CPU's feature
//! bits as it does on Intel's CPUs (and honours `MKL_ENABLE_INSTRUCTIONS`,
//! which the AVX2 stand-in sets). See docs/performance.md for what it gains.
//!
//! They take effect only in an executable that exports them: `vit-msn`,
//! this package's tests and benches (build.rs links them so). An
//! application that links this crate does the same with the two link
//! arguments build.rs prints; [`status`] says whether they are in effect.

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

use crate::cpu::Cpu;

/// The environment variable that, set to `0`, leaves oneMKL to pick its
/// kernels as it ships.
pub const OPT_OUT: &str = "VIT_MSN_MKL_AMD_AS_INTEL";

/// Whether oneMKL runs its AVX2 or AVX-512 kernels on this AMD CPU because
/// of this module, and if not, why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MklKernels {
    /// oneMKL is told the CPU is Intel's, and picks its kernels by the
    /// CPU's feature bits.
    AmdAsIntel,
    /// Not an AMD CPU with AVX2: oneMKL picks as it ships.
    AsShipped,
    /// `VIT_MSN_MKL_AMD_AS_INTEL=0`.
    OptedOut,
    /// This executable does not export the functions, so oneMKL calls its
    /// own (an application linking this crate without build.rs's link
    /// arguments, or Python).
    NotLinked,
}

impl MklKernels {
    /// One line for `vit-msn inspect` and `bench`.
    pub fn describe(self) -> &'static str {
        match self {
            MklKernels::AmdAsIntel => {
                "its kernels for this CPU's AVX2/AVX-512, as on Intel's (VIT_MSN_MKL_AMD_AS_INTEL=0 turns that off)"
            }
            MklKernels::AsShipped => "as it ships",
            MklKernels::OptedOut => "as it ships (VIT_MSN_MKL_AMD_AS_INTEL=0)",
            MklKernels::NotLinked => {
                "as it ships (this executable does not export mkl_serv_intel_cpu)"
            }
        }
    }
}

/// Whether to tell oneMKL it runs on Intel's CPU: on an AMD CPU with AVX2
/// (Zen and later; measured on Zen 3 and Zen 4, where oneMKL's generic
/// kernels are its slowest), unless the user opted out.
pub fn decide(amd: bool, avx2: bool, opt_out: Option<&str>) -> bool {
    amd && avx2 && opt_out.map(str::trim) != Some("0")
}

/// Whether the override answers "Intel" in this process (read once).
fn wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| {
        let opt_out = std::env::var(OPT_OUT).ok();
        decide(
            amd(),
            Cpu::detect().flags.contains("avx2"),
            opt_out.as_deref(),
        )
    })
}

/// Whether the CPU's vendor is AMD (CPUID leaf 0).
fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&leaf.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What oneMKL does here, as far as this module decides it.
pub fn status() -> MklKernels {
    let ours = mkl_serv_intel_cpu as extern "C" fn() -> c_int as *const c_void;
    // SAFETY: dlsym with a NUL-terminated name; the result is only compared.
    let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mkl_serv_intel_cpu".as_ptr()) };
    if found.cast_const() != ours {
        return MklKernels::NotLinked;
    }
    let opted_out = std::env::var(OPT_OUT).is_ok_and(|v| v.trim() == "0");
    match (wanted(), opted_out) {
        (true, _) => MklKernels::AmdAsIntel,
        (false, true) => MklKernels::OptedOut,
        (false, false) => MklKernels::AsShipped,
    }
}

type IntelCpuFn = unsafe extern "C" fn() -> c_int;

/// oneMKL's own `name`, the next definition after this executable's.
fn next(name: &'static CStr, cell: &'static OnceLock<Option<IntelCpuFn>>) -> Option<IntelCpuFn> {
    *cell.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; a non-null result is
        // oneMKL's function of this signature (int f(void)).
        let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, IntelCpuFn>(f) })
    })
}

fn answer(name: &'static CStr, cell: &'static OnceLock<Option<IntelCpuFn>>) -> c_int {
    if wanted() {
        return 1;
    }
    // SAFETY: oneMKL's own function, which takes nothing and returns an int.
    next(name, cell).map_or(0, |f| unsafe { f() })
}

/// oneMKL's "is this Intel's CPU", answered as described in the module docs.
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu() -> c_int {
    static NEXT: OnceLock<Option<IntelCpuFn>> = OnceLock::new();
    answer(c"mkl_serv_intel_cpu", &NEXT)
}

/// oneMKL's second form of the same question.
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu_true() -> c_int {
    static NEXT: OnceLock<Option<IntelCpuFn>> = OnceLock::new();
    answer(c"mkl_serv_intel_cpu_true", &NEXT)
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn only_amd_with_avx2_is_told_intel() {
        assert!(decide(true, true, None));
        assert!(decide(true, true, Some("1")));
        assert!(!decide(false, true, None));
        assert!(!decide(true, false, None));
        assert!(!decide(true, true, Some("0")));
        assert!(!decide(true, true, Some(" 0 ")));
    }
}
