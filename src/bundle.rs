//! Loading a compiled bundle and running its forward pass.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::artifact::{Artifact, RawOutput};
use crate::cpu::{Cpu, CpuFeature};
use crate::cuda_graph::CudaGraph;
use crate::describe::{embedded_description, ArtifactDescription, ARTIFACT_EXTRA_FILE};
use crate::device::{check_available, device_name, parse_dtype};
use crate::error::{Error, Result};
use crate::fsutil::check_regular_file;
use crate::manifest::{ArtifactEntry, ImageResolution, Manifest, TensorSpec};
use crate::memory::check_memory;
use vit_msn_format::hex;

pub use vit_msn_format::sha256_hex;

pub use crate::error::first_line;
pub use crate::replace::{replace_artifact, replace_artifact_waiting};
pub use crate::writer::DEFAULT_LOCK_WAIT;

/// A bundle loaded on one device: one TorchScript module per resolution.
/// `Send + Sync`: share it across threads with `Arc`.
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    device: Device,
    kind: Kind,
    artifacts: Vec<(ArtifactEntry, Artifact)>,
    /// With [`LoadOptions::cuda_graphs`]: the graphs captured so far.
    graphs: Option<Mutex<Vec<(GraphKey, CudaGraph)>>>,
    /// Loaded with [`LoadOptions::pre_layernorm_cls`].
    pre_layernorm_cls: bool,
    /// The GEMM behind the linears, for f32 and int8 bundles on the CPU.
    cpu_linears: Option<CpuLinears>,
    /// Last, so it runs after the weights above are freed.
    _release: Option<crate::allocator::ReleaseOnDrop>,
}

/// A captured graph serves one artifact at one set of input shapes.
type GraphKey = (String, Vec<Vec<i64>>);

/// Captured graphs kept per bundle; each holds its batch's activations on the
/// GPU, so the oldest is dropped when a new shape would exceed this.
const MAX_CUDA_GRAPHS: usize = 8;

/// Forward passes on the capture stream before a capture.
const CUDA_GRAPH_WARMUP: u32 = 3;

/// How [`Bundle::load_with`] prepares the artifacts.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// On the CPU, reorder the oneDNN linear weights once at load rather
    /// than on every call (results unchanged; about 5% faster for
    /// vit-msn-small). Default on; off is for measuring it.
    pub prepack_linears: bool,
    /// On CUDA, capture each artifact's forward as a CUDA graph the first
    /// time an input shape is seen (the warm-up captures batch 1), and replay
    /// it after that: a small batch then costs one graph launch instead of a
    /// launch per op. Results are those of the eager forward. Up to 8 shapes
    /// are kept; concurrent forward calls take turns. Default off; an error
    /// on the CPU.
    pub cuda_graphs: bool,
    /// Load only the artifacts compiled at these (height, width); `None`, the
    /// default, loads them all. Every artifact's file is still verified
    /// against the manifest; those left out are not loaded, and a forward
    /// at their resolution is an error. A resolution the bundle was not
    /// compiled for is an error.
    pub resolutions: Option<Vec<(i64, i64)>>,
    /// Run each loaded artifact twice at load, so that the first real request
    /// is not TorchScript's profiling call (about twice as slow as a normal
    /// pass, and the second call still pays for optimising the graph).
    /// Default on; a process that makes a single request is faster without.
    pub warm_up: bool,
    /// Rewrite each backbone artifact so that [`Bundle::pre_layernorm_cls`]
    /// can return the CLS token before the final layer norm (MSN's low-shot
    /// features); [`Bundle::forward`] is unchanged. Default off; refused for
    /// classifier bundles and with CUDA graphs.
    pub pre_layernorm_cls: bool,
    /// On the CPU, set glibc's malloc to keep freed blocks for reuse
    /// ([`crate::allocator::keep_freed_memory`], process-wide): without it
    /// every pass page-faults its activations in afresh (a batch-8 int8
    /// pass of vit-msn-small took 1.7 times as long). `VIT_MSN_SYSTEM_MALLOC=1`
    /// or malloc settings in `GLIBC_TUNABLES` also leave malloc alone.
    /// Default on.
    pub keep_freed_memory: bool,
    /// On the CPU, whether each f32 oneDNN linear keeps GELU fused as its
    /// post-op (`Some(true)`) or is followed by a separate in-place GELU
    /// (`Some(false)`; the same function, measured within 1e-5). `None`, the
    /// default, splits on a CPU without AVX-512, where oneDNN's GELU post-op
    /// is slow (split, a vit-msn-small f32 pass on AMD Zen 3 is about 9%
    /// faster).
    pub fused_gelu: Option<bool>,
    /// On the CPU, which GEMM runs an f32 or int8 artifact's linears.
    /// `None`, the default, reads `VIT_MSN_CPU_LINEARS`, and without it
    /// takes [`CpuLinears::by_default`].
    pub cpu_linears: Option<CpuLinears>,
}

/// The GEMM behind a CPU artifact's linears. f32 artifacts run oneDNN or
/// oneMKL, int8 ones fbgemm or oneDNN; the two agree to f32 rounding (about
/// 1e-6 relative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLinears {
    /// f32: oneDNN's inner product, as compiled, its weight reordered once
    /// at load ([`LoadOptions::prepack_linears`]). int8: oneDNN's u8·s8
    /// inner product (`onednn::qlinear_pointwise`) on the artifact's int8
    /// weights, packed once at load, for inputs of at least
    /// [`INT8_ONEDNN_MIN_ROWS`] rows, after quantizing the activation
    /// exactly as fbgemm's `linear_dynamic` does (the integer sums are the
    /// same); fbgemm below that, where it is faster.
    OneDnn,
    /// f32 only: oneMKL's sgemm (`mkl::_mkl_linear`), its weight packed once
    /// at load for a batch of one image (`cblas_sgemm_pack`); other batch
    /// sizes run ATen's linear, which is oneMKL's sgemm on the dense weight,
    /// kept beside the packed one (so these linears' weights take twice the
    /// memory).
    Mkl,
    /// int8 only: fbgemm's `quantized::linear_dynamic`, as compiled.
    Fbgemm,
}

/// The environment variable that picks [`CpuLinears`] for every bundle a
/// process loads with the default options.
pub const CPU_LINEARS_ENV: &str = "VIT_MSN_CPU_LINEARS";

/// int8 with [`CpuLinears::OneDnn`]: inputs of fewer rows (images × tokens)
/// than this keep fbgemm, which is faster there on AMD Zen 3 (batch 1 about
/// 9% slower on oneDNN, batch 8 about 4% faster; docs/performance.md).
/// `VIT_MSN_INT8_ONEDNN_MIN_ROWS` overrides it (0: oneDNN for every input).
pub const INT8_ONEDNN_MIN_ROWS: i64 = 1000;

/// The environment variable that overrides [`INT8_ONEDNN_MIN_ROWS`].
pub const INT8_ONEDNN_MIN_ROWS_ENV: &str = "VIT_MSN_INT8_ONEDNN_MIN_ROWS";

fn int8_onednn_min_rows() -> Result<i64> {
    match std::env::var(INT8_ONEDNN_MIN_ROWS_ENV) {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<i64>() {
            Ok(rows) if rows >= 0 => Ok(rows),
            _ => Err(Error::input(
                INT8_ONEDNN_MIN_ROWS_ENV,
                format!("`{v}` is not a row count (a whole number, 0 or more)"),
            )),
        },
        _ => Ok(INT8_ONEDNN_MIN_ROWS),
    }
}

impl CpuLinears {
    /// `onednn`, `mkl` or `fbgemm`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "onednn" => Some(CpuLinears::OneDnn),
            "mkl" => Some(CpuLinears::Mkl),
            "fbgemm" => Some(CpuLinears::Fbgemm),
            _ => None,
        }
    }

    /// `onednn`, `mkl` or `fbgemm`, as [`CpuLinears::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            CpuLinears::OneDnn => "onednn",
            CpuLinears::Mkl => "mkl",
            CpuLinears::Fbgemm => "fbgemm",
        }
    }

    /// Whether this GEMM can run the linears of a `dtype` artifact.
    pub fn applies_to(self, dtype: &str) -> bool {
        match self {
            CpuLinears::OneDnn => matches!(dtype, "f32" | "int8"),
            CpuLinears::Mkl => dtype == "f32",
            CpuLinears::Fbgemm => dtype == "int8",
        }
    }

    /// One line for `vit-msn bench`, for a `dtype` bundle.
    pub fn describe(self, dtype: &str) -> String {
        match (self, dtype) {
            (CpuLinears::OneDnn, "int8") => format!(
                "oneDNN's u8·s8 GEMM from {} rows, fbgemm below (VIT_MSN_CPU_LINEARS=fbgemm for fbgemm throughout)",
                int8_onednn_min_rows().unwrap_or(INT8_ONEDNN_MIN_ROWS)
            ),
            (CpuLinears::OneDnn, _) => "oneDNN (VIT_MSN_CPU_LINEARS=mkl for oneMKL's sgemm)".into(),
            (CpuLinears::Mkl, _) => {
                "oneMKL's sgemm, packed for batch 1 (VIT_MSN_CPU_LINEARS=onednn for oneDNN)".into()
            }
            (CpuLinears::Fbgemm, _) => {
                "fbgemm (VIT_MSN_CPU_LINEARS=onednn for oneDNN's GEMM on larger batches)".into()
            }
        }
    }

    /// The default where neither the options nor the environment choose,
    /// only what was measured faster (on AMD Zen 3; on Zen 4 and on Intel's
    /// CPUs the alternatives are unmeasured, so the compiled ops stay). f32:
    /// oneMKL's sgemm on an AVX2 CPU on which oneMKL runs its AVX2 kernels
    /// because of the override, else oneDNN. int8: oneDNN (from
    /// [`INT8_ONEDNN_MIN_ROWS`] rows) on a CPU without AVX-512, else fbgemm.
    pub fn by_default(dtype: &str, avx512: bool, mkl: crate::mkl::MklKernels) -> Self {
        match dtype {
            "int8" if avx512 => CpuLinears::Fbgemm,
            "int8" => CpuLinears::OneDnn,
            _ if !avx512 && mkl == crate::mkl::MklKernels::AmdAsIntel => CpuLinears::Mkl,
            _ => CpuLinears::OneDnn,
        }
    }

    /// The options' choice, else the environment's, else
    /// [`CpuLinears::by_default`], for a `dtype` artifact; a choice that
    /// cannot run that dtype's linears is refused.
    pub fn resolve(chosen: Option<Self>, dtype: &str) -> Result<Self> {
        let (from, choice) = match chosen {
            Some(c) => ("cpu_linears", c),
            None => match std::env::var(CPU_LINEARS_ENV) {
                Ok(v) if !v.trim().is_empty() => (
                    CPU_LINEARS_ENV,
                    Self::parse(&v).ok_or_else(|| {
                        Error::input(
                            CPU_LINEARS_ENV,
                            format!("`{v}` is none of `onednn`, `mkl` and `fbgemm`"),
                        )
                    })?,
                ),
                _ => {
                    let avx512 = Cpu::detect().avx512();
                    return Ok(Self::by_default(dtype, avx512, crate::mkl::status()));
                }
            },
        };
        if choice.applies_to(dtype) {
            Ok(choice)
        } else {
            let options = if dtype == "int8" {
                "`fbgemm` or `onednn`"
            } else {
                "`onednn` or `mkl`"
            };
            Err(Error::input(
                from,
                format!("`{}` cannot run {dtype} linears: {options}", choice.name()),
            ))
        }
    }
}

impl LoadOptions {
    /// These options for a process that runs a bundle at one resolution and
    /// exits (a command line): only that artifact is loaded (the others'
    /// files are still verified), and without the load-time warm-up passes,
    /// which pay off only in a process that serves many requests. A
    /// resolution the bundle lacks is refused before anything loads, as the
    /// forward would refuse it.
    pub fn single_use(self, manifest: &Manifest, (height, width): (i64, i64)) -> Result<Self> {
        if !manifest.has_resolution(height, width) {
            return Err(Error::input(
                "pixel_values",
                manifest.not_compiled(height, width),
            ));
        }
        Ok(Self {
            resolutions: Some(vec![(height, width)]),
            warm_up: false,
            ..self
        })
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            prepack_linears: true,
            cuda_graphs: false,
            resolutions: None,
            warm_up: true,
            pre_layernorm_cls: false,
            keep_freed_memory: true,
            fused_gelu: None,
            cpu_linears: None,
        }
    }
}

/// The outputs of one forward pass, as f32 on the CPU.
#[derive(Debug)]
pub struct Output {
    /// (B, N+1, D), backbone bundles.
    pub last_hidden_state: Option<Tensor>,
    /// (B, num_labels), classification bundles.
    pub logits: Option<Tensor>,
    /// (layers+1, B, N+1, D), when compiled with hidden states.
    pub hidden_states: Option<Tensor>,
    /// (layers, B, heads, N+1, N+1), when compiled with attentions.
    pub attentions: Option<Tensor>,
}

impl Output {
    /// The named outputs that are present, in manifest order.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        [
            ("last_hidden_state", &self.last_hidden_state),
            ("logits", &self.logits),
            ("hidden_states", &self.hidden_states),
            ("attentions", &self.attentions),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.as_ref().map(|t| (n, t)))
        .collect()
    }
}

/// The sha256 of an open file from its start, read in small blocks.
pub(crate) fn sha256_of(mut file: &File) -> std::io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Loads a TorchScript file through a file that is already open (Linux:
/// `/proc/self/fd/N`), so what loads is what was checked even if another
/// file is renamed over `path` meanwhile. libtorch then reads the archive
/// record by record: loading from an in-memory buffer through tch would hold
/// three extra copies of the file at once (about 260 MB for vit-msn-small).
pub(crate) fn load_open_file(
    file: &File,
    path: &Path,
    device: Device,
) -> std::result::Result<Artifact, String> {
    let through_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if through_fd.exists() {
        Artifact::load(&through_fd, device)
    } else {
        Artifact::load(path, device)
    }
    .map_err(|e| first_line(&e))
}

/// The oneDNN kernel a `dtype` artifact's linears may use that this CPU
/// lacks, if any: their linears are then rewritten to aten::linear at load.
/// Decided by the dtype, not the manifest's `cpu_features`, since bundles
/// written before the manifest recorded them use the kernel too.
pub(crate) fn onednn_fallback(dtype: &str, device: Device) -> Option<CpuFeature> {
    CpuFeature::for_onednn_linear(dtype).filter(|f| device == Device::Cpu && !Cpu::detect().has(*f))
}

impl Bundle {
    /// Reads and checks the manifest, verifies every artifact's sha256, loads
    /// each on `device` and warms it up (see [`LoadOptions`] for loading
    /// fewer, or skipping the warm-up).
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        Self::load_with(dir, device, &LoadOptions::default())
    }

    /// [`Bundle::load`] with options.
    pub fn load_with(dir: impl AsRef<Path>, device: Device, options: &LoadOptions) -> Result<Self> {
        let manifest = Manifest::read(dir.as_ref())?;
        Self::load_manifest(dir, manifest, device, options)
    }

    /// Loads a bundle for a process that runs images at the size its
    /// preprocessing resizes them to, and exits (see
    /// [`LoadOptions::single_use`]).
    pub fn load_for_images(
        dir: impl AsRef<Path>,
        device: Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let manifest = Manifest::read(dir.as_ref())?;
        let pp = manifest.preprocessing()?;
        let at = (i64::from(pp.height), i64::from(pp.width));
        let options = options.single_use(&manifest, at)?;
        Self::load_manifest(dir, manifest, device, &options)
    }

    /// [`Bundle::load_with`] for a caller that has read the bundle's
    /// manifest already (to decide what to load): the artifacts are verified
    /// against that manifest, so what loads is what it describes.
    pub fn load_manifest(
        dir: impl AsRef<Path>,
        manifest: Manifest,
        device: Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if manifest.dtype == "int8" && device != Device::Cpu {
            return Err(Error::Device(format!(
                "{}: an int8 bundle runs on the CPU only (fbgemm's int8 kernels); it cannot load on {}",
                dir.display(),
                device_name(device)
            )));
        }
        check_available(device)?;
        if manifest.device.starts_with("cuda") && crate::device::cuda_device_count() == 0 {
            return Err(Error::Device(format!(
                "{}: the bundle was compiled for {}, and this machine has no CUDA device",
                dir.display(),
                manifest.device
            )));
        }
        let kind = parse_dtype(&manifest.dtype)?;
        let graphs = if options.cuda_graphs {
            if !matches!(device, Device::Cuda(_)) {
                return Err(Error::Device(format!(
                    "CUDA graphs need a CUDA device; this bundle is being loaded on {}",
                    device_name(device)
                )));
            }
            crate::cuda_graph::library_path()
                .map_err(|e| Error::Device(format!("CUDA graphs are not available: {e}")))?;
            Some(Mutex::new(Vec::new()))
        } else {
            None
        };
        if options.pre_layernorm_cls && (manifest.is_classifier() || graphs.is_some()) {
            return Err(Error::file(
                &dir,
                "the CLS token before the final layer norm comes from a backbone bundle, without CUDA graphs",
            ));
        }
        if let Some(wanted) = &options.resolutions {
            for &(height, width) in wanted {
                if !manifest.has_resolution(height, width) {
                    return Err(Error::input(
                        "resolutions",
                        manifest.not_compiled(height, width),
                    ));
                }
            }
        }
        let fallback = onednn_fallback(&manifest.dtype, device);
        // Only f32 and int8 CPU artifacts have linears to choose for.
        let choosable = matches!(manifest.dtype.as_str(), "f32" | "int8");
        let linears = if device == Device::Cpu && choosable && fallback.is_none() {
            Some(CpuLinears::resolve(options.cpu_linears, &manifest.dtype)?)
        } else {
            None
        };
        let mut release = None;
        if device == Device::Cpu {
            crate::cpu::warn_if_slow(&manifest.dtype, fallback);
            if options.keep_freed_memory {
                release = crate::allocator::ReleaseOnDrop::if_kept();
            }
        }
        let mut artifacts = Vec::new();
        for entry in &manifest.artifacts {
            let path = dir.join(&entry.file);
            check_regular_file(&path)?;
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let found = sha256_of(&file).map_err(|e| Error::io(&path, e))?;
            if found != entry.sha256 {
                return Err(Error::Digest {
                    path: path.display().to_string(),
                    expected: entry.sha256.clone(),
                    found,
                });
            }
            let bad = |message: String| Error::Artifact {
                path: path.display().to_string(),
                message,
            };
            if let Some(own) = embedded_description(&file) {
                check_against_description(entry, &own).map_err(bad)?;
            }
            let wanted = options
                .resolutions
                .as_ref()
                .is_none_or(|r| r.contains(&(entry.height, entry.width)));
            if !wanted {
                continue;
            }
            let mut module = load_open_file(&file, &path, device).map_err(bad)?;
            if options.pre_layernorm_cls {
                module.expose_pre_layernorm_cls().map_err(bad)?;
            }
            if fallback.is_some() {
                // oneDNN has no kernel for this dtype here: ATen's GEMM instead.
                module.unfuse_onednn_linears().map_err(bad)?;
            } else if device == Device::Cpu {
                let fused = options.fused_gelu.unwrap_or_else(|| Cpu::detect().avx512());
                if manifest.dtype == "f32" && !fused {
                    module.split_gelu_post_ops().map_err(bad)?;
                }
                let patch = manifest.model.patch_size.max(1);
                let tokens = (entry.height / patch) * (entry.width / patch) + 1;
                if manifest.dtype == "int8" && linears == Some(CpuLinears::OneDnn) {
                    let min_rows = int8_onednn_min_rows()?;
                    module
                        // Packed for batch 8, the size oneDNN was measured faster at.
                        .onednn_int8_linears(8 * tokens, min_rows)
                        .map_err(bad)?;
                }
                if linears == Some(CpuLinears::Mkl) {
                    // Those with a fused GELU left stay on oneDNN, packed below.
                    module.mkl_linears(tokens).map_err(bad)?;
                }
                if options.prepack_linears {
                    // Only an optimisation: a node whose weight could not be
                    // packed keeps its dense weight, and the graph stays valid.
                    let _ = module.prepack_linears(tokens);
                }
            }
            artifacts.push((entry.clone(), module));
        }
        let bundle = Self {
            dir,
            manifest,
            device,
            kind,
            artifacts,
            graphs,
            pre_layernorm_cls: options.pre_layernorm_cls,
            cpu_linears: linears,
            _release: release,
        };
        if options.warm_up {
            bundle.warm_up()?;
        }
        Ok(bundle)
    }

    /// TorchScript's profiling executor optimises the graph on the second call;
    /// make those calls now, so the first real request is not the slow one.
    fn warm_up(&self) -> Result<()> {
        for (entry, _) in &self.artifacts {
            let failed = |e: Error| Error::Artifact {
                path: self.dir.join(&entry.file).display().to_string(),
                message: format!("warm-up run failed: {e}"),
            };
            // The manifest's sizes are bounded, but a large resolution may
            // still not fit here: refuse it before allocating the input.
            check_memory(&self.manifest, entry, (self.kind, self.device), 1).map_err(failed)?;
            let c = self.manifest.model.num_channels;
            let pixel_values = Tensor::f_zeros(
                [1, c, entry.height, entry.width],
                (Kind::Float, Device::Cpu),
            )
            .map_err(|e| failed(Error::Forward(first_line(&e.to_string()))))?;
            for _ in 0..2 {
                self.forward(&pixel_values, None, None).map_err(failed)?;
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The GEMM behind the linears of an f32 or int8 bundle on the CPU
    /// (`None` otherwise: other dtypes and devices have one choice).
    pub fn cpu_linears(&self) -> Option<CpuLinears> {
        self.cpu_linears
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs the artifact compiled for the input's H×W.
    ///
    /// - `pixel_values`: (B, C, H, W), any float dtype; cast to the bundle's.
    /// - `bool_masked_pos`: (B, N) bool or integer, nonzero = masked; default none.
    /// - `head_mask`: (heads,) or (layers, heads), ≥ 0; default ones.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        head_mask: Option<&Tensor>,
    ) -> Result<Output> {
        let (entry, module) = self.artifact_for(pixel_values)?;
        let batch = pixel_values.size()[0];
        let patches = (entry.height / self.manifest.model.patch_size)
            * (entry.width / self.manifest.model.patch_size);
        let mask = self.check_mask(bool_masked_pos, batch, patches)?;
        let head_mask = self.check_head_mask(head_mask)?;
        // Fallible forms: a batch that does not fit on the GPU is an error.
        let pixel_values = pixel_values
            .f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(torch_error)?;
        let inputs = [&pixel_values, &mask, &head_mask];
        if let Some(graphs) = &self.graphs {
            return self.forward_graph(graphs, entry, module, &inputs, batch);
        }
        let result = module
            .forward(&inputs)
            .map_err(|e| Error::Forward(first_line(&e)))?;
        self.collect_outputs(entry, batch, result)
    }

    /// The CLS token of the last block's output before the final layer norm
    /// (transformers' `hidden_states[-1][:, 0]`), (B, D) as f32 on the CPU:
    /// what MSN's low-shot evaluation fits on. `pixel_values` as for
    /// [`Bundle::forward`], with no mask. Needs a backbone bundle loaded with
    /// [`LoadOptions::pre_layernorm_cls`].
    pub fn pre_layernorm_cls(&self, pixel_values: &Tensor) -> Result<Tensor> {
        if !self.pre_layernorm_cls {
            return Err(Error::input(
                "pixel_values",
                "the bundle was not loaded with LoadOptions::pre_layernorm_cls",
            ));
        }
        let (entry, module) = self.artifact_for(pixel_values)?;
        let batch = pixel_values.size()[0];
        let patches = (entry.height / self.manifest.model.patch_size)
            * (entry.width / self.manifest.model.patch_size);
        let mask = self.check_mask(None, batch, patches)?;
        let head_mask = self.check_head_mask(None)?;
        let pixel_values = pixel_values
            .f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(torch_error)?;
        let result = module
            .forward(&[&pixel_values, &mask, &head_mask])
            .map_err(|e| Error::Forward(first_line(&e)))?;
        let Some((_, cls)) = result
            .into_iter()
            .find(|(n, _)| n.as_deref() == Some("cls_pre_layernorm"))
        else {
            return Err(Error::Forward(format!(
                "{}: returned no cls_pre_layernorm",
                entry.file
            )));
        };
        let want = [batch, self.manifest.model.hidden_size];
        if cls.size() != want {
            return Err(Error::Forward(format!(
                "{}: cls_pre_layernorm has shape {:?}, expected {want:?}",
                entry.file,
                cls.size()
            )));
        }
        cls.f_to_kind(Kind::Float)
            .and_then(|t| t.f_to_device(Device::Cpu))
            .map_err(torch_error)
    }

    /// [`Bundle::forward`] through the CUDA graph for these input shapes,
    /// captured first if there is none yet.
    fn forward_graph(
        &self,
        graphs: &Mutex<Vec<(GraphKey, CudaGraph)>>,
        entry: &ArtifactEntry,
        module: &Artifact,
        inputs: &[&Tensor],
        batch: i64,
    ) -> Result<Output> {
        // A poisoned lock means a panic elsewhere mid-call; each graph is
        // still whole, since a replay rewrites all of its buffers.
        let mut graphs = graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (
            entry.file.clone(),
            inputs.iter().map(|t| t.size()).collect(),
        );
        let index = match graphs.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                if graphs.len() >= MAX_CUDA_GRAPHS {
                    graphs.remove(0);
                }
                let graph = CudaGraph::capture(module, inputs, CUDA_GRAPH_WARMUP).map_err(|e| {
                    Error::Forward(format!("CUDA graph capture failed: {}", first_line(&e)))
                })?;
                graphs.push((key, graph));
                graphs.len() - 1
            }
        };
        let result = graphs[index]
            .1
            .replay(inputs)
            .map_err(|e| Error::Forward(first_line(&e)))?;
        // Copied to the CPU before the lock is released: the next replay
        // overwrites the graph's outputs.
        self.collect_outputs(entry, batch, result)
    }

    fn artifact_for(&self, pixel_values: &Tensor) -> Result<&(ArtifactEntry, Artifact)> {
        let name = "pixel_values";
        let size = pixel_values.size();
        if size.len() != 4 {
            return Err(Error::input(
                name,
                format!("expected rank 4 (B, C, H, W), found shape {size:?}"),
            ));
        }
        if !pixel_values.is_floating_point() {
            return Err(Error::input(
                name,
                format!("expected a float tensor, found {:?}", pixel_values.kind()),
            ));
        }
        if size[0] == 0 {
            return Err(Error::input(name, "the batch is empty"));
        }
        let c = self.manifest.model.num_channels;
        if size[1] != c {
            return Err(Error::input(
                name,
                format!("expected {c} channel(s), found {}", size[1]),
            ));
        }
        let found = self.compiled(size[2], size[3])?;
        // Before touching the values: a batch that cannot fit fails here, cleanly.
        check_memory(&self.manifest, &found.0, (self.kind, self.device), size[0])?;
        let all_finite = pixel_values
            .f_isfinite()
            .and_then(|t| t.f_all())
            .and_then(|t| t.f_int64_value(&[]))
            .map_err(torch_error)?
            == 1;
        if !all_finite {
            return Err(Error::input(name, "contains NaN or infinite values"));
        }
        Ok(found)
    }

    /// The artifact compiled for `height`×`width`.
    fn compiled(&self, height: i64, width: i64) -> Result<&(ArtifactEntry, Artifact)> {
        if let Some(found) = self
            .artifacts
            .iter()
            .find(|(e, _)| (e.height, e.width) == (height, width))
        {
            return Ok(found);
        }
        let message = if self.manifest.has_resolution(height, width) {
            let loaded: Vec<String> = self
                .artifacts
                .iter()
                .map(|(e, _)| format!("{}x{}", e.height, e.width))
                .collect();
            format!(
                "resolution {height}x{width} was compiled but not loaded (loaded: {})",
                loaded.join(", ")
            )
        } else {
            self.manifest.not_compiled(height, width)
        };
        Err(Error::input("pixel_values", message))
    }

    /// Errors as [`Bundle::forward`] would for a batch of `batch` at
    /// `height`×`width` (resolution not compiled, batch too large for the
    /// memory available), without allocating it.
    pub fn check_batch(&self, batch: i64, height: i64, width: i64) -> Result<()> {
        if batch < 1 {
            return Err(Error::input("pixel_values", "the batch is empty"));
        }
        let (entry, _) = self.compiled(height, width)?;
        check_memory(&self.manifest, entry, (self.kind, self.device), batch)
    }

    /// Errors as [`Bundle::forward`] would for these inputs, with the same
    /// messages, without running it: a server checks each request this way
    /// before batching it with others, so one bad request fails alone.
    pub fn check_inputs(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        head_mask: Option<&Tensor>,
    ) -> Result<()> {
        let (entry, _) = self.artifact_for(pixel_values)?;
        let patches = (entry.height / self.manifest.model.patch_size)
            * (entry.width / self.manifest.model.patch_size);
        let _ = self.check_mask(bool_masked_pos, pixel_values.size()[0], patches)?;
        let _ = self.check_head_mask(head_mask)?;
        Ok(())
    }

    /// The (height, width) images run at for this bundle (see
    /// [`Manifest::image_resolution`]); an error listing the resolutions
    /// when the bundle does not say.
    pub fn image_size(&self) -> Result<(i64, i64)> {
        match self.manifest.image_resolution()? {
            ImageResolution::Preprocessing(size) | ImageResolution::OnlyCompiled { size, .. } => Ok(size),
            ImageResolution::Ambiguous { preprocessing: (h, w) } => Err(Error::input(
                "image",
                format!(
                    "the preprocessing resizes images to {h}x{w}, which this bundle was not compiled for (it has {})",
                    self.manifest.resolutions().join(", ")
                ),
            )),
        }
    }

    fn check_mask(&self, mask: Option<&Tensor>, batch: i64, patches: i64) -> Result<Tensor> {
        let name = "bool_masked_pos";
        let Some(mask) = mask else {
            return Tensor::f_zeros([batch, patches], (Kind::Bool, self.device))
                .map_err(torch_error);
        };
        if mask.size() != [batch, patches] {
            return Err(Error::input(
                name,
                format!(
                    "expected shape [{batch}, {patches}] (batch, patches), found {:?}",
                    mask.size()
                ),
            ));
        }
        let mask = match mask.kind() {
            Kind::Bool => mask.shallow_clone(),
            Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 => mask.ne(0),
            other => {
                return Err(Error::input(
                    name,
                    format!("expected bool or integer, found {other:?}"),
                ))
            }
        };
        mask.f_to_device(self.device).map_err(torch_error)
    }

    fn check_head_mask(&self, head_mask: Option<&Tensor>) -> Result<Tensor> {
        let name = "head_mask";
        let (layers, heads) = (
            self.manifest.model.num_hidden_layers,
            self.manifest.model.num_attention_heads,
        );
        let Some(hm) = head_mask else {
            return Tensor::f_ones([layers, heads], (self.kind, self.device)).map_err(torch_error);
        };
        if !hm.is_floating_point() {
            return Err(Error::input(
                name,
                format!("expected a float tensor, found {:?}", hm.kind()),
            ));
        }
        let hm = match hm.size().as_slice() {
            [h] if *h == heads => hm.unsqueeze(0).expand([layers, heads], false),
            [l, h] if *l == layers && *h == heads => hm.shallow_clone(),
            other => {
                return Err(Error::input(
                    name,
                    format!("expected shape [{heads}] or [{layers}, {heads}], found {other:?}"),
                ))
            }
        };
        let ok = hm
            .isfinite()
            .logical_and(&hm.ge(0.0))
            .all()
            .f_int64_value(&[])
            .unwrap_or(0)
            == 1;
        if !ok {
            return Err(Error::input(
                name,
                "entries must be finite and non-negative",
            ));
        }
        hm.f_to_kind(self.kind)
            .and_then(|t| t.f_to_device(self.device))
            .and_then(|t| t.f_contiguous())
            .map_err(torch_error)
    }

    fn collect_outputs(
        &self,
        entry: &ArtifactEntry,
        batch: i64,
        result: Vec<RawOutput>,
    ) -> Result<Output> {
        let mut named = outputs_by_name(&entry.outputs, result);
        let mut take = |name: &str| {
            named
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| {
                    named
                        .swap_remove(i)
                        .1
                        .f_to_kind(Kind::Float)
                        .and_then(|t| t.f_to_device(Device::Cpu))
                        .map_err(torch_error)
                })
                .transpose()
        };
        let out = Output {
            last_hidden_state: take("last_hidden_state")?,
            logits: take("logits")?,
            hidden_states: take("hidden_states")?,
            attentions: take("attentions")?,
        };
        // The manifest's shapes are what callers (and `labels`) rely on; an
        // artifact that disagrees is refused, at the latest in the warm-up.
        let named = out.named();
        for spec in &entry.outputs {
            let Some((_, t)) = named.iter().find(|(n, _)| *n == spec.name) else {
                return Err(Error::Forward(format!(
                    "{}: did not return `{}`, which the manifest lists",
                    entry.file, spec.name
                )));
            };
            let want: Vec<i64> = spec
                .shape
                .iter()
                .map(|&d| if d < 0 { batch } else { d })
                .collect();
            if t.size() != want {
                return Err(Error::Forward(format!(
                    "{}: returned `{}` of shape {:?}; the manifest says {want:?}",
                    entry.file,
                    spec.name,
                    t.size()
                )));
            }
        }
        Ok(out)
    }

    /// Where this bundle runs, for messages.
    pub fn device_name(&self) -> String {
        device_name(self.device)
    }
}

/// The manifest's specs for an artifact against the artifact's own
/// description: the digest proves the file is the one compiled, not that a
/// hand-edited manifest (layers, heads, classes) still describes it. Only
/// tensors both name are compared: `bundle replace` may swap in a file
/// with more outputs, and a file without a description is not checked.
pub(crate) fn check_against_description(
    entry: &ArtifactEntry,
    own: &ArtifactDescription,
) -> std::result::Result<(), String> {
    for (what, listed, theirs) in [
        ("input", &entry.inputs, &own.inputs),
        ("output", &entry.outputs, &own.outputs),
    ] {
        for spec in listed {
            if let Some(t) = theirs.iter().find(|t| t.name == spec.name) {
                if t.shape != spec.shape {
                    return Err(format!(
                        "the manifest gives {what} `{}` shape {:?}, but the artifact was compiled for {:?} (its {ARTIFACT_EXTRA_FILE})",
                        spec.name, spec.shape, t.shape
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A forward's result as named tensors: a dict by its keys; a tuple, list or
/// single tensor by the manifest's output order.
pub fn outputs_by_name(specs: &[TensorSpec], result: Vec<RawOutput>) -> Vec<(String, Tensor)> {
    let mut positional = specs.iter();
    result
        .into_iter()
        .filter_map(|(name, t)| match name {
            Some(name) => Some((name, t)),
            None => positional.next().map(|spec| (spec.name.clone(), t)),
        })
        .collect()
}

/// A libtorch error on the forward path (a batch too large for the GPU, say)
/// as a forward failure.
fn torch_error(e: tch::TchError) -> Error {
    Error::Forward(first_line(&e.to_string()))
}
