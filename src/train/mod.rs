//! Training: the RRHF loss, optimizer, schedule and loop.
//!
//! Files: args (the flag groups `rrhf iterate` shares), loss (the paper's equations), optim (fused AdamW), schedule, precision (mixed precision), trainer (the
//! loop), checkpoint, output (previous runs in `--output`), log (metrics.jsonl), bench (train and AdamW benchmarks).
//!
//! May import: `model`, `data` and the base modules (`progress`, `plot`); never another stage.

pub mod args;
pub mod bench;
pub mod checkpoint;
pub mod log;
pub mod loss;
pub mod optim;
pub mod output;
pub mod precision;
pub mod schedule;
pub mod trainer;

/// The plots moved to [`crate::plot`] (below the stages, shared with `eval`); this path stays for callers.
pub use crate::plot;

impl From<crate::plot::PlotError> for trainer::TrainError {
    fn from(e: crate::plot::PlotError) -> Self {
        match e {
            crate::plot::PlotError::Io(e) => e.into(),
            crate::plot::PlotError::Draw(msg) => trainer::TrainError::Config(msg),
        }
    }
}
