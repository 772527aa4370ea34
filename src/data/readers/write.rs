//! Writing records as JSONL, atomically (`crate::fsutil`).

use std::path::Path;

use crate::data::error::DataError;
use crate::data::record::Record;

/// Writes records as JSONL atomically (temp file in the same dir + rename); NaN/inf scores are refused with an error
/// naming the record index.
///
/// Records that could not be read back are refused too (zero responses, `len(scores)` or `len(sources)` differing
/// from `len(responses)`); nothing is written then. The error's line is the line the record would have had.
pub fn write_records(path: &Path, records: &[Record]) -> Result<(), DataError> {
    for (i, r) in records.iter().enumerate() {
        check(path, i, r)?;
    }
    crate::fsutil::write_atomic_with(path, |w| {
        for r in records {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(())
}

fn check(path: &Path, i: usize, r: &Record) -> Result<(), DataError> {
    let bad = |field: &str, msg: String| {
        DataError::invalid(path, Some(i + 1), Some(field), format!("record {i}: {msg}"))
    };
    if r.responses.is_empty() {
        return Err(bad("responses", "zero responses".into()));
    }
    if let Some(s) = &r.scores {
        if s.len() != r.responses.len() {
            return Err(bad(
                "scores",
                format!("{} scores for {} responses", s.len(), r.responses.len()),
            ));
        }
        if let Some((j, x)) = s.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(bad(
                &format!("scores[{j}]"),
                format!(
                    "score {x} is not finite; refusing to write it (JSON has no NaN or infinity)"
                ),
            ));
        }
    }
    if let Some(src) = &r.sources {
        if src.len() != r.responses.len() {
            return Err(bad(
                "sources",
                format!("{} sources for {} responses", src.len(), r.responses.len()),
            ));
        }
    }
    if let Some(f) = &r.finish_reasons {
        if f.len() != r.responses.len() {
            return Err(bad(
                "finish_reasons",
                format!(
                    "{} finish reasons for {} responses",
                    f.len(),
                    r.responses.len()
                ),
            ));
        }
    }
    Ok(())
}
