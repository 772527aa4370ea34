//! Integration tests (one binary: each file in tests/ would link its own).

mod client;
mod common;
mod data;
mod demo;
mod dist;
mod errors;
mod eval;
mod fuzz;
mod generate;
mod gradients;
mod iterate;
mod loss;
mod packing;
mod precision;
mod reference;
mod reliability;
mod sample;
mod save;
mod score;
mod smollm2;
mod tokenizer;
mod train;
