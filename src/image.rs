//! Images to `pixel_values`, as transformers' ViTImageProcessor computes them.
