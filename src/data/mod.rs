//! Data: the RRHF record, readers of the supported formats, tokenisation and batching.

pub mod args;
pub mod batch;
pub mod error;
pub mod prepare;
pub mod readers;
pub mod record;
pub mod tokenize;

pub use error::DataError;
pub use record::Record;
