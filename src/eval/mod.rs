//! Evaluation: the trained model as a reward model (`rank`).

pub mod rank;
