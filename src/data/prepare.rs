//! Record preparation shared by the stages that read scored records (train, rank, the OP loop, benchmarks):
//! read a file, tokenise every record with the model's tokenizer, and check `--max-len` against the model.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::args::RecordArgs;
use super::readers::{read_records, ReadOutcome};
use super::tokenize::{tokenize_record, TokenizedRecord};
use super::DataError;
use crate::model::config::max_positions;
use crate::model::load::LoadedModel;

/// Records and tokenisation statistics of one input file.
pub struct Prepared {
    pub records: Vec<TokenizedRecord>,
    /// The file they came from and the 1-based line (or Parquet row) of each record, for messages.
    pub path: PathBuf,
    pub lines: Vec<usize>,
    pub skipped: usize,
    pub truncated_queries: usize,
    pub truncated_responses: usize,
}

impl Prepared {
    /// `FILE:LINE` of record `i`.
    pub fn origin(&self, i: usize) -> String {
        format!("{}:{}", self.path.display(), self.lines[i])
    }
}

/// Reads and tokenises a file of scored records.
pub fn prepare(path: &Path, args: &RecordArgs, m: &LoadedModel) -> Result<Prepared, DataError> {
    let read = read_records(path, &args.read_options(true))?;
    tokenize_all(path, read, args, m)
}

/// Tokenises records already read from `path`. A query that tokenises to no token at all (an empty query under a
/// tokenizer that adds no BOS) leaves the first response token nothing to be predicted from, so it is refused here
/// with its line rather than failing mid-run (`--skip-invalid` skips and counts it).
pub fn tokenize_all(
    path: &Path,
    read: ReadOutcome,
    args: &RecordArgs,
    m: &LoadedModel,
) -> Result<Prepared, DataError> {
    let opts = args.tokenize_options().map_err(DataError::Config)?;
    let mut records = Vec::with_capacity(read.records.len());
    let mut lines = Vec::with_capacity(read.records.len());
    let mut skipped = read.skipped.len();
    for (r, &line) in read.records.iter().zip(&read.lines) {
        let t = tokenize_record(&m.tokenizer, r, &opts)?;
        if t.query.is_empty() {
            if args.read.skip_invalid {
                skipped += 1;
                continue;
            }
            return Err(DataError::invalid(
                path,
                Some(line),
                Some("query"),
                "the query tokenises to zero tokens and this tokenizer adds no BOS, so the first response token \
                 has no position to be predicted from; give the record a non-empty query (or pass --skip-invalid)",
            ));
        }
        records.push(t);
        lines.push(line);
    }
    if records.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok(Prepared {
        truncated_queries: records.iter().filter(|r| r.query_truncated).count(),
        truncated_responses: records.iter().map(|r| r.responses_truncated).sum(),
        skipped,
        path: path.to_path_buf(),
        lines,
        records,
    })
}

/// Refuses a `--max-len` longer than the model's positions (read from its config), before any model work: GPT-2
/// would otherwise fail at the first batch with an index error, and rotary models would train on positions they
/// never saw.
pub fn check_max_len(max_len: usize, config: &Value, source: &Path) -> Result<(), DataError> {
    match max_positions(config) {
        Some((key, n)) if max_len > n => Err(DataError::Config(format!(
            "--max-len {max_len} is longer than the model's {key} = {n} ({}): a sequence cannot have more \
             positions than the model; pass --max-len {n} or less",
            source.display()
        ))),
        _ => Ok(()),
    }
}
