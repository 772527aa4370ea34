//! Sampling responses from a local model: the generation engine (greedy, beam search, diverse beam search,
//! top-k / top-p sampling with a KV cache and batched prompts).

pub mod bench;
pub mod command;
pub mod decode;
pub mod generate;
pub mod prompts;
pub mod settings;
pub mod strategy_beam;
pub mod strategy_group;
pub mod strategy_sample;
pub mod text;

pub use generate::{
    generate, Decoder, EarlyStopping, GenerateOptions, Generated, Logits, StopCheck, Strategy,
};
pub use strategy_sample::Warper;
