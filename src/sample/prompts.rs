//! Prompt files for `rrhf sample`: any record reader of `crate::data` (pairwise data brings its chosen/rejected
//! answers as provided responses), or plain `{"query"}` lines.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::data::readers::{alpaca_prompt, read_records, InputFormat, PromptTemplate, ReadOptions};
use crate::data::DataError;

/// One prompt and the responses its dataset provides.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub query: String,
    pub provided: Vec<String>,
    pub provided_sources: Vec<String>,
    /// The dataset's labels for the provided responses, if it has them.
    pub provided_scores: Option<Vec<f64>>,
}

/// Whether `path` is a Parquet file (extension or magic bytes).
fn is_parquet(path: &Path) -> Result<bool, DataError> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        return Ok(true);
    }
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| DataError::io(path, e))?;
    Ok(n == 4 && &magic == b"PAR1")
}

/// Opens a JSONL file, gzip-decoded when it is one.
fn open_lines(path: &Path) -> Result<Box<dyn BufRead>, DataError> {
    let io = |e| DataError::io(path, e);
    let mut file = BufReader::new(std::fs::File::open(path).map_err(io)?);
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
        || file.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// Whether the first record of a JSONL file is a bare `{"query": ...}` line (a query without `responses`).
fn is_query_only(path: &Path) -> Result<bool, DataError> {
    let mut r = open_lines(path)?;
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            // Not text: the record reader reports it properly.
            Err(_) => return Ok(false),
        }
        let t = line.trim_start_matches('\u{feff}').trim();
        if t.is_empty() {
            continue;
        }
        return Ok(match serde_json::from_str::<Value>(t) {
            Ok(Value::Object(o)) => o.contains_key("query") && !o.contains_key("responses"),
            _ => false,
        });
    }
}

/// Reads `{"query": str}` lines (other fields ignored); errors name the file and line.
fn read_query_lines(
    path: &Path,
    template: PromptTemplate,
    skip_invalid: bool,
) -> Result<(Vec<Prompt>, usize), DataError> {
    let r = open_lines(path)?;
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, line) in r.split(b'\n').enumerate() {
        let line_no = i + 1;
        let bytes = line.map_err(|e| DataError::io(path, e))?;
        let bytes = if line_no == 1 {
            bytes
                .strip_prefix(b"\xEF\xBB\xBF")
                .unwrap_or(&bytes)
                .to_vec()
        } else {
            bytes
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| {
                (
                    None,
                    format!("not valid UTF-8 ({e}); the file must be UTF-8 text"),
                )
            })
            .and_then(|t| {
                serde_json::from_str::<Value>(t).map_err(|e| (None, format!("invalid JSON: {e}")))
            })
            .and_then(|v| match v {
                Value::Object(o) => match o.get("query") {
                    Some(Value::String(q)) => Ok(q.clone()),
                    None => Err((
                        Some("query"),
                        "missing field `query` (a prompt line is {\"query\": \"...\"})".to_string(),
                    )),
                    Some(_) => Err((Some("query"), "expected a string".to_string())),
                },
                _ => Err((
                    None,
                    "expected a JSON object {\"query\": \"...\"}".to_string(),
                )),
            });
        match parsed {
            Ok(q) => out.push(Prompt {
                query: match template {
                    PromptTemplate::Alpaca => alpaca_prompt(&q, ""),
                    PromptTemplate::None => q,
                },
                provided: Vec::new(),
                provided_sources: Vec::new(),
                provided_scores: None,
            }),
            Err((field, msg)) => {
                let e = DataError::invalid(path, Some(line_no), field, msg);
                if skip_invalid {
                    skipped += 1;
                } else {
                    return Err(e);
                }
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok((out, skipped))
}

/// The prompts of a file and how many malformed records were skipped.
pub fn read_prompts(
    path: &Path,
    format: InputFormat,
    template: PromptTemplate,
    skip_invalid: bool,
) -> Result<(Vec<Prompt>, usize), DataError> {
    if matches!(format, InputFormat::Auto | InputFormat::Rrhf)
        && !is_parquet(path)?
        && is_query_only(path)?
    {
        return read_query_lines(path, template, skip_invalid);
    }
    let read = read_records(
        path,
        &ReadOptions {
            format,
            prompt_template: template,
            skip_invalid,
            require_scores: false,
        },
    )?;
    let prompts = read
        .records
        .into_iter()
        .map(|r| Prompt {
            provided_sources: r
                .sources
                .unwrap_or_else(|| vec!["dataset".to_string(); r.responses.len()]),
            provided: r.responses,
            provided_scores: r.scores,
            query: r.query,
        })
        .collect();
    Ok((prompts, read.skipped.len()))
}
