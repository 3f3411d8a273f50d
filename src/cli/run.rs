use std::path::{Path, PathBuf};

use clap::Args;
use tch::Tensor;
use vit_msn::bare::BareArtifact;
use vit_msn::bundle::LoadOptions;
use vit_msn::inputs::collect_images;
use vit_msn::manifest::Manifest;
use vit_msn::tensors::{read_safetensors, write_safetensors};
use vit_msn::{loss::loss, Bundle};

use super::run_images::{compiled_size_for_images, run_images, Target};
use super::{device_arg, load_options, resolution_arg, usage, CliResult};

/// Run a bundle on images, or on tensors from a safetensors file.
#[derive(Args)]
#[command(
    after_help = "With --image, images (and folders, walked in name order) are preprocessed as the
bundle was compiled for, and run in batches. A classifier prints the top-k labels; a
backbone prints a summary of each CLS embedding (--embeddings saves them all).

With --inputs, IN holds pixel_values (f32, B×C×H×W) and optionally bool_masked_pos
(bool or u8, B×N), head_mask (f32, heads or layers×heads) and labels; OUT gets
last_hidden_state or logits, any compiled hidden_states / attentions (stacked), and
loss when labels were given, all as f32.

--head-mask lists heads to REMOVE: LAYER:HEADS groups joined by ';', HEADS a comma
list or '*', LAYER an index or '*'. \"0:1,3;5:*\" removes heads 1 and 3 of layer 0 and
all heads of layer 5.

Examples:
  vit-msn run --bundle artifacts/demo --image cat.jpg photos/ --top-k 3
  vit-msn run --bundle artifacts/small --image photos/ --embeddings emb.npy --json
  vit-msn run --bundle artifacts/small --image a.png --mask-ratio 0.3 --seed 7 --head-mask \"0:1,3;5:*\"
  vit-msn run --bundle artifacts/small --inputs in.safetensors --output out.safetensors"
)]
pub struct RunArgs {
    /// Bundle folder.
    #[arg(
        long,
        required_unless_present = "artifact",
        conflicts_with = "artifact"
    )]
    pub(super) bundle: Option<PathBuf>,
    /// A bare TorchScript file instead of a bundle: forward(pixel_values) or
    /// vit-msn's three inputs, returning a tensor, tuple or dict (see README).
    #[arg(long, conflicts_with = "inputs")]
    pub(super) artifact: Option<PathBuf>,
    /// Class names for --artifact: a JSON list, an {"0": name} map, or a config
    /// with id2label (they win over --model's).
    #[arg(long, requires = "artifact", conflicts_with = "bundle")]
    pub(super) labels: Option<PathBuf>,
    /// A Hugging Face folder giving --artifact its labels (id2label, if the
    /// config has one), preprocessing and sizes.
    #[arg(long, requires = "artifact", conflicts_with = "bundle")]
    pub(super) model: Option<PathBuf>,
    /// Image files or folders.
    #[arg(long, num_args = 1.., conflicts_with = "inputs")]
    pub(super) image: Vec<PathBuf>,
    /// Tensor inputs (safetensors).
    #[arg(long, requires = "output")]
    pub(super) inputs: Option<PathBuf>,
    /// Where --inputs mode writes the outputs (safetensors).
    #[arg(long)]
    pub(super) output: Option<PathBuf>,
    /// Labels to print per image (classifiers).
    #[arg(long, default_value_t = 5)]
    pub(super) top_k: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub(super) batch_size: usize,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    pub(super) json: bool,
    /// Mask this fraction of each image's patches with the mask token.
    #[arg(long, conflicts_with = "mask_file")]
    pub(super) mask_ratio: Option<f64>,
    /// Seed for --mask-ratio.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// bool_masked_pos from a safetensors file: (N,) for every image, or (images, N).
    #[arg(long)]
    pub(super) mask_file: Option<PathBuf>,
    /// Heads to remove, e.g. "0:1,3;5:*".
    #[arg(long, conflicts_with = "head_mask_file")]
    pub(super) head_mask: Option<String>,
    /// head_mask from a safetensors file: (heads,) or (layers, heads).
    #[arg(long)]
    pub(super) head_mask_file: Option<PathBuf>,
    /// Save the CLS embeddings (backbone bundles) as .safetensors or .npy.
    #[arg(long)]
    pub(super) embeddings: Option<PathBuf>,
    /// Preprocess to this compiled resolution (N or HxW) instead of the bundle's default.
    #[arg(long)]
    pub(super) resolution: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// Replay each batch shape's forward as a CUDA graph (CUDA bundles).
    #[arg(long, conflicts_with = "artifact")]
    pub(super) cuda_graphs: bool,
}

pub fn run(a: RunArgs) -> CliResult {
    let device = device_arg(&a.device)?;
    let options = load_options(a.cuda_graphs, device)?;
    if let Some(inputs) = &a.inputs {
        let output = a
            .output
            .as_ref()
            .ok_or_else(|| usage("--inputs needs --output"))?;
        let dir = a
            .bundle
            .as_ref()
            .ok_or_else(|| usage("--inputs needs --bundle"))?;
        vit_msn::files::check_result_file(output, &[inputs])?;
        return run_tensors(dir, device, options, inputs, output);
    }
    if a.image.is_empty() {
        return Err(usage(
            "give --image FILES/FOLDERS, or --inputs IN.safetensors --output OUT.safetensors",
        ));
    }
    if a.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if let Some(ratio) = a.mask_ratio {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(usage(format!("--mask-ratio {ratio} is not in [0, 1]")));
        }
    }
    if let Some(path) = &a.embeddings {
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("npy" | "safetensors")
        ) {
            return Err(usage(format!(
                "{}: --embeddings must end in .safetensors or .npy",
                path.display()
            )));
        }
        let inputs: Vec<&Path> = a.image.iter().map(PathBuf::as_path).collect();
        vit_msn::files::check_result_file(path, &inputs)?;
    }
    let images = collect_images(&a.image)?;
    match (&a.bundle, &a.artifact) {
        (Some(dir), _) => {
            // Before the (possibly long) load: the size the images will have.
            let manifest = Manifest::read(dir)?;
            let size = match &a.resolution {
                Some(_) => None,
                None => compiled_size_for_images(&manifest)?,
            };
            let at = match (&a.resolution, size) {
                (Some(r), _) => resolution_arg(r)?,
                (None, Some(size)) => size,
                (None, None) => {
                    let pp = manifest.preprocessing()?;
                    (i64::from(pp.height), i64::from(pp.width))
                }
            };
            let options = options.single_use(&manifest, at)?;
            let bundle = Bundle::load_manifest(dir, manifest, device, &options)?;
            let target = Target::bundle(&bundle)?;
            run_images(&target, &images, &a, size)
        }
        (None, Some(file)) => {
            if !matches!(device, tch::Device::Cpu) {
                return Err(usage(
                    "--artifact runs on the CPU; compile a bundle for CUDA",
                ));
            }
            let bare = BareArtifact::load(file)?;
            let target = Target::bare(&bare, &a)?;
            run_images(&target, &images, &a, None)
        }
        (None, None) => Err(usage("give --bundle DIR or --artifact FILE.pt")),
    }
}

fn run_tensors(
    dir: &Path,
    device: tch::Device,
    options: LoadOptions,
    inputs: &Path,
    output: &Path,
) -> CliResult {
    let tensors = read_safetensors(inputs)?;
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let pixel_values = get("pixel_values")
        .ok_or_else(|| format!("{}: no `pixel_values` tensor", inputs.display()))?;
    let manifest = Manifest::read(dir)?;
    let options = match pixel_values.size()[..] {
        [_, _, h, w] => options.single_use(&manifest, (h, w))?,
        _ => options,
    };
    let bundle = Bundle::load_manifest(dir, manifest, device, &options)?;
    let out = bundle.forward(pixel_values, get("bool_masked_pos"), get("head_mask"))?;
    let mut named: Vec<(&str, &Tensor)> = out.named();
    let loss_value;
    if let (Some(labels), Some(logits)) = (get("labels"), out.logits.as_ref()) {
        loss_value = loss(
            logits,
            labels,
            bundle.manifest().model.problem_type.as_deref(),
        )?;
        named.push(("loss", &loss_value));
    }
    write_safetensors(output, &named)?;
    Ok(())
}
