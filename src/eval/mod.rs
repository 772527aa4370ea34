//! Evaluation: the trained model as a reward model (`rank`) and the paper's metrics for a set of models (`eval`:
//! average reward, perplexity, RM accuracy, best-of-n, training-data statistics).

pub mod command;
pub mod perplexity;
pub mod rank;
pub mod report;
