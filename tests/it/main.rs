//! Integration tests (one binary: each file in tests/ would link its own).

mod common;
mod errors;
mod gradients;
mod packing;
mod reference;
mod save;
mod smollm2;
mod tokenizer;
