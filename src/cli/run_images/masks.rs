//! The masks `run --image` applies: `--head-mask` or `--head-mask-file`
//! (heads to remove), and `--mask-file` or `--mask-ratio` (patches to mask).

use std::path::Path;

use tch::Tensor;
use vit_msn::inputs::{parse_head_mask, random_mask};
use vit_msn::tensors::read_safetensors;
use vit_msn::Error;

use super::Target;
use crate::cli::run::RunArgs;
use crate::cli::usage;

pub fn head_mask_of(
    target: &Target,
    a: &RunArgs,
) -> Result<Option<Tensor>, Box<dyn std::error::Error>> {
    if let Some(spec) = &a.head_mask {
        let (layers, heads) = target.heads.ok_or_else(|| {
            usage("--head-mask needs the layer and head counts: give --model with the artifact")
        })?;
        return Ok(Some(parse_head_mask(spec, layers, heads).map_err(usage)?));
    }
    if let Some(file) = &a.head_mask_file {
        return Ok(Some(single_tensor(file, "head_mask")?));
    }
    Ok(None)
}

/// Where each batch's `bool_masked_pos` comes from.
pub struct PatchMasks {
    /// `--mask-file`'s tensor: (patches,) for every image, or (images, patches).
    file: Option<Tensor>,
    ratio: Option<f64>,
    seed: u64,
    /// Patches per image, where the patch size is known.
    patches: Option<i64>,
    /// How many images the command runs.
    images: usize,
}

impl PatchMasks {
    pub fn read(
        a: &RunArgs,
        patches: Option<i64>,
        images: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let file = match &a.mask_file {
            Some(f) => Some(single_tensor(f, "bool_masked_pos")?),
            None => None,
        };
        Ok(Self {
            file,
            ratio: a.mask_ratio,
            seed: a.seed,
            patches,
            images,
        })
    }

    /// The mask of images `start..start + len`, if any.
    pub fn for_images(
        &self,
        start: usize,
        len: usize,
    ) -> Result<Option<Tensor>, Box<dyn std::error::Error>> {
        let (start, n, total) = (start as i64, len as i64, self.images as i64);
        Ok(match (&self.file, self.ratio) {
            (Some(m), _) if m.dim() == 1 => Some(m.unsqueeze(0).expand([n, m.size()[0]], false)),
            (Some(m), _) if m.dim() == 2 && m.size()[0] == total => Some(m.narrow(0, start, n)),
            (Some(m), _) => {
                return Err(Error::input(
                    "bool_masked_pos",
                    format!(
                        "--mask-file holds shape {:?}; expected [patches] or [{}, patches]",
                        m.size(),
                        self.images
                    ),
                )
                .into())
            }
            // One draw over all images, so results do not depend on --batch-size.
            (None, Some(ratio)) => {
                let patches = self.patches.ok_or_else(|| {
                    usage("masking needs the patch size: give --model with the artifact")
                })?;
                Some(random_mask(total, patches, ratio, self.seed)?.narrow(0, start, n))
            }
            (None, None) => None,
        })
    }
}

/// The tensor named `name` in a safetensors file, or its only tensor.
fn single_tensor(file: &Path, name: &str) -> Result<Tensor, Box<dyn std::error::Error>> {
    let mut tensors = read_safetensors(file)?;
    if let Some(i) = tensors.iter().position(|(n, _)| n == name) {
        return Ok(tensors.swap_remove(i).1);
    }
    match tensors.len() {
        1 => Ok(tensors.swap_remove(0).1),
        _ => Err(Error::file(file, format!("no tensor named `{name}`")).into()),
    }
}
