//! Data: the RRHF record, readers of the supported formats, tokenisation and batching.
//!
//! Files: record, readers/ (JSONL/.gz/Parquet, pairwise, hh-rlhf, Alpaca; writing), args (record flags), tokenize,
//! prepare (read + tokenise a file for train/rank/OP, `--max-len` check), batch (packed and padded batches).
//!
//! May import: `model` (tokenizer, input types) and the base modules; never a stage.

pub mod args;
pub mod batch;
pub mod error;
pub mod prepare;
pub mod readers;
pub mod record;
pub mod tokenize;

pub use error::DataError;
pub use record::{FinishReason, Record};
