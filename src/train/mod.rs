//! Training: the RRHF loss, optimizer, schedule and loop.

pub mod bench;
pub mod checkpoint;
pub mod log;
pub mod loss;
pub mod optim;
pub mod output;
pub mod plot;
pub mod precision;
pub mod schedule;
pub mod trainer;
