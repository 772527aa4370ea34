//! The model layer: Hugging Face configs and weights, GGUF input, and differentiable causal LM forwards.

pub mod bert;
pub mod causal_lm;
pub mod config;
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
pub mod recompute;
pub mod reward;
pub mod save;
pub mod tokenizer;
pub mod weights;

pub use causal_lm::{CausalLm, Labels};
pub use config::ModelConfig;
pub use error::ModelError;
pub use input::Input;
pub use load::{load_model, LoadedModel};
pub use tokenizer::TextTokenizer;
pub use weights::Weights;
