//! The flags of `rrhf sample` ([`SampleConfig`]), with the groups `rrhf iterate` and `rrhf eval` share
//! ([`DecodingArgs`], [`GenerationArgs`]); its error and its summary.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::client::{ApiKind, ClientError, ClientStats};
use crate::data::args::ReadArgs;
use crate::data::DataError;
use crate::device::{DTypeSpec, DeviceSpec};
use crate::model::ModelError;

use super::settings::{EarlyStop, Setting, StrategyKind};

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
    /// Strategy and its parameters, overriding the preset.
    #[command(flatten)]
    #[serde(flatten)]
    pub decoding: DecodingArgs,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Token limits, stops, batching and the decoding dtype.
    #[command(flatten)]
    #[serde(flatten)]
    pub gen: GenerationArgs,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeSpec,
    /// `--format`, `--prompt-template`, `--skip-invalid` of --prompts.
    #[command(flatten)]
    #[serde(flatten)]
    pub read: ReadArgs,
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

/// The strategy flags that override a `--setting` preset (shared by `rrhf sample` and `rrhf iterate`, whose
/// presets differ).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct DecodingArgs {
    /// greedy, beam, diverse-beam or sample (default: the preset's).
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
    /// Keep the dataset's responses after the generated ones (default: the preset's; `--keep-provided false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_provided: Option<bool>,
}

/// The limits and batching of generation (shared by `rrhf sample`, `rrhf iterate` and `rrhf eval`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct GenerationArgs {
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
    /// Prompts per generation batch (`rrhf sample --endpoint`: per round of requests).
    #[arg(long, default_value_t = 8)]
    pub batch_prompts: usize,
    /// bf16: decoding steps read bf16 copies of an f32 LLaMA's matrices (CPU; about half the bytes per token; an
    /// approximation of the f32 model, never used for training log-probs, perplexity or p_i). Default f32.
    #[arg(long)]
    pub decode_dtype: Option<DTypeSpec>,
}

impl Default for GenerationArgs {
    /// The command-line defaults.
    fn default() -> Self {
        crate::cli_defaults()
    }
}

impl SampleConfig {
    /// A run of the local `model` on `prompts` into `output` with the command-line defaults otherwise: the base
    /// `rrhf eval` and `rrhf iterate` stage their generations on, so neither spells out the endpoint flags it never
    /// uses.
    pub fn local(model: PathBuf, prompts: PathBuf, output: PathBuf) -> Self {
        SampleConfig {
            model: Some(model),
            prompts,
            output,
            setting: None,
            decoding: DecodingArgs::default(),
            seed: 42,
            gen: GenerationArgs::default(),
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::F32,
            read: ReadArgs::default(),
            resume: false,
            append: false,
            endpoint: None,
            endpoint_model: None,
            api_key_env: None,
            endpoint_api: ApiKind::Chat,
            concurrency: 1,
            timeout_ms: 120_000,
            retries: 0,
            backoff_ms: 1000,
            log_every: 1,
        }
    }
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

pub(super) fn config_err(msg: impl Into<String>) -> SampleError {
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
    /// Responses that ran into --max-new-tokens (`finish_reasons` "length": trained without EOS).
    pub at_budget: usize,
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
             responses, {} tokens at {:.1} tokens/s; {} prompts truncated, {} responses cut at a stop string, {} at the \
             token budget; {} records in {}",
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
            self.at_budget,
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
