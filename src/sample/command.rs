//! `rrhf sample`: k responses per prompt from a local model (the paper's sampling policies, Table 1) or from an
//! OpenAI-compatible endpoint, merged with the responses the dataset provides, written as unscored RRHF records.
//!
//! Settings (paper §4.1): BP = beam search (4 beams, 4 responses) + provided; SP = 4 samples (temperature 0.8,
//! top-p 1.0) + provided; DP = diverse beam search (4 beams in 4 groups, diversity penalty 1.0) + provided;
//! D = diverse beam search only; P = the provided responses only (no model). Every parameter overrides its preset.
//!
//! Output records: `{"query", "responses": [k generated…, provided…], "scores": null, "sources": [...]}`; P keeps
//! the dataset's labels as scores. The file is rewritten atomically (temp + rename) between batches, at most every
//! [`FLUSH_INTERVAL`], and on errors: a failed run keeps everything it finished, a killed one loses at most its last
//! batch or the last [`FLUSH_INTERVAL`] of work. `--resume` skips prompts already in the output; `--append` adds
//! this run's responses to the records already there (several sources per record). Batches are aligned to absolute
//! prompt indices (and seeded by them), so a resumed run computes the same batches as an uninterrupted one.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{
    map_concurrent, messages_from_prompt, ApiKind, Client, ClientError, ClientStats,
    CompletionParams, EndpointConfig,
};
use crate::data::readers::{read_records, write_records, InputFormat, PromptTemplate, ReadOptions};
use crate::data::{DataError, Record};
use crate::device::{DTypeSpec, DeviceSpec};
use crate::dist::{self, shard::Shard};
use crate::model::{load_model, LoadedModel, ModelError, TextTokenizer};
use crate::train::log::Progress;

use super::prompts::{read_prompts, Prompt};
use super::{generate, EarlyStopping, GenerateOptions, StopCheck, Strategy};

/// The turn marker that makes a prompt file "HH-style" (default stop strings `Human:` and `Assistant:`).
const HH_HUMAN: &str = "\n\nHuman:";
/// Stop strings for HH-style prompts (the paper's anti-cheating truncation).
const HH_STOPS: [&str; 2] = ["Human:", "Assistant:"];
/// The output is rewritten after a batch only if this long (or 10× the last write's time, if more) has passed since
/// the last write; always at the end and on errors.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// OpenAI accepts at most 4 stop strings; more are applied on our side only.
const MAX_API_STOPS: usize = 4;

/// The paper's sampling settings (Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Beam search + provided responses.
    Bp,
    /// Sampling + provided responses.
    Sp,
    /// Diverse beam search + provided responses.
    Dp,
    /// Diverse beam search only.
    D,
    /// Provided responses only.
    P,
}

impl FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "BP" => Ok(Setting::Bp),
            "SP" => Ok(Setting::Sp),
            "DP" => Ok(Setting::Dp),
            "D" => Ok(Setting::D),
            "P" => Ok(Setting::P),
            _ => Err(format!(
                "unknown setting `{s}` (expected one of: BP, SP, DP, D, P)"
            )),
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setting::Bp => "BP",
            Setting::Sp => "SP",
            Setting::Dp => "DP",
            Setting::D => "D",
            Setting::P => "P",
        })
    }
}

/// `--strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    Greedy,
    Beam,
    DiverseBeam,
    Sample,
}

impl StrategyKind {
    const NAMES: [(&'static str, StrategyKind); 4] = [
        ("greedy", StrategyKind::Greedy),
        ("beam", StrategyKind::Beam),
        ("diverse-beam", StrategyKind::DiverseBeam),
        ("sample", StrategyKind::Sample),
    ];

    /// `policy:{name}`, the source label of its responses.
    pub fn source(self) -> String {
        format!("policy:{self}")
    }
}

impl FromStr for StrategyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                format!(
                    "unknown strategy `{s}` (expected one of: greedy, beam, diverse-beam, sample)"
                )
            })
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, k)| k == self)
            .map(|(n, _)| *n)
            .unwrap_or("greedy");
        f.write_str(name)
    }
}

/// `--early-stopping true|false|never` (Hugging Face's beam-search semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStop {
    True,
    False,
    Never,
}

impl FromStr for EarlyStop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(EarlyStop::True),
            "false" => Ok(EarlyStop::False),
            "never" => Ok(EarlyStop::Never),
            _ => Err(format!(
                "unknown early stopping `{s}` (expected true, false or never)"
            )),
        }
    }
}

impl fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EarlyStop::True => "true",
            EarlyStop::False => "false",
            EarlyStop::Never => "never",
        })
    }
}

impl EarlyStop {
    fn engine(self) -> EarlyStopping {
        match self {
            EarlyStop::True => EarlyStopping::True,
            EarlyStop::False => EarlyStopping::False,
            EarlyStop::Never => EarlyStopping::Never,
        }
    }
}

macro_rules! serialize_display {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_display!(Setting, StrategyKind, EarlyStop);

/// Everything `rrhf sample` can be told (every field is a flag; `--config FILE.toml` may set any of them).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SampleConfig {
    /// Policy model: a Hugging Face directory or a .gguf file (not needed for setting P or --endpoint).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts: any record file (RRHF, pairwise, hh-rlhf raw, Alpaca; JSONL, .gz or Parquet) or `{"query"}` lines.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSONL of RRHF records (unscored: `rrhf score` fills the scores).
    #[arg(long)]
    pub output: PathBuf,
    /// The paper's preset: BP, SP, DP, D or P (Table 1); flags below override it.
    #[arg(long)]
    pub setting: Option<Setting>,
    /// greedy, beam, diverse-beam or sample (default: the setting's).
    #[arg(long)]
    pub strategy: Option<StrategyKind>,
    /// Generated responses per prompt (default 4; 1 for greedy).
    #[arg(long)]
    pub num_responses: Option<usize>,
    /// Beams of beam / diverse beam search (default max(4, --num-responses)).
    #[arg(long)]
    pub num_beams: Option<usize>,
    /// Groups of diverse beam search (default: one beam per group).
    #[arg(long)]
    pub num_beam_groups: Option<usize>,
    /// Hamming diversity penalty of diverse beam search (default 1.0).
    #[arg(long)]
    pub diversity_penalty: Option<f64>,
    /// Length penalty of beam search: score = logprob / length^penalty (default 1.0).
    #[arg(long)]
    pub beam_length_penalty: Option<f64>,
    /// Beam search early stopping: true, false or never (Hugging Face semantics; default false).
    #[arg(long)]
    pub early_stopping: Option<EarlyStop>,
    /// Sampling temperature (sampling and endpoints only; default 1.0, SP 0.8).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Top-k of sampling (default 50 as Hugging Face; 0 turns it off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Top-p (nucleus) of sampling (default 1.0).
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// New tokens per response, at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompt tokens, at most: longer prompts keep their end (and BOS).
    #[arg(long, default_value_t = 256)]
    pub max_prompt_len: usize,
    /// Stop string (repeatable): a response ends before the first one. Default for HH-style prompts
    /// ("\n\nHuman:" in them): "Human:" and "Assistant:"; `--stop ""` turns stops off.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the dataset's responses after the generated ones (default: the setting's; `--keep-provided false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_provided: Option<bool>,
    /// Prompts per generation batch (local model) or per round of requests (endpoint).
    #[arg(long, default_value_t = 8)]
    pub batch_prompts: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeSpec,
    /// Input format of --prompts.
    #[arg(long, default_value = "auto")]
    pub format: InputFormat,
    /// Template applied to queries (alpaca: the Stanford Alpaca prompt).
    #[arg(long, default_value = "none")]
    pub prompt_template: PromptTemplate,
    /// Skip (and count) malformed prompt records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Continue the output file: prompts already in it are skipped (with --append: those that already have
    /// responses from this run's source).
    #[arg(long)]
    pub resume: bool,
    /// Add this run's responses to the records already in the output (matched by query); new prompts are added
    /// at the end. This is how several sources (models, endpoints) combine.
    #[arg(long)]
    pub append: bool,
    /// Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000): responses come from it instead of
    /// a local model.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Model name sent to the endpoint; responses are labelled `endpoint:NAME`.
    #[arg(long)]
    pub endpoint_model: Option<String>,
    /// Environment variable holding the endpoint's API key.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// chat (/v1/chat/completions; HH transcripts become turns) or completions (/v1/completions, raw prompt).
    #[arg(long, default_value = "chat")]
    pub endpoint_api: ApiKind,
    /// Endpoint requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Endpoint request timeout in milliseconds.
    #[arg(long, default_value_t = 120_000)]
    pub timeout_ms: u64,
    /// Retries of a failed endpoint request (429, 5xx, timeouts, connection errors).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry in milliseconds (doubles each retry).
    #[arg(long, default_value_t = 1000)]
    pub backoff_ms: u64,
    /// When stderr is not a terminal, print a progress line after a batch when the prompts done are a multiple
    /// of N (and after the first and the last batch).
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
}

/// An error of `rrhf sample`.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Client(#[from] Box<ClientError>),
    /// Flags that do not fit together, or input that cannot be used.
    #[error("{0}")]
    Config(String),
    /// An endpoint request failed for good (after its retries).
    #[error("{}: prompt {index}: {source}", prompts.display())]
    Endpoint {
        prompts: PathBuf,
        /// 1-based index of the prompt among the records of the prompt file.
        index: usize,
        source: Box<ClientError>,
    },
    /// A failure in the middle of a run: what was done so far is in the output.
    #[error("{cause}\n{saved}")]
    Interrupted {
        cause: Box<SampleError>,
        /// What was saved, and how to continue.
        saved: String,
    },
}

impl From<candle_core::Error> for SampleError {
    fn from(e: candle_core::Error) -> Self {
        SampleError::Model(ModelError::Candle(e))
    }
}

fn config_err(msg: impl Into<String>) -> SampleError {
    SampleError::Config(msg.into())
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct SampleSummary {
    /// Prompts read from --prompts.
    pub prompts: usize,
    /// Prompts processed in this run.
    pub processed: usize,
    /// Prompts skipped because the output already had them (--resume).
    pub already_done: usize,
    /// Malformed prompt records skipped (--skip-invalid).
    pub invalid_skipped: usize,
    /// Responses generated in this run (model or endpoint).
    pub generated: usize,
    /// Dataset-provided responses written in this run.
    pub provided: usize,
    /// Tokens generated (endpoint: `usage.completion_tokens` where reported).
    pub generated_tokens: u64,
    /// Seconds spent generating.
    pub generation_s: f64,
    /// Prompts left-truncated to --max-prompt-len.
    pub truncated_prompts: usize,
    /// Responses cut at a stop string.
    pub cut_by_stop: usize,
    /// Records in the output file.
    pub records_written: usize,
    /// Records whose scores were dropped because --append added responses to them.
    pub scores_dropped: usize,
    /// Counters of the endpoint client.
    pub endpoint: Option<ClientStats>,
    pub output: PathBuf,
}

impl SampleSummary {
    /// Generated tokens per second of generation.
    pub fn tokens_per_s(&self) -> f64 {
        if self.generation_s > 0.0 {
            self.generated_tokens as f64 / self.generation_s
        } else {
            0.0
        }
    }
}

impl fmt::Display for SampleSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sampled {} of {} prompts ({} already in the output, {} invalid skipped): {} generated + {} provided \
             responses, {} tokens at {:.1} tokens/s; {} prompts truncated, {} responses cut at a stop string; \
             {} records in {}",
            self.processed,
            self.prompts,
            self.already_done,
            self.invalid_skipped,
            self.generated,
            self.provided,
            self.generated_tokens,
            self.tokens_per_s(),
            self.truncated_prompts,
            self.cut_by_stop,
            self.records_written,
            self.output.display()
        )?;
        if self.scores_dropped > 0 {
            write!(
                f,
                "; {} records had scores that no longer cover their responses and are unscored now",
                self.scores_dropped
            )?;
        }
        if let Some(s) = &self.endpoint {
            write!(
                f,
                "; endpoint: {} requests, {} retries, {} failures",
                s.requests, s.retries, s.failures
            )?;
        }
        Ok(())
    }
}

/// Where responses come from in this run.
#[derive(Debug, Clone)]
enum Generator {
    /// Setting P: provided responses only.
    None,
    Local {
        strategy: Strategy,
    },
    Endpoint {
        temperature: f64,
        top_p: f64,
    },
}

/// The flags resolved against the preset.
#[derive(Debug, Clone)]
struct Plan {
    generator: Generator,
    /// Generated responses per prompt.
    k: usize,
    keep_provided: bool,
    /// The source label of generated responses.
    source: String,
}

fn positive(name: &str, v: Option<usize>) -> Result<Option<usize>, SampleError> {
    match v {
        Some(0) => Err(config_err(format!("{name} must be at least 1"))),
        v => Ok(v),
    }
}

/// Resolves presets and overrides, and checks the combination.
fn plan(cfg: &SampleConfig) -> Result<Plan, SampleError> {
    let setting = cfg.setting;
    if cfg.endpoint.is_some() && cfg.model.is_some() {
        return Err(config_err(
            "give --model or --endpoint, not both: run `rrhf sample` once per source and combine them with --append",
        ));
    }
    let num_responses = positive("--num-responses", cfg.num_responses)?;
    if setting == Some(Setting::P) {
        if cfg.endpoint.is_some() || cfg.strategy.is_some() {
            return Err(config_err(
                "setting P uses the dataset's responses only: drop --endpoint / --strategy, or pick another setting",
            ));
        }
        if cfg.keep_provided == Some(false) {
            return Err(config_err(
                "setting P with --keep-provided false leaves no responses",
            ));
        }
        return Ok(Plan {
            generator: Generator::None,
            k: 0,
            keep_provided: true,
            source: String::new(),
        });
    }
    let keep_provided = cfg.keep_provided.unwrap_or(matches!(
        setting,
        Some(Setting::Bp | Setting::Sp | Setting::Dp)
    ));
    let sp = setting == Some(Setting::Sp);
    let temperature = cfg.temperature.unwrap_or(if sp { 0.8 } else { 1.0 });
    let top_p = cfg.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(config_err(format!(
            "--top-p must be in (0, 1], got {top_p}"
        )));
    }
    if let Some(url) = &cfg.endpoint {
        if let Some(s) = cfg.strategy.filter(|s| *s != StrategyKind::Sample) {
            return Err(config_err(format!(
                "--strategy {s} needs a local model: an endpoint samples (give --temperature / --top-p)"
            )));
        }
        let name = cfg.endpoint_model.clone().ok_or_else(|| {
            config_err(format!(
                "--endpoint {url} needs --endpoint-model NAME (the `model` of each request)"
            ))
        })?;
        if temperature.is_nan() || temperature < 0.0 {
            return Err(config_err(format!(
                "--temperature must be ≥ 0, got {temperature}"
            )));
        }
        return Ok(Plan {
            generator: Generator::Endpoint { temperature, top_p },
            k: num_responses.unwrap_or(if setting.is_some() { 4 } else { 1 }),
            keep_provided,
            source: format!("endpoint:{name}"),
        });
    }
    let kind = match (cfg.strategy, setting) {
        (Some(k), _) => k,
        (None, Some(Setting::Bp)) => StrategyKind::Beam,
        (None, Some(Setting::Dp | Setting::D)) => StrategyKind::DiverseBeam,
        (None, Some(Setting::Sp)) => StrategyKind::Sample,
        (None, _) => {
            return Err(config_err(
                "give --setting BP|SP|DP|D|P, --strategy greedy|beam|diverse-beam|sample, or --endpoint URL",
            ))
        }
    };
    if cfg.model.is_none() {
        return Err(config_err(format!(
            "--model DIR is required to generate ({} responses); only setting P and --endpoint need no model",
            kind
        )));
    }
    let k = num_responses.unwrap_or(if kind == StrategyKind::Greedy { 1 } else { 4 });
    let num_beams = positive("--num-beams", cfg.num_beams)?.unwrap_or(k.max(4));
    let length_penalty = cfg.beam_length_penalty.unwrap_or(1.0);
    let early_stopping = cfg.early_stopping.unwrap_or(EarlyStop::False).engine();
    let beams_fit = |what: &str| -> Result<(), SampleError> {
        if k > num_beams {
            return Err(config_err(format!(
                "--num-responses {k} is more than the {num_beams} beams of {what}: raise --num-beams"
            )));
        }
        Ok(())
    };
    let strategy = match kind {
        StrategyKind::Greedy => {
            if k != 1 {
                return Err(config_err(format!(
                    "greedy decoding gives one response per prompt, not {k}: use --strategy beam, diverse-beam or sample"
                )));
            }
            Strategy::Greedy
        }
        StrategyKind::Beam => {
            beams_fit("beam search")?;
            Strategy::Beam {
                num_beams,
                length_penalty,
                early_stopping,
            }
        }
        StrategyKind::DiverseBeam => {
            beams_fit("diverse beam search")?;
            let groups = positive("--num-beam-groups", cfg.num_beam_groups)?.unwrap_or(num_beams);
            if num_beams % groups != 0 {
                return Err(config_err(format!(
                    "--num-beams {num_beams} must be divisible by --num-beam-groups {groups}"
                )));
            }
            let diversity_penalty = cfg.diversity_penalty.unwrap_or(1.0);
            if diversity_penalty.is_nan() || diversity_penalty < 0.0 {
                return Err(config_err(format!(
                    "--diversity-penalty must be ≥ 0, got {diversity_penalty}"
                )));
            }
            Strategy::DiverseBeam {
                num_beams,
                num_beam_groups: groups,
                diversity_penalty,
                length_penalty,
                early_stopping,
            }
        }
        StrategyKind::Sample => {
            if !temperature.is_finite() || temperature <= 0.0 {
                return Err(config_err(format!(
                    "--temperature must be > 0 for sampling, got {temperature} (temperature 0 is greedy: use --strategy greedy)"
                )));
            }
            Strategy::Sample {
                temperature,
                top_k: match cfg.top_k {
                    Some(0) => None,
                    Some(t) => Some(t),
                    None => Some(50),
                },
                top_p,
            }
        }
    };
    Ok(Plan {
        generator: Generator::Local { strategy },
        k,
        keep_provided,
        source: kind.source(),
    })
}

/// One line describing the resolved plan.
fn describe(plan: &Plan, cfg: &SampleConfig, stops: &[String]) -> String {
    let setting = cfg
        .setting
        .map(|s| format!("setting {s}: "))
        .unwrap_or_default();
    let what = match &plan.generator {
        Generator::None => "the dataset's responses only (labels kept as scores)".to_string(),
        Generator::Local { strategy, .. } => {
            let s = match strategy {
                Strategy::Greedy => "greedy".to_string(),
                Strategy::Beam {
                    num_beams,
                    length_penalty,
                    early_stopping,
                } => format!(
                    "beam search ({num_beams} beams, length penalty {length_penalty}, early stopping {})",
                    early_name(early_stopping)
                ),
                Strategy::DiverseBeam {
                    num_beams,
                    num_beam_groups,
                    diversity_penalty,
                    length_penalty,
                    early_stopping,
                } => format!(
                    "diverse beam search ({num_beams} beams in {num_beam_groups} groups, diversity penalty \
                     {diversity_penalty}, length penalty {length_penalty}, early stopping {})",
                    early_name(early_stopping)
                ),
                Strategy::Sample {
                    temperature,
                    top_k,
                    top_p,
                } => format!(
                    "sampling (temperature {temperature}, top-k {}, top-p {top_p}, seed {})",
                    top_k.map_or("off".to_string(), |k| k.to_string()),
                    cfg.seed
                ),
            };
            format!("{} × {s} from {}", plan.k, cfg.model.as_deref().unwrap_or(Path::new("?")).display())
        }
        Generator::Endpoint { temperature, top_p } => format!(
            "{} × {} ({} API, temperature {temperature}, top-p {top_p}, concurrency {}, timeout {} ms, {} retries)",
            plan.k,
            plan.source,
            cfg.endpoint_api,
            cfg.concurrency.max(1),
            cfg.timeout_ms,
            cfg.retries
        ),
    };
    let provided = if plan.keep_provided && plan.k > 0 {
        " + the dataset's responses"
    } else {
        ""
    };
    let limits = if plan.k > 0 {
        format!(
            "; max new tokens {}, max prompt tokens {}, stop {stops:?}",
            cfg.max_new_tokens, cfg.max_prompt_len
        )
    } else {
        String::new()
    };
    format!(
        "rrhf sample: {setting}{what}{provided}{limits}{}{}",
        if cfg.resume { "; resume" } else { "" },
        if cfg.append { "; append" } else { "" },
    )
}

fn early_name(e: &EarlyStopping) -> &'static str {
    match e {
        EarlyStopping::True => "true",
        EarlyStopping::False => "false",
        EarlyStopping::Never => "never",
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Text handling.

/// The stop strings of a run: `given` without empty ones (`--stop ""` turns stops off) or, when none is given,
/// `Human:` and `Assistant:` for HH-style prompts (any containing "\n\nHuman:") and none otherwise.
pub fn resolve_stops(given: &[String], prompts: &[Prompt]) -> Vec<String> {
    if given.is_empty() {
        if prompts.iter().any(|p| p.query.contains(HH_HUMAN)) {
            HH_STOPS.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        }
    } else {
        given.iter().filter(|s| !s.is_empty()).cloned().collect()
    }
}

/// The byte offset of the first stop string in `text`, if any.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// `text` cut before its first stop string (trailing whitespace of the kept part dropped); whether it was cut.
pub fn cut_at_stop(text: &str, stops: &[String]) -> (String, bool) {
    match first_stop(text, stops) {
        Some(at) => (text[..at].trim_end().to_string(), true),
        None => (text.to_string(), false),
    }
}

/// The text of `new` as a continuation of `prompt`: the difference of the two decodes, so that a leading space
/// survives tokenizers that strip it from a lone first token (special tokens skipped).
fn continuation(
    tok: &TextTokenizer,
    prompt: &[u32],
    prompt_text: &str,
    new: &[u32],
) -> Result<String, ModelError> {
    let full: Vec<u32> = prompt.iter().chain(new).copied().collect();
    let text = tok.decode(&full, true)?;
    match text.strip_prefix(prompt_text) {
        Some(rest) => Ok(rest.to_string()),
        None => tok.decode(new, true),
    }
}

/// Prompt ids left-truncated to `max_len` tokens keeping BOS; whether it was cut.
pub fn truncate_prompt(ids: Vec<u32>, max_len: usize, bos: Option<u32>) -> (Vec<u32>, bool) {
    if ids.len() <= max_len {
        return (ids, false);
    }
    let keep_bos = bos.is_some() && ids.first() == bos.as_ref();
    let tail_len = max_len - usize::from(keep_bos);
    let mut out = Vec::with_capacity(max_len);
    if keep_bos {
        out.push(ids[0]);
    }
    out.extend_from_slice(&ids[ids.len() - tail_len..]);
    (out, true)
}

// ---------------------------------------------------------------------------------------------------------------
// The run.

/// Where a prompt's responses go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Into this record of the existing output (--append).
    Existing(usize),
    /// A new record at the end.
    New,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    prompt: usize,
    target: Target,
}

/// Responses generated for one prompt: `(text, cut at a stop string)`.
type Texts = Vec<(String, bool)>;

/// The output records and the bookkeeping of writing them.
struct Output<'a> {
    path: &'a Path,
    records: Vec<Record>,
    last_flush: Instant,
    /// How long the last write took: writes are spaced at least 10× that (≤ ~10% of the run spent writing).
    last_cost: Duration,
    dirty: bool,
}

impl Output<'_> {
    /// Rewrites the file atomically if something changed and, unless `force`, enough time has passed.
    fn flush(&mut self, force: bool) -> Result<(), DataError> {
        let gap = FLUSH_INTERVAL.max(self.last_cost * 10);
        if !self.dirty || (!force && self.last_flush.elapsed() < gap) {
            return Ok(());
        }
        let t0 = Instant::now();
        write_records(self.path, &self.records)?;
        self.last_flush = Instant::now();
        self.last_cost = t0.elapsed();
        self.dirty = false;
        Ok(())
    }
}

/// Reads the existing output (for --resume / --append); a missing or empty file is no records.
fn read_existing(path: &Path) -> Result<Vec<Record>, DataError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    match read_records(
        path,
        &ReadOptions {
            format: InputFormat::Rrhf,
            prompt_template: PromptTemplate::None,
            skip_invalid: false,
            require_scores: false,
        },
    ) {
        Ok(r) => Ok(r.records),
        Err(DataError::Empty(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Runs `rrhf sample`.
pub fn sample(cfg: &SampleConfig) -> Result<SampleSummary, SampleError> {
    run(cfg, None)
}

/// Runs `rrhf sample` with a model already loaded on `cfg.device` (`cfg.model` still names it), so that a caller
/// that also scores or ranks with the model (`rrhf eval`) loads it once.
pub fn sample_with_model(
    cfg: &SampleConfig,
    model: &LoadedModel,
) -> Result<SampleSummary, SampleError> {
    run(cfg, Some(model))
}

fn run(cfg: &SampleConfig, preloaded: Option<&LoadedModel>) -> Result<SampleSummary, SampleError> {
    let plan = plan(cfg)?;
    if cfg.max_new_tokens == 0 && plan.k > 0 {
        return Err(config_err("--max-new-tokens must be at least 1"));
    }
    if cfg.max_prompt_len == 0 {
        return Err(config_err("--max-prompt-len must be at least 1"));
    }
    let (prompts, invalid_skipped) = read_prompts(
        &cfg.prompts,
        cfg.format,
        cfg.prompt_template,
        cfg.skip_invalid,
    )?;
    if plan.k == 0 {
        if let Some(i) = prompts.iter().position(|p| p.provided.is_empty()) {
            return Err(config_err(format!(
                "{}: record {} has no responses, and setting P writes only the dataset's responses",
                cfg.prompts.display(),
                i + 1
            )));
        }
    }
    let stops = resolve_stops(&cfg.stop, &prompts);
    let comm = dist::world();
    if comm.is_root() {
        eprintln!("{}", describe(&plan, cfg, &stops));
    }
    // Under mpirun: this rank samples its blocks of prompts into its own part of the output (see dist::shard).
    let shard = Shard::new(comm, &cfg.output);
    if shard.is_parallel() && cfg.append {
        return Err(config_err(
            "--append does not run under mpirun/srun (its records are matched across the whole output); run it as \
             one process",
        ));
    }
    let part = shard.part();
    // Blocks of absolute prompt indices: a resumed run meets the same batches (and sampling seeds) as one run.
    let block = match &plan.generator {
        Generator::Endpoint { .. } => cfg.batch_prompts.max(cfg.concurrency).max(1),
        _ => cfg.batch_prompts.max(1),
    };

    // The existing output and the prompts still to do.
    let existing = if cfg.append || cfg.resume {
        read_existing(&part)?
    } else {
        Vec::new()
    };
    if (cfg.append || cfg.resume) && existing.is_empty() {
        eprintln!(
            "note: {} has no records yet; starting a new file",
            part.display()
        );
    }
    let mut by_query: HashMap<&str, VecDeque<usize>> = HashMap::new();
    for (i, r) in existing.iter().enumerate() {
        by_query.entry(r.query.as_str()).or_default().push_back(i);
    }
    let mut jobs = Vec::new();
    let mut already_done = 0;
    for (i, p) in prompts.iter().enumerate() {
        if !shard.owns(i / block) {
            continue;
        }
        let matched = by_query
            .get_mut(p.query.as_str())
            .and_then(VecDeque::pop_front);
        let target = match matched {
            Some(j) if cfg.append => {
                let done = cfg.resume && record_has_run(&existing[j], &plan, p);
                if done {
                    already_done += 1;
                    continue;
                }
                Target::Existing(j)
            }
            Some(_) => {
                // --resume without --append: the prompt is in the output already.
                already_done += 1;
                continue;
            }
            None => Target::New,
        };
        jobs.push(Job { prompt: i, target });
    }
    drop(by_query);

    let mut summary = SampleSummary {
        prompts: prompts.len(),
        already_done,
        invalid_skipped,
        output: cfg.output.clone(),
        ..SampleSummary::default()
    };
    let mut out = Output {
        path: &part,
        records: existing,
        last_flush: Instant::now(),
        last_cost: Duration::ZERO,
        // Always write once, even when there is nothing to do (a fresh run over an old file replaces it).
        dirty: true,
    };

    let mut source = Source::open(cfg, &plan, preloaded)?;
    let mut batches: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match batches.last_mut() {
            Some(b) if b[0].prompt / block == job.prompt / block => b.push(job),
            _ => batches.push(vec![job]),
        }
    }
    let progress = Progress::new(prompts.len() as u64, already_done as u64, cfg.log_every);
    let mut done_prompts = already_done as u64;
    let started = Instant::now();
    for batch in &batches {
        let t0 = Instant::now();
        let result = source.run(cfg, &plan, &prompts, batch, &stops, &mut summary);
        summary.generation_s += t0.elapsed().as_secs_f64();
        let (texts, failure) = result;
        // `texts` covers a prefix of the batch (all of it unless something failed).
        for (job, gen) in batch.iter().zip(texts) {
            apply(
                &mut out,
                &mut summary,
                &plan,
                &prompts[job.prompt],
                *job,
                gen,
            );
            done_prompts += 1;
        }
        if let Some(e) = failure {
            out.flush(true)?;
            let saved = format!(
                "{} records are in {} (everything finished before the failure); rerun with --resume{} to continue",
                out.records.len(),
                part.display(),
                if cfg.append { " --append" } else { "" }
            );
            return Err(SampleError::Interrupted {
                cause: Box::new(e),
                saved,
            });
        }
        out.flush(false)?;
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let tokens = match &source {
            Source::Endpoint { client } => client.stats().completion_tokens,
            _ => summary.generated_tokens,
        };
        progress.report(
            done_prompts,
            "prompt",
            &format!(
                "{} responses  {:.1} tok/s",
                summary.generated + summary.provided,
                tokens as f64 / elapsed
            ),
        );
    }
    if let Source::Endpoint { client } = &source {
        let s = client.stats();
        summary.generated_tokens = s.completion_tokens;
        summary.endpoint = Some(s);
    }
    out.flush(true)?;
    summary.records_written = out.records.len();
    if shard.is_parallel() {
        merge_parts(&shard, &mut summary, prompts.len(), block)?;
    }
    Ok(summary)
}

/// Under mpirun: rank 0 writes the parts merged in prompt order to the output, and every rank's summary becomes
/// the job's (counts summed over ranks; generation time the longest rank's).
fn merge_parts(
    shard: &Shard,
    summary: &mut SampleSummary,
    n_prompts: usize,
    block: usize,
) -> Result<(), SampleError> {
    let comm = dist::world();
    // Every prompt of a rank's blocks is one record of its part, in prompt order.
    let sizes: Vec<usize> = (0..n_prompts.div_ceil(block))
        .map(|b| block.min(n_prompts - b * block))
        .collect();
    let part = shard.part();
    let mine = std::fs::read(&part).map_err(|e| DataError::io(&part, e))?;
    let merged = shard.merge_lines(comm, &mine, &sizes)?;
    if comm.is_root() {
        crate::fsutil::write_atomic(&summary.output, &merged).map_err(ModelError::from)?;
    }
    summary.records_written = sizes.iter().sum();
    let s = &mut *summary;
    let mut counts = [
        s.processed,
        s.already_done,
        s.generated,
        s.provided,
        s.generated_tokens as usize,
        s.truncated_prompts,
        s.cut_by_stop,
    ]
    .map(|x| x as f64);
    comm.sum_f64("the sampling counts", &mut counts);
    let [processed, already_done, generated, provided, tokens, truncated, cut] =
        counts.map(|x| x as usize);
    (s.processed, s.already_done, s.generated, s.provided) =
        (processed, already_done, generated, provided);
    (s.generated_tokens, s.truncated_prompts, s.cut_by_stop) = (tokens as u64, truncated, cut);
    s.generation_s = comm
        .all_gather_f64("the sampling time", &[s.generation_s])
        .into_iter()
        .fold(0.0, f64::max);
    Ok(())
}

/// Whether an existing record already holds this run's responses (for --resume with --append).
fn record_has_run(r: &Record, plan: &Plan, p: &Prompt) -> bool {
    let sources = r.sources.as_deref().unwrap_or(&[]);
    if plan.k > 0 {
        return sources.contains(&plan.source);
    }
    // Setting P: every provided response is there.
    p.provided
        .iter()
        .zip(&p.provided_sources)
        .all(|(text, src)| has_response(r, src, text))
}

fn has_response(r: &Record, source: &str, text: &str) -> bool {
    let sources = r.sources.as_deref().unwrap_or(&[]);
    r.responses
        .iter()
        .zip(sources)
        .any(|(t, s)| t == text && s == source)
}

/// Adds one prompt's responses to the output.
fn apply(
    out: &mut Output,
    summary: &mut SampleSummary,
    plan: &Plan,
    p: &Prompt,
    job: Job,
    generated: Texts,
) {
    summary.processed += 1;
    summary.generated += generated.len();
    summary.cut_by_stop += generated.iter().filter(|(_, cut)| *cut).count();
    let mut responses: Vec<String> = Vec::new();
    let mut sources: Vec<String> = Vec::new();
    for (text, _) in generated {
        responses.push(text);
        sources.push(plan.source.clone());
    }
    let existing = match job.target {
        Target::Existing(i) => Some(i),
        Target::New => None,
    };
    let mut provided_added = 0;
    if plan.keep_provided {
        for (text, src) in p.provided.iter().zip(&p.provided_sources) {
            if existing.is_some_and(|i| has_response(&out.records[i], src, text)) {
                continue;
            }
            responses.push(text.clone());
            sources.push(src.clone());
            provided_added += 1;
        }
    }
    summary.provided += provided_added;
    match existing {
        None => {
            // Only the dataset's responses (setting P): its labels are the scores.
            let scores = if plan.k == 0 {
                p.provided_scores.clone()
            } else {
                None
            };
            out.records.push(Record {
                query: p.query.clone(),
                responses,
                scores,
                sources: Some(sources),
            });
        }
        Some(i) => {
            let r = &mut out.records[i];
            if responses.is_empty() {
                return;
            }
            let old_sources = r
                .sources
                .take()
                .unwrap_or_else(|| vec!["unknown".to_string(); r.responses.len()]);
            if r.scores.take().is_some() {
                summary.scores_dropped += 1;
            }
            r.responses.extend(responses);
            r.sources = Some(old_sources.into_iter().chain(sources).collect());
        }
    }
    out.dirty = true;
}

/// The response generator of a run.
enum Source {
    None,
    Local {
        model: Box<LoadedModel>,
        strategy: Strategy,
        /// Effective prompt budget (≤ --max-prompt-len, leaving room for the new tokens in the model's positions).
        max_prompt_len: usize,
    },
    Endpoint {
        client: Client,
    },
}

/// The responses of a batch's prompts, in order, up to the first failure (and the failure, if any).
type BatchResult = (Vec<Texts>, Option<SampleError>);

impl Source {
    fn open(
        cfg: &SampleConfig,
        plan: &Plan,
        preloaded: Option<&LoadedModel>,
    ) -> Result<Source, SampleError> {
        match &plan.generator {
            Generator::None => Ok(Source::None),
            Generator::Local { strategy, .. } => {
                let model = match preloaded {
                    // A clone shares the weights' storage.
                    Some(m) => m.clone(),
                    None => {
                        let path = cfg.model.as_ref().expect("checked by plan()");
                        let device = cfg.device.open()?;
                        load_model(path, &device, cfg.dtype.dtype())?
                    }
                };
                let mut max_prompt_len = cfg.max_prompt_len;
                if let Some(positions) = model.model.max_positions() {
                    if cfg.max_new_tokens >= positions {
                        return Err(config_err(format!(
                            "--max-new-tokens {} leaves no room for a prompt in the model's {positions} positions",
                            cfg.max_new_tokens
                        )));
                    }
                    if max_prompt_len + cfg.max_new_tokens > positions {
                        max_prompt_len = positions - cfg.max_new_tokens;
                        eprintln!(
                            "note: prompts are cut to {max_prompt_len} tokens so that {} new tokens fit the model's \
                             {positions} positions",
                            cfg.max_new_tokens
                        );
                    }
                }
                Ok(Source::Local {
                    model: Box::new(model),
                    strategy: strategy.clone(),
                    max_prompt_len,
                })
            }
            Generator::Endpoint { .. } => {
                let endpoint = EndpointConfig {
                    url: cfg.endpoint.clone().expect("checked by plan()"),
                    model: cfg.endpoint_model.clone().expect("checked by plan()"),
                    api_key_env: cfg.api_key_env.clone(),
                    timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
                    max_retries: cfg.retries,
                    backoff: Duration::from_millis(cfg.backoff_ms),
                    concurrency: cfg.concurrency.max(1),
                };
                Ok(Source::Endpoint {
                    client: Client::new(endpoint).map_err(Box::new)?,
                })
            }
        }
    }

    /// Responses for the prompts of one batch, in order.
    fn run(
        &mut self,
        cfg: &SampleConfig,
        plan: &Plan,
        prompts: &[Prompt],
        batch: &[Job],
        stops: &[String],
        summary: &mut SampleSummary,
    ) -> BatchResult {
        match self {
            Source::None => (vec![Vec::new(); batch.len()], None),
            Source::Local {
                model,
                strategy,
                max_prompt_len,
            } => local_batch(
                model,
                strategy,
                *max_prompt_len,
                cfg,
                plan,
                prompts,
                batch,
                stops,
                summary,
            )
            .map_or_else(|e| (Vec::new(), Some(e)), |t| (t, None)),
            Source::Endpoint { client } => {
                let Generator::Endpoint { temperature, top_p } = plan.generator else {
                    unreachable!("an endpoint source has an endpoint plan")
                };
                let params = CompletionParams {
                    max_tokens: cfg.max_new_tokens,
                    temperature,
                    top_p,
                    n: plan.k,
                    stop: stops.iter().take(MAX_API_STOPS).cloned().collect(),
                    seed: Some(cfg.seed),
                };
                let results = map_concurrent(batch, cfg.concurrency.max(1), |job| {
                    fetch(
                        client,
                        cfg.endpoint_api,
                        &prompts[job.prompt].query,
                        &params,
                    )
                });
                let mut texts = Vec::with_capacity(batch.len());
                for (job, r) in batch.iter().zip(results) {
                    match r {
                        Ok(v) => texts.push(v.iter().map(|t| cut_at_stop(t, stops)).collect()),
                        Err(e) => {
                            let e = SampleError::Endpoint {
                                prompts: cfg.prompts.clone(),
                                index: job.prompt + 1,
                                source: Box::new(e),
                            };
                            return (texts, Some(e));
                        }
                    }
                }
                (texts, None)
            }
        }
    }
}

/// `p.n` responses from the endpoint: asks again for the rest when a server returns fewer choices (some ignore
/// `n`), at most `n` rounds.
fn fetch(
    client: &Client,
    api: ApiKind,
    query: &str,
    p: &CompletionParams,
) -> Result<Vec<String>, ClientError> {
    let mut out: Vec<String> = Vec::with_capacity(p.n);
    for _ in 0..p.n.max(1) {
        let want = p.n - out.len();
        let params = CompletionParams {
            n: want,
            ..p.clone()
        };
        let got = match api {
            ApiKind::Chat => client.chat(&messages_from_prompt(query), &params)?,
            ApiKind::Completions => client.complete(query, &params)?,
        };
        out.extend(got.into_iter().take(want));
        if out.len() >= p.n {
            break;
        }
    }
    if out.len() < p.n {
        return Err(ClientError::Malformed {
            url: client.url_of(api),
            field: "choices".into(),
            msg: format!("asked {} times for {} choices, got {}", p.n, p.n, out.len()),
            body: String::new(),
        });
    }
    Ok(out)
}

/// Generates one batch with the local model.
#[allow(clippy::too_many_arguments)]
fn local_batch(
    m: &LoadedModel,
    strategy: &Strategy,
    max_prompt_len: usize,
    cfg: &SampleConfig,
    plan: &Plan,
    prompts: &[Prompt],
    batch: &[Job],
    stops: &[String],
    summary: &mut SampleSummary,
) -> Result<Vec<Texts>, SampleError> {
    let tok = &m.tokenizer;
    let mut ids = Vec::with_capacity(batch.len());
    for job in batch {
        let full = tok.encode(&prompts[job.prompt].query, true)?;
        let (cut, truncated) = truncate_prompt(full, max_prompt_len, tok.bos_id);
        summary.truncated_prompts += usize::from(truncated);
        ids.push(cut);
    }
    let stop_check: Option<StopCheck> = if stops.is_empty() {
        None
    } else {
        let tok = tok.clone();
        let stops = stops.to_vec();
        Some(Arc::new(move |new: &[u32]| {
            tok.decode(new, true)
                .map(|t| first_stop(&t, &stops).is_some())
                .unwrap_or(false)
        }))
    };
    let first = batch[0].prompt as u64;
    let opts = GenerateOptions {
        strategy: strategy.clone(),
        num_return_sequences: plan.k,
        max_new_tokens: cfg.max_new_tokens,
        stop_ids: tok.stop_ids.clone(),
        pad_id: tok.pad_id,
        // One seed per block of prompts: the same in a resumed run.
        seed: cfg
            .seed
            .wrapping_add(first.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        stop_check,
    };
    let generated = generate(&m.model, &ids, &opts)?;
    if generated.len() != batch.len() {
        return Err(config_err(format!(
            "the generator returned {} results for {} prompts",
            generated.len(),
            batch.len()
        )));
    }
    let mut out = Vec::with_capacity(batch.len());
    for (prompt_ids, seqs) in ids.iter().zip(generated) {
        let prompt_text = tok.decode(prompt_ids, true)?;
        let mut texts = Vec::with_capacity(seqs.len());
        for g in seqs {
            let end = g
                .ids
                .iter()
                .position(|id| tok.stop_ids.contains(id))
                .unwrap_or(g.ids.len());
            let new = &g.ids[..end];
            summary.generated_tokens += new.len() as u64;
            let text = continuation(tok, prompt_ids, &prompt_text, new)?;
            texts.push(cut_at_stop(&text, stops));
        }
        out.push(texts);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: SampleConfig,
    }

    /// A config from flags written as one string (no argument contains a space).
    fn cfg(args: &str) -> SampleConfig {
        let argv = format!("sample --prompts p.jsonl --output o.jsonl {args}");
        Cli::try_parse_from(argv.split_whitespace()).unwrap().cfg
    }

    fn local(p: &Plan) -> &Strategy {
        match &p.generator {
            Generator::Local { strategy } => strategy,
            other => panic!("not a local plan: {other:?}"),
        }
    }

    #[test]
    fn presets_follow_the_paper() {
        let p = plan(&cfg("--setting DP --model m")).unwrap();
        assert_eq!(
            (p.k, p.keep_provided, p.source.as_str()),
            (4, true, "policy:diverse-beam")
        );
        assert_eq!(
            local(&p),
            &Strategy::DiverseBeam {
                num_beams: 4,
                num_beam_groups: 4,
                diversity_penalty: 1.0,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            }
        );
        let p = plan(&cfg("--setting bp --model m")).unwrap();
        assert_eq!(
            local(&p),
            &Strategy::Beam {
                num_beams: 4,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            }
        );
        assert!(p.keep_provided);
        let p = plan(&cfg("--setting SP --model m")).unwrap();
        assert_eq!(
            local(&p),
            &Strategy::Sample {
                temperature: 0.8,
                top_k: Some(50),
                top_p: 1.0,
            }
        );
        assert_eq!((p.k, p.keep_provided), (4, true));
        let p = plan(&cfg("--setting D --model m")).unwrap();
        assert!(!p.keep_provided);
        let p = plan(&cfg("--setting P")).unwrap();
        assert!(matches!(p.generator, Generator::None) && p.k == 0 && p.keep_provided);
    }

    #[test]
    fn flags_override_presets() {
        let p = plan(&cfg(
            "--setting DP --model m --num-responses 6 --num-beam-groups 3 --diversity-penalty 0.5 \
             --beam-length-penalty 2 --early-stopping never --keep-provided false",
        ))
        .unwrap();
        assert_eq!((p.k, p.keep_provided), (6, false));
        assert_eq!(
            local(&p),
            &Strategy::DiverseBeam {
                num_beams: 6,
                num_beam_groups: 3,
                diversity_penalty: 0.5,
                length_penalty: 2.0,
                early_stopping: EarlyStopping::Never,
            }
        );
        let p = plan(&cfg("--setting BP --model m --strategy sample --top-k 0")).unwrap();
        assert!(p.keep_provided);
        assert_eq!(
            local(&p),
            &Strategy::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: 1.0,
            }
        );
        let p = plan(&cfg("--strategy greedy --model m --keep-provided")).unwrap();
        assert_eq!(
            (p.k, p.keep_provided, p.source.as_str()),
            (1, true, "policy:greedy")
        );
    }

    #[test]
    fn bad_combinations_are_explained() {
        let err = |args: &str| plan(&cfg(args)).unwrap_err().to_string();
        assert!(err("").contains("--setting"));
        assert!(err("--setting DP").contains("--model"));
        assert!(err("--strategy greedy --model m --num-responses 3").contains("greedy"));
        assert!(
            err("--setting DP --model m --num-beams 4 --num-beam-groups 3").contains("divisible")
        );
        assert!(err("--setting BP --model m --num-beams 2").contains("--num-beams"));
        assert!(err("--setting SP --model m --temperature 0").contains("greedy"));
        assert!(err("--setting P --endpoint http://x").contains("setting P"));
        assert!(err("--endpoint http://x").contains("--endpoint-model"));
        assert!(err("--endpoint http://x --model m").contains("--append"));
        assert!(err("--setting SP --model m --top-p 1.5").contains("--top-p"));
        assert!(err("--setting SP --model m --num-responses 0").contains("at least 1"));
    }

    #[test]
    fn endpoint_plan_passes_sampling_parameters() {
        let p = plan(&cfg(
            "--setting SP --endpoint http://127.0.0.1:1 --endpoint-model gpt --top-p 0.9",
        ))
        .unwrap();
        assert_eq!(
            (p.k, p.keep_provided, p.source.as_str()),
            (4, true, "endpoint:gpt")
        );
        assert!(
            matches!(p.generator, Generator::Endpoint { temperature, top_p } if temperature == 0.8 && top_p == 0.9)
        );
        let p = plan(&cfg("--endpoint http://h --endpoint-model m")).unwrap();
        assert_eq!((p.k, p.keep_provided), (1, false));
    }

    #[test]
    fn stop_strings_cut_text() {
        let stops = vec!["Human:".to_string(), "Assistant:".to_string()];
        assert_eq!(
            cut_at_stop(" Sure thing.\n\nHuman: and now?", &stops),
            (" Sure thing.".to_string(), true)
        );
        assert_eq!(
            cut_at_stop("Assistant: x Human:", &stops),
            (String::new(), true)
        );
        assert_eq!(cut_at_stop(" fine", &stops), (" fine".to_string(), false));
        assert_eq!(cut_at_stop(" fine", &[]), (" fine".to_string(), false));
    }

    #[test]
    fn prompts_are_left_truncated_keeping_bos() {
        assert_eq!(
            truncate_prompt(vec![1, 5, 6, 7, 8], 3, Some(1)),
            (vec![1, 7, 8], true)
        );
        assert_eq!(
            truncate_prompt(vec![5, 6, 7, 8], 3, None),
            (vec![6, 7, 8], true)
        );
        assert_eq!(truncate_prompt(vec![1, 5], 3, Some(1)), (vec![1, 5], false));
    }

    #[test]
    fn names_round_trip() {
        for s in ["BP", "SP", "DP", "D", "P"] {
            assert_eq!(s.parse::<Setting>().unwrap().to_string(), s);
        }
        for s in ["greedy", "beam", "diverse-beam", "sample"] {
            assert_eq!(s.parse::<StrategyKind>().unwrap().to_string(), s);
        }
        assert!("XP".parse::<Setting>().is_err());
        assert_eq!("never".parse::<EarlyStop>().unwrap(), EarlyStop::Never);
    }
}
