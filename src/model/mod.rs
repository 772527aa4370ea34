//! The model layer: Hugging Face configs and weights, GGUF input, and differentiable causal LM forwards.
//!
//! Files: config, weights (safetensors) and pickle (PyTorch `.pt`), gguf/ (GGUF input), load, save, tokenizer, the
//! architectures (llama, gpt2, gpt_neox, gpt_j, bert), ops (composed primitives) below layers and the fused CPU ops
//! (`fused*.rs`), causal_lm, recompute (gradient checkpointing), kv_cache + decode_matmul + decode_pool (decoding),
//! seq_logprob (p_i, Eq. 1), reward (reward-model loading), init, bench (forward benchmark, table format).
//!
//! May import: the base modules (`fsutil`, `rng`, `device`) only; never `data` or a stage.

pub mod bench;
pub mod bert;
pub mod causal_lm;
pub mod config;
pub mod decode_matmul;
mod decode_pool;
pub mod error;
pub mod fused;
pub mod fused_attention;
pub mod fused_elementwise;
pub mod fused_head;
pub mod fused_linear;
pub mod fused_proj;
pub mod gguf;
pub mod gpt2;
pub mod gpt_j;
pub mod gpt_neox;
pub mod init;
pub mod input;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod load;
pub mod ops;
pub mod pickle;
pub mod recompute;
pub mod reward;
pub mod save;
pub mod seq_logprob;
pub mod tokenizer;
pub mod weights;

pub use causal_lm::{CausalLm, Labels};
pub use config::ModelConfig;
pub use error::ModelError;
pub use input::Input;
pub use load::{load_model, LoadedModel};
pub use tokenizer::TextTokenizer;
pub use weights::Weights;
