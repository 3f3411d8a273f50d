//! `embeddings`: patch projection, mask token, CLS token and position table.

use tch::{nn, Kind, Tensor};

use crate::Config;

/// `embeddings.patch_embeddings`: a P×P convolution with stride P.
pub struct PatchEmbeddings {
    projection: nn::Conv2D,
}

impl PatchEmbeddings {
    pub fn new(p: &nn::Path, cfg: &Config) -> Self {
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let projection = nn::conv2d(
            p / "projection",
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            conv,
        );
        Self { projection }
    }

    /// (B, C, H, W) → (B, N, D).
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        pixel_values
            .apply(&self.projection)
            .flatten(2, -1)
            .transpose(1, 2)
    }
}

pub struct Embeddings {
    cls_token: Tensor,
    mask_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: PatchEmbeddings,
    patch_size: i64,
    trained_grid: i64,
}

impl Embeddings {
    pub fn new(p: &nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        let grid = cfg.image_size / cfg.patch_size;
        Self {
            cls_token: p.zeros_no_train("cls_token", &[1, 1, d]),
            // Zero unless the checkpoint has one, as for a model saved without
            // use_mask_token.
            mask_token: p.zeros_no_train("mask_token", &[1, 1, d]),
            position_embeddings: p.zeros_no_train("position_embeddings", &[1, grid * grid + 1, d]),
            patch_embeddings: PatchEmbeddings::new(&(p / "patch_embeddings"), cfg),
            patch_size: cfg.patch_size,
            trained_grid: grid,
        }
    }

    /// The position table for an H×W input, as `interpolate_pos_encoding`
    /// computes it: the trained table when the grid is the trained one, else
    /// the patch rows resized bicubically to (H/P, W/P). Computed in f32 once,
    /// before tracing, so the artifact holds it as a constant.
    pub fn position_table(&self, height: i64, width: i64) -> Tensor {
        let (gh, gw) = (height / self.patch_size, width / self.patch_size);
        let table = self.position_embeddings.to_kind(Kind::Float);
        if gh == self.trained_grid && gw == self.trained_grid {
            return table;
        }
        let d = table.size()[2];
        let class_row = table.narrow(1, 0, 1);
        let patch_rows = table
            .narrow(1, 1, self.trained_grid * self.trained_grid)
            .reshape([1, self.trained_grid, self.trained_grid, d])
            .permute([0, 3, 1, 2])
            .upsample_bicubic2d([gh, gw], false, None, None)
            .permute([0, 2, 3, 1])
            .reshape([1, gh * gw, d]);
        Tensor::cat(&[class_row, patch_rows], 1)
    }

    /// (B, C, H, W) → (B, N+1, D). `bool_masked_pos` (B, N) replaces the
    /// masked patches by the mask token before the CLS token and positions.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: &Tensor,
        position_table: &Tensor,
    ) -> Tensor {
        let x = self.patch_embeddings.forward(pixel_values);
        // type_as, not to_kind: to_kind would record a fixed device in the trace.
        let mask = bool_masked_pos.unsqueeze(-1).type_as(&x);
        let x: Tensor = &x * (1.0 - &mask) + &self.mask_token * &mask;
        // expand_as keeps the batch dimension symbolic in the trace.
        let cls = self.cls_token.expand_as(&x.narrow(1, 0, 1));
        Tensor::cat(&[cls, x], 1) + position_table
    }
}
