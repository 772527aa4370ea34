//! Data: the RRHF record, readers of the supported formats, tokenisation and batching.

pub mod error;
pub mod readers;
pub mod record;

pub use error::DataError;
pub use record::Record;
