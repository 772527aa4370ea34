//! Readers of the supported input formats (design.md, "Data formats"): RRHF records (JSONL, `.jsonl.gz`, Parquet),
//! pairwise preference rows (Dahoas/rm-static, full-hh-rlhf; JSONL or Parquet), Anthropic hh-rlhf raw transcripts
//! and Alpaca rows. Every reader yields [`Record`]s; bad input is reported with its file, line (or Parquet row) and
//! field, or skipped and counted with [`ReadOptions::skip_invalid`].
//!
//! May import: the rest of `data`, `model` and the base modules.

mod convert;
mod jsonl;
mod parquet_rows;
mod write;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::error::DataError;
use super::record::Record;

pub use write::write_records;

/// Input format; `Auto` decides per file from the extension (.parquet) and the fields of the first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputFormat {
    /// Parquet by extension (or magic bytes), then the format from the fields of the first record (or the columns).
    #[default]
    Auto,
    /// `{"query", "responses", "scores"[, "sources"]}`.
    Rrhf,
    /// `{"prompt", "chosen", "rejected"[, "response"]}`: chosen and rejected become two responses scored 1 and 0.
    Pairwise,
    /// Anthropic hh-rlhf raw `{"chosen", "rejected"}` transcripts, split at the last `"\n\nAssistant:"`.
    HhRaw,
    /// `{"instruction", "input", "output"}` rendered with the Alpaca template.
    Alpaca,
}

impl InputFormat {
    const NAMES: [(&'static str, InputFormat); 5] = [
        ("auto", InputFormat::Auto),
        ("rrhf", InputFormat::Rrhf),
        ("pairwise", InputFormat::Pairwise),
        ("hh", InputFormat::HhRaw),
        ("alpaca", InputFormat::Alpaca),
    ];
}

impl FromStr for InputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(_, f)| *f)
            .ok_or_else(|| format!("unknown input format `{s}` (expected one of: auto, rrhf, pairwise, hh, alpaca)"))
    }
}

impl fmt::Display for InputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, v)| v == self)
            .map(|(n, _)| *n)
            .unwrap_or("auto");
        f.write_str(name)
    }
}

/// Prompt template applied to queries: `None` keeps them; `Alpaca` renders the query as the instruction of the
/// Alpaca template (Alpaca-format rows always use it, with the "input" variant when `input` is non-empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptTemplate {
    #[default]
    None,
    Alpaca,
}

impl FromStr for PromptTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(PromptTemplate::None),
            "alpaca" => Ok(PromptTemplate::Alpaca),
            _ => Err(format!(
                "unknown prompt template `{s}` (expected one of: none, alpaca)"
            )),
        }
    }
}

impl fmt::Display for PromptTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PromptTemplate::None => "none",
            PromptTemplate::Alpaca => "alpaca",
        })
    }
}

/// How [`read_records`] reads a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    pub format: InputFormat,
    pub prompt_template: PromptTemplate,
    /// Skip (and count in [`ReadOutcome::skipped`]) invalid records instead of failing on the first one.
    pub skip_invalid: bool,
    /// Refuse unscored RRHF records (`scores` null or absent); `false` keeps them with `scores: None`.
    pub require_scores: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: InputFormat::Auto,
            prompt_template: PromptTemplate::None,
            skip_invalid: false,
            require_scores: true,
        }
    }
}

/// The records of a file and, with `skip_invalid`, one error per skipped record.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub records: Vec<Record>,
    /// The 1-based line (JSONL) or row (Parquet) of each record, so later stages can say `FILE:LINE`.
    pub lines: Vec<usize>,
    pub skipped: Vec<DataError>,
}

/// Reads every record of a JSONL (optionally .gz) or Parquet file.
///
/// Blank lines are skipped. A file with no record (empty, only blank lines, or every record skipped) is
/// [`DataError::Empty`]. Per-record problems fail with [`DataError::Invalid`] (file, 1-based line or row, field)
/// unless `opts.skip_invalid`; I/O errors and an unreadable Parquet file always fail.
pub fn read_records(path: &Path, opts: &ReadOptions) -> Result<ReadOutcome, DataError> {
    let outcome = if parquet_rows::is_parquet(path)? {
        parquet_rows::read(path, opts)?
    } else {
        jsonl::read(path, opts)?
    };
    if outcome.records.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok(outcome)
}

/// The Alpaca prompt for an instruction and optional input (the Stanford Alpaca template, verbatim).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Response:"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_format_names_round_trip() {
        for (name, f) in InputFormat::NAMES {
            assert_eq!(name.parse::<InputFormat>().unwrap(), f);
            assert_eq!(f.to_string(), name);
        }
        assert_eq!("HH".parse::<InputFormat>().unwrap(), InputFormat::HhRaw);
        let err = "csv".parse::<InputFormat>().unwrap_err();
        assert!(err.contains("csv") && err.contains("pairwise"), "{err}");
    }

    #[test]
    fn prompt_template_names_round_trip() {
        for t in [PromptTemplate::None, PromptTemplate::Alpaca] {
            assert_eq!(t.to_string().parse::<PromptTemplate>().unwrap(), t);
        }
        assert!("vicuna".parse::<PromptTemplate>().is_err());
    }

    #[test]
    fn read_options_default() {
        let o = ReadOptions::default();
        assert_eq!(o.format, InputFormat::Auto);
        assert_eq!(o.prompt_template, PromptTemplate::None);
        assert!(!o.skip_invalid);
        assert!(o.require_scores);
    }

    #[test]
    fn alpaca_prompt_is_the_stanford_template() {
        assert_eq!(
            alpaca_prompt("Name a color.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the \
             request.\n\n### Instruction:\nName a color.\n\n### Response:"
        );
        assert_eq!(
            alpaca_prompt("Translate.", "bonjour"),
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n\
             ### Input:\nbonjour\n\n### Response:"
        );
    }
}
