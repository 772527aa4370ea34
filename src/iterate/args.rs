//! The flag groups of `rrhf iterate` and their mapping onto the configs of `rrhf sample`, `score`, `train` and
//! `eval` (one place each, so a stage runs exactly as the command of the same name would with these flags).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::batch::Layout;
use crate::data::readers::{InputFormat, PromptTemplate};
use crate::eval::command::EvalConfig;
use crate::eval::perplexity::PplContext;
use crate::model::load::ModelArgs;
use crate::sample::command::{EarlyStop, SampleConfig, Setting, StrategyKind};
use crate::score::ScoreConfig;
use crate::train::loss::SftReduction;
use crate::train::schedule::ScheduleKind;
use crate::train::trainer::TrainConfig;

use super::IterateConfig;

/// How responses are generated (the flags of `rrhf sample`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SamplingArgs {
    /// The paper's preset of `rrhf sample --setting` (BP, SP, DP, D); IP-n and OP-k use DP (diverse beam 4×4 +
    /// the dataset's responses). The flags below override it.
    #[arg(long, default_value = "DP")]
    pub sample_setting: Setting,
    /// greedy, beam, diverse-beam or sample (default: the preset's).
    #[arg(long)]
    pub strategy: Option<StrategyKind>,
    /// Generated responses per prompt.
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
    /// Beam search early stopping: true, false or never (default false).
    #[arg(long)]
    pub early_stopping: Option<EarlyStop>,
    /// Sampling temperature (default 1.0; SP 0.8).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Top-k of sampling (default 50; 0 turns it off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Top-p of sampling (default 1.0).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// New tokens per response, at most (also of the evaluation's greedy generations).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompt tokens, at most (longer prompts keep their end and BOS).
    #[arg(long, default_value_t = 256)]
    pub max_prompt_len: usize,
    /// Stop string (repeatable); default "Human:" and "Assistant:" for HH-style prompts; `--stop ""`: none.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the dataset's responses beside the generated ones (default: the preset's).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_provided: Option<bool>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_prompts: usize,
    /// bf16: sampling and the evaluation's greedy generations read bf16 copies of an f32 LLaMA's matrices (as
    /// `rrhf sample --decode-dtype bf16`; training and log-probs stay f32). Default f32.
    #[arg(long)]
    pub decode_dtype: Option<crate::device::DTypeSpec>,
}

/// How the policy is trained (the flags of `rrhf train` other than its files; defaults as there).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct TrainArgs {
    /// Weight of the ranking loss (the paper: 1).
    #[arg(long, default_value_t = 1.0)]
    pub rank_weight: f64,
    /// Exponent of the response length in p_i (also of policy: rewards and --pairs accuracy).
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Margin λ per rank position in the ranking loss (0: the paper's loss).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Reduction of the SFT term: mean or sum (Eq. 4 literally).
    #[arg(long, default_value = "mean")]
    pub sft_reduction: SftReduction,
    /// Queries per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_queries: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Decoupled weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Decay after warm-up: linear (the paper), cosine or constant.
    #[arg(long, default_value = "linear")]
    pub schedule: ScheduleKind,
    /// Clip the global gradient norm to this (≤ 0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Passes over the data (IP: over each iteration's samples; OP: over the prompts).
    #[arg(long, default_value_t = 3)]
    pub epochs: u64,
    /// Optimizer steps (IP: per iteration; OP: in all), overriding --epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Checkpoint every N optimizer steps (OP: a multiple of --resample-every) and at the end.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep at most N checkpoints (0: all).
    #[arg(long, default_value_t = 0)]
    pub save_total_limit: usize,
    /// Skip up to N optimizer steps with a non-finite loss or gradient norm (0: stop at the first).
    #[arg(long, default_value_t = 0)]
    pub skip_nonfinite: u64,
    /// packed: one row per query shared by its responses; padded: one row per response.
    #[arg(long, default_value = "packed")]
    pub layout: Layout,
    /// Recompute each decoder block in backward (less memory, about a third more compute).
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// `--dtype f16`: initial loss scale of IP's training (dynamic, as `rrhf train`).
    #[arg(long, default_value_t = 65536.0)]
    pub loss_scale: f64,
    /// `--dtype f16`: good steps in a row after which the loss scale doubles.
    #[arg(long, default_value_t = 2000)]
    pub loss_scale_window: u64,
    /// Print a plain progress line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

/// What each iteration's model is evaluated on (the flags of `rrhf eval`; IP only).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct EvalArgs {
    /// Prompts of the evaluation (default: --prompts; the paper evaluates on the test split).
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Evaluator LM of the perplexity (the paper: gpt2-medium).
    #[arg(long)]
    pub ppl_model: Option<PathBuf>,
    /// What a response is conditioned on for its perplexity: query or none (BOS only).
    #[arg(long, default_value = "query")]
    pub ppl_context: PplContext,
    /// Held-out chosen/rejected pairs: accuracy of each model's p_i (Table 5).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Best-of-n reward of each model's samples.
    #[arg(long)]
    pub best_of: Option<usize>,
}

impl IterateConfig {
    /// `rrhf sample` with `model` on `prompts` into `output`, seeded with `seed`.
    pub fn sample_config(
        &self,
        model: &Path,
        prompts: PathBuf,
        output: PathBuf,
        seed: u64,
        resume: bool,
    ) -> SampleConfig {
        let s = &self.sampling;
        SampleConfig {
            model: Some(model.to_path_buf()),
            prompts,
            output,
            setting: Some(s.sample_setting),
            strategy: s.strategy,
            num_responses: s.num_responses,
            num_beams: s.num_beams,
            num_beam_groups: s.num_beam_groups,
            diversity_penalty: s.diversity_penalty,
            beam_length_penalty: s.beam_length_penalty,
            early_stopping: s.early_stopping,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed,
            max_new_tokens: s.max_new_tokens,
            max_prompt_len: s.max_prompt_len,
            stop: s.stop.clone(),
            keep_provided: s.keep_provided,
            batch_prompts: s.batch_prompts,
            device: self.model.device,
            dtype: self.model.dtype,
            decode_dtype: self.sampling.decode_dtype,
            format: self.records.format,
            prompt_template: self.records.prompt_template,
            skip_invalid: self.records.skip_invalid,
            resume,
            append: false,
            endpoint: None,
            endpoint_model: None,
            api_key_env: None,
            endpoint_api: crate::client::ApiKind::Chat,
            concurrency: 1,
            timeout_ms: 120_000,
            retries: 0,
            backoff_ms: 1000,
            log_every: 1,
        }
    }

    /// `rrhf score --reward` of `data` into `output` (no KL: OP applies it with the policy it holds).
    pub fn score_config(&self, data: PathBuf, output: PathBuf, resume: bool) -> ScoreConfig {
        let mut s = ScoreConfig::new(data, output, self.reward.clone());
        s.device = self.model.device;
        s.dtype = self.model.dtype;
        self.reward_args.apply(&mut s);
        s.max_len = self.records.max_len;
        s.max_query_len = self.records.max_query_len;
        s.length_penalty = self.train.length_penalty;
        s.batch_queries = self.train.batch_queries;
        s.layout = self.train.layout;
        s.resume = resume;
        s
    }

    /// `rrhf train` of `model` on the scored records `data` into `output`.
    pub fn train_config(&self, model: &Path, data: PathBuf, output: PathBuf) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            model: ModelArgs {
                model: model.to_path_buf(),
                device: self.model.device,
                dtype: self.model.dtype,
            },
            data,
            output,
            // The samples are RRHF records whatever --prompts was.
            records: crate::data::args::RecordArgs {
                format: InputFormat::Rrhf,
                prompt_template: PromptTemplate::None,
                skip_invalid: self.records.skip_invalid,
                max_len: self.records.max_len,
                max_query_len: self.records.max_query_len,
                no_response_eos: self.records.no_response_eos,
            },
            rank_weight: t.rank_weight,
            length_penalty: t.length_penalty,
            margin: t.margin,
            sft_reduction: t.sft_reduction,
            batch_queries: t.batch_queries,
            grad_accum: t.grad_accum,
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            adam_eps: t.adam_eps,
            weight_decay: t.weight_decay,
            warmup_ratio: t.warmup_ratio,
            schedule: t.schedule,
            max_grad_norm: t.max_grad_norm,
            epochs: t.epochs,
            max_steps: t.max_steps,
            seed: self.seed,
            eval_data: None,
            eval_every: None,
            save_every: t.save_every,
            save_total_limit: t.save_total_limit,
            save_dtype: None,
            resume: None,
            overwrite: false,
            skip_nonfinite: t.skip_nonfinite,
            layout: t.layout,
            grad_checkpoint: t.grad_checkpoint,
            loss_scale: t.loss_scale,
            loss_scale_window: t.loss_scale_window,
            log_every: t.log_every,
            // `rrhf iterate` runs as one process: no collective to time out.
            collective_timeout_s: 0.0,
        }
    }

    /// `rrhf eval` of `model` into `output`: greedy generations on the evaluation prompts, with the sampling
    /// limits and reward of the run.
    pub fn eval_config(&self, model: &Path, output: PathBuf) -> EvalConfig {
        let e = &self.eval;
        EvalConfig {
            models: vec![model.to_path_buf()],
            prompts: e
                .eval_prompts
                .clone()
                .unwrap_or_else(|| self.prompts.clone()),
            reward: self.reward.clone(),
            output,
            max_new_tokens: self.sampling.max_new_tokens,
            max_prompt_len: self.sampling.max_prompt_len,
            stop: self.sampling.stop.clone(),
            batch_prompts: self.sampling.batch_prompts,
            format: self.records.format,
            prompt_template: self.records.prompt_template,
            skip_invalid: self.records.skip_invalid,
            ppl_model: e.ppl_model.clone(),
            ppl_context: e.ppl_context,
            ppl_batch_size: 8,
            pairs: e.pairs.clone(),
            best_of: e.best_of,
            best_of_first_only: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: self.seed,
            train_data: None,
            reward_args: self.reward_args.clone(),
            max_len: self.records.max_len,
            length_penalty: self.train.length_penalty,
            device: self.model.device,
            dtype: self.model.dtype,
            decode_dtype: self.sampling.decode_dtype,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DTypeSpec;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: super::super::IterateConfig,
    }

    #[test]
    fn decode_dtype_reaches_the_sample_and_eval_stages() {
        let argv = "iterate --setting IP --model m --prompts p.jsonl --output o --reward vader --decode-dtype bf16";
        let cfg = Cli::try_parse_from(argv.split_whitespace()).unwrap().cfg;
        let s = cfg.sample_config(Path::new("m"), "p".into(), "o".into(), 1, false);
        assert_eq!(s.decode_dtype, Some(DTypeSpec::Bf16));
        assert_eq!(
            cfg.eval_config(Path::new("m"), "e".into()).decode_dtype,
            Some(DTypeSpec::Bf16)
        );
        let plain = Cli::try_parse_from(
            "iterate --setting IP --model m --prompts p.jsonl --output o --reward vader"
                .split_whitespace(),
        )
        .unwrap()
        .cfg;
        assert_eq!(
            plain
                .sample_config(Path::new("m"), "p".into(), "o".into(), 1, false)
                .decode_dtype,
            None
        );
    }
}
