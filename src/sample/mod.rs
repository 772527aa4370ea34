//! Sampling responses from a local model: the generation engine (greedy, beam search, diverse beam search,
//! top-k / top-p sampling with a KV cache and batched prompts).
//!
//! Files: decode (options, results, the model side [`Decoder`], log-softmax, stop checks, top-k: the primitives the
//! strategies share), strategy_* (greedy/sampling, beam, diverse beam), generate (checks options and dispatches to
//! a strategy), settings (the paper's presets and option spellings), text (stop strings, continuation, prompt
//! truncation), prompts, command (`rrhf sample`), bench (generation benchmarks).
//!
//! May import: `model`, `data`, `client` and the base modules (`progress` for the progress line); never another
//! stage.

pub mod args;
pub mod bench;
pub mod command;
pub mod decode;
pub mod generate;
pub mod plan;
pub mod prompts;
pub mod settings;
pub mod source;
pub mod strategy_beam;
pub mod strategy_group;
pub mod strategy_sample;
pub mod text;

pub use generate::{
    generate, Decoder, EarlyStopping, GenerateOptions, Generated, Logits, StopCheck, Strategy,
};
pub use strategy_sample::Warper;
