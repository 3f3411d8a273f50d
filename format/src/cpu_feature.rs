//! CPU features an artifact's kernels may depend on, as manifests and
//! artifact descriptions record them. Which CPUs have them is the runtime's
//! business (`vit_msn::cpu`).

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuFeature {
    /// oneDNN's bf16 inner product (`--linear onednn` in bf16): AVX-512
    /// (F, BW, VL, DQ) or AVX2-VNNI-2.
    OnednnBf16,
    /// oneDNN's f16 inner product (`--linear onednn` in f16): AVX512-FP16
    /// or AVX2-VNNI-2.
    OnednnF16,
}

impl CpuFeature {
    pub fn name(self) -> &'static str {
        match self {
            CpuFeature::OnednnBf16 => "onednn_bf16",
            CpuFeature::OnednnF16 => "onednn_f16",
        }
    }

    /// The instruction sets that provide it, for messages.
    pub fn needs(self) -> &'static str {
        match self {
            CpuFeature::OnednnBf16 => {
                "AVX-512 (avx512f, avx512bw, avx512vl, avx512dq) or AVX2-VNNI-2"
            }
            CpuFeature::OnednnF16 => "AVX512-FP16 (avx512_fp16) or AVX2-VNNI-2",
        }
    }

    /// The feature that oneDNN's linear needs in `dtype` (`f32`, `f16`,
    /// `bf16`); none for f32, whose kernels run on every x86-64 CPU.
    pub fn for_onednn_linear(dtype: &str) -> Option<CpuFeature> {
        match dtype {
            "bf16" => Some(CpuFeature::OnednnBf16),
            "f16" => Some(CpuFeature::OnednnF16),
            _ => None,
        }
    }
}

impl fmt::Display for CpuFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
