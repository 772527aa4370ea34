//! Evaluation: the trained model as a reward model (`rank`) and the paper's metrics for a set of models (`eval`:
//! average reward, perplexity, RM accuracy, best-of-n, training-data statistics).
//!
//! May import: `model`, `data`, `client`, the stages it evaluates with (`sample`, `score`) and the base modules;
//! never `train` (p_i comes from `model::seq_logprob`, the records from `data::prepare`).

pub mod command;
pub mod perplexity;
pub mod rank;
pub mod report;
