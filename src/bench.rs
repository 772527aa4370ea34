//! Benchmarks printed as tables (`rrhf bench ...`). The code lives with what it measures: the model forward and
//! the table format in [`crate::model::bench`], generation in [`crate::sample::bench`], training in
//! [`crate::train::bench`], scoring in [`crate::score::bench`]; this module keeps the old paths.

pub use crate::model::bench::{format_table, BenchRow, ForwardBench};
pub use crate::sample::bench::{GenerateBench, RealGenerateBench, RealGenerateRow};
