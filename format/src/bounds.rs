//! Limits on what a bundle may state, enforced by the compiler on configs and
//! by the runtime on manifests. Far above any real ViT (ViT-22B: hidden 6144,
//! 48 layers, 48 heads; hyperspectral inputs have a few hundred bands), and
//! small enough that every product of them stays well inside i64.

pub const MAX_HIDDEN_SIZE: i64 = 65536;
pub const MAX_LAYERS: i64 = 4096;
pub const MAX_HEADS: i64 = 4096;
pub const MAX_CHANNELS: i64 = 1024;
/// Largest side of a resolution, and of an image the preprocessing resizes to.
pub const MAX_SIDE: u32 = 16384;
/// Most patches per image: 512×512 of them (8192² pixels at patch 16). The
/// trace holds several (2, tokens, hidden) activations, so more would exhaust
/// memory long before anyone could run the artifact.
pub const MAX_PATCHES: i64 = 1 << 18;
/// Most parameters a config may describe.
pub const MAX_PARAMETERS: i64 = 1 << 32;
/// Most labels a classifier may have.
pub const MAX_LABELS: i64 = 1 << 24;
