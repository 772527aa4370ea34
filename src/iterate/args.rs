//! The flag groups of `rrhf iterate` and their mapping onto the configs of `rrhf sample`, `score`, `train` and
//! `eval` (one place each, so a stage runs exactly as the command of the same name would with these flags).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::args::ReadArgs;
use crate::data::readers::{InputFormat, PromptTemplate};
use crate::eval::command::EvalConfig;
use crate::eval::perplexity::PplContext;
use crate::model::load::ModelArgs;
use crate::sample::args::{DecodingArgs, GenerationArgs};
use crate::sample::command::{SampleConfig, Setting};
use crate::score::ScoreConfig;
use crate::train::args::{LossArgs, OptimArgs};
use crate::train::trainer::TrainConfig;

use super::IterateConfig;

/// How responses are generated (the flags of `rrhf sample`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SamplingArgs {
    /// The paper's preset of `rrhf sample --setting` (BP, SP, DP, D); IP-n and OP-k use DP (diverse beam 4×4 +
    /// the dataset's responses). The flags below override it.
    #[arg(long, default_value = "DP")]
    pub sample_setting: Setting,
    /// Strategy and its parameters, overriding the preset (as `rrhf sample`).
    #[command(flatten)]
    #[serde(flatten)]
    pub decoding: DecodingArgs,
    /// Token limits, stops, batching, decoding dtype: a heading of their own, as they also set the evaluation's
    /// greedy generations.
    #[command(
        flatten,
        next_help_heading = "Generation (sampling and the evaluation's greedy generations)"
    )]
    #[serde(flatten)]
    pub gen: GenerationArgs,
}

/// How the policy is trained (the flags of `rrhf train` other than its files; defaults as there).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct TrainArgs {
    /// The loss terms.
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossArgs,
    /// Batching, precision and the optimizer.
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
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
            setting: Some(s.sample_setting),
            decoding: s.decoding.clone(),
            seed,
            gen: s.gen.clone(),
            device: self.model.device,
            dtype: self.model.dtype,
            read: self.records.read,
            resume,
            ..SampleConfig::local(model.to_path_buf(), prompts, output)
        }
    }

    /// `rrhf score --reward` of `data` into `output` (no KL: OP applies it with the policy it holds).
    pub fn score_config(&self, data: PathBuf, output: PathBuf, resume: bool) -> ScoreConfig {
        let mut s = ScoreConfig::new(data, output, self.reward.clone());
        s.device = self.model.device;
        s.dtype = self.model.dtype;
        s.reward_args = self.reward_args.clone();
        s.max_len = self.records.max_len;
        s.max_query_len = self.records.max_query_len;
        s.logprob.length_penalty = self.train.loss.length_penalty;
        s.logprob.batch_queries = self.train.optim.batch_queries;
        s.logprob.layout = self.train.optim.layout;
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
                read: ReadArgs {
                    format: InputFormat::Rrhf,
                    prompt_template: PromptTemplate::None,
                    skip_invalid: self.records.read.skip_invalid,
                },
                max_len: self.records.max_len,
                max_query_len: self.records.max_query_len,
                no_response_eos: self.records.no_response_eos,
            },
            loss: t.loss.clone(),
            optim: t.optim.clone(),
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
            log_every: t.log_every,
            // `rrhf iterate` runs as one process: no collective to time out.
            collective_timeout_s: 0.0,
            zero_stage: 0,
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
            gen: self.sampling.gen.clone(),
            read: self.records.read,
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
            length_penalty: self.train.loss.length_penalty,
            device: self.model.device,
            dtype: self.model.dtype,
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
        assert_eq!(s.gen.decode_dtype, Some(DTypeSpec::Bf16));
        assert_eq!(
            cfg.eval_config(Path::new("m"), "e".into()).gen.decode_dtype,
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
                .gen
                .decode_dtype,
            None
        );
    }

    /// Parses `argv` (after the program name) into `T` as clap does for a subcommand.
    fn parse<T: clap::Args + clap::FromArgMatches>(argv: &str) -> (T, clap::Command) {
        let cmd = T::augment_args(clap::Command::new("rrhf"));
        let m = cmd
            .clone()
            .try_get_matches_from(std::iter::once("rrhf").chain(argv.split_whitespace()))
            .unwrap();
        (T::from_arg_matches(&m).unwrap(), cmd)
    }

    /// args.json and the resume checks read the serialized config by flag name, so the flattened groups must leave
    /// exactly one top-level key per flag (the field name), as before they were shared.
    fn assert_flat<T: clap::Args + clap::FromArgMatches + Serialize>(argv: &str) {
        let (cfg, cmd) = parse::<T>(argv);
        let json = serde_json::to_value(&cfg).unwrap();
        let mut keys: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        keys.sort();
        flags.sort();
        assert_eq!(keys, flags, "{argv}");
    }

    #[test]
    fn every_command_serializes_one_flat_key_per_flag() {
        use crate::eval::rank::RankConfig;
        assert_flat::<SampleConfig>("--prompts p --output o");
        assert_flat::<ScoreConfig>("--data d --output o --reward vader");
        assert_flat::<TrainConfig>("--model m --data d --output o");
        assert_flat::<EvalConfig>("--model m --prompts p --output o --reward vader");
        assert_flat::<RankConfig>("--model m --data d --output o");
        assert_flat::<super::super::IterateConfig>(
            "--setting IP --model m --prompts p --output o --reward vader",
        );
    }

    #[test]
    fn shared_groups_keep_each_command_s_defaults_and_reach_the_stages() {
        let (cfg, _) = parse::<super::super::IterateConfig>(
            "--setting IP --model m --prompts p --output o --reward vader --top-k 7 --max-new-tokens 9 \
             --lr 0.5 --length-penalty 2 --batch-queries 3 --batch-size 5 --layout padded",
        );
        let s = cfg.sample_config(Path::new("m"), "p".into(), "o".into(), 1, false);
        assert_eq!((s.decoding.top_k, s.gen.max_new_tokens), (Some(7), 9));
        let t = cfg.train_config(Path::new("m"), "d".into(), "o".into());
        assert_eq!(
            (t.optim.lr, t.loss.length_penalty, t.optim.batch_queries),
            (0.5, 2.0, 3)
        );
        assert_eq!(t.epochs, 3);
        let sc = cfg.score_config("d".into(), "o".into(), false);
        assert_eq!(
            (
                sc.reward_args.batch_size,
                sc.logprob.batch_queries,
                sc.logprob.length_penalty
            ),
            (5, 3, 2.0)
        );
        assert_eq!(sc.logprob.layout, crate::data::batch::Layout::Padded);
        let e = cfg.eval_config(Path::new("m"), "e".into());
        assert_eq!((e.gen.max_new_tokens, e.reward_args.batch_size), (9, 5));
        // The defaults that differ between commands stay each command's own.
        let (train, _) = parse::<TrainConfig>("--model m --data d --output o");
        assert_eq!(train.optim.batch_queries, 4);
        let (score, _) = parse::<ScoreConfig>("--data d --output o --reward vader");
        assert_eq!(score.logprob.batch_queries, 8);
        let (sample, _) = parse::<SampleConfig>("--prompts p --output o");
        assert_eq!(sample.setting, None);
        assert_eq!(cfg.sampling.sample_setting, Setting::Dp);
        // The groups' `Default` is clap's, which every stage config built in code starts from.
        assert_eq!(GenerationArgs::default().max_new_tokens, 128);
        assert_eq!(crate::score::args::RewardArgs::default().batch_size, 16);
        assert_eq!(crate::score::args::LogprobArgs::default().batch_queries, 8);
    }
}
