//! Training: the RRHF loss, optimizer, schedule and loop.

pub mod loss;
pub mod optim;
pub mod plot;
pub mod schedule;
