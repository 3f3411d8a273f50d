//! The vit-msn runtime: loads bundles of TorchScript artifacts compiled from
//! ViT-MSN checkpoints and runs their forward pass on CPU or CUDA.
//!
//! ```no_run
//! use vit_msn::{Bundle, Device};
//! let bundle = Bundle::load("artifacts/demo", Device::Cpu)?;
//! let pixel_values = tch::Tensor::zeros([1, 3, 224, 224], (tch::Kind::Float, tch::Device::Cpu));
//! let out = bundle.forward(&pixel_values, None, None)?;
//! println!("{:?}", out.logits.map(|l| l.size()));
//! # Ok::<(), vit_msn::Error>(())
//! ```
//!
//! This crate does not depend on the compiler (`vit-msn-graph`); build it with
//! `default-features = false` to leave the compiler out.

pub mod allocator;
pub mod artifact;
pub mod bare;
pub mod bundle;
pub mod classifier;
#[cfg(feature = "compiler")]
pub mod compiler;
pub mod cpu;
pub mod cuda_graph;
pub mod describe;
pub mod device;
pub mod error;
pub mod files;
pub mod fsutil;
pub mod image;
pub mod inputs;
pub mod loss;
pub mod manifest;
mod memory;
pub mod mkl;
pub mod replace;
pub mod tensors;
pub mod writer;

pub use bundle::{Bundle, Output};
pub use device::parse_device;
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use tch::Device;
