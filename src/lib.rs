//! rrhf: align causal language models with human preferences by ranking responses (Yuan et al. 2023).
//!
//! The crate follows the pipeline: `data` → `sample` → `score` → `train` → `eval`, over a `model` layer.

pub mod bench;
pub mod data;
pub mod device;
pub mod model;
pub mod rng;
pub mod train;
