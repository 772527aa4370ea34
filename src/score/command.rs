//! The `rrhf score` command: read records, fill `scores`, optionally apply the KL penalty, write atomically, print
//! statistics.
//!
//! Progress is saved: every `--save-every-s` seconds the output file is rewritten (atomically) with the records
//! scored so far and `scores: null` for the rest; `--resume` keeps the records already scored in an existing
//! output (matched by query and responses) and scores only the others — including records a judge could not parse
//! before.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, EndpointConfig};
use crate::data::args::ReadArgs;
use crate::data::readers::{read_records, write_records, InputFormat, ReadOptions};
use crate::data::tokenize::TokenizeOptions;
use crate::data::Record;
use crate::device::{DTypeSpec, DeviceSpec};
use crate::dist::{self, shard::Shard};
use crate::model::reward::{load_reward_model, RewardLoadOptions};
use crate::model::{load_model, LoadedModel};
use crate::progress::Progress;

use super::args::{LogprobArgs, RewardArgs};
use super::judge::Judge;
use super::logprob::{sequence_logprobs, LogprobOptions};
use super::reward_model::ModelScorer;
use super::stats::{format_stats, reward_stats, RewardStats};
use super::{vader, RewardSpec, ScoreError, ScoreOn};

/// Flags of `rrhf score`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ScoreConfig {
    /// Records to score (any format the readers take: RRHF JSONL / .gz / Parquet, pairwise, hh, alpaca).
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL: the records with `scores` filled (written atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// model:DIR | judge:URL | vader | policy:DIR | labels.
    #[arg(long)]
    pub reward: RewardSpec,
    /// `--format`, `--prompt-template`, `--skip-invalid` of --data.
    #[command(flatten)]
    #[serde(flatten)]
    pub read: ReadArgs,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeSpec,
    /// The reward-model and judge flags (shared with `rrhf eval` and `rrhf iterate`).
    #[command(flatten)]
    #[serde(flatten)]
    pub reward_args: RewardArgs,
    /// Timeout of one judge request, in milliseconds.
    #[arg(long, default_value_t = 120_000)]
    pub judge_timeout_ms: u64,
    /// Retries of a judge request (429, 5xx, timeouts, connection errors).
    #[arg(long, default_value_t = 3)]
    pub judge_retries: u32,
    /// First back-off of a retried judge request, in milliseconds (doubles each retry).
    #[arg(long, default_value_t = 1000)]
    pub judge_backoff_ms: u64,
    /// Judge requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub judge_concurrency: usize,
    /// max_tokens of a judge reply.
    #[arg(long, default_value_t = 512)]
    pub judge_max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub judge_temperature: f64,
    /// Tokens of query + response for policy:/KL log-probs (as in train).
    #[arg(long, default_value_t = 192)]
    pub max_len: usize,
    #[arg(long)]
    pub max_query_len: Option<usize>,
    /// How policy: and KL log-probs are computed (shared with `rrhf rank`).
    #[command(flatten)]
    #[serde(flatten)]
    pub logprob: LogprobArgs,
    /// β of the KL penalty R − β·(log π(y|x) − log ρ(y|x)); needs --policy and --reference.
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// The policy π of the KL term (a causal LM).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The reference ρ of the KL term (a causal LM).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Continue a partly scored output file: records scored there are kept, the others scored.
    #[arg(long)]
    pub resume: bool,
    /// Seconds between saves of the partly scored output (0: after every chunk).
    #[arg(long, default_value_t = 60)]
    pub save_every_s: u64,
    /// Leave records that could not be scored out of the output instead of writing them with `scores: null`.
    #[arg(long)]
    pub drop_unscored: bool,
    /// Also write the statistics as JSON here.
    #[arg(long)]
    pub stats_output: Option<PathBuf>,
}

impl ScoreConfig {
    /// A config with the command-line defaults.
    pub fn new(data: PathBuf, output: PathBuf, reward: RewardSpec) -> Self {
        ScoreConfig {
            data,
            output,
            reward,
            read: ReadArgs::default(),
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::F32,
            reward_args: RewardArgs::default(),
            judge_timeout_ms: 120_000,
            judge_retries: 3,
            judge_backoff_ms: 1000,
            judge_concurrency: 4,
            judge_max_tokens: 512,
            judge_temperature: 0.0,
            max_len: 192,
            max_query_len: None,
            logprob: LogprobArgs::default(),
            kl_coef: None,
            policy: None,
            reference: None,
            resume: false,
            save_every_s: 60,
            drop_unscored: false,
            stats_output: None,
        }
    }
}

/// What a scoring run did.
#[derive(Debug, Clone)]
pub struct ScoreSummary {
    /// Input records.
    pub records: usize,
    /// Records with scores in the output (including resumed ones).
    pub scored: usize,
    /// Records taken over from the output being resumed.
    pub resumed: usize,
    /// Records left unscored (written with `scores: null`, or dropped with `--drop-unscored`).
    pub unscored: usize,
    /// Why, for the first few unscored records: `record N: reason`.
    pub unscored_examples: Vec<String>,
    /// Input records skipped as invalid (`--skip-invalid`).
    pub skipped_invalid: usize,
    /// Responses scored in this run.
    pub responses: usize,
    pub seconds: f64,
    /// Responses scored per second in this run.
    pub responses_per_s: f64,
    /// Mean of log π(y|x) − log ρ(y|x) over the responses scored in this run, with --kl-coef.
    pub mean_kl: Option<f64>,
    pub stats: Vec<RewardStats>,
}

impl ScoreSummary {
    /// The end-of-run report: counts, unscored examples, and the statistics table.
    pub fn report(&self) -> String {
        let mut s = format!(
            "scored {} of {} records ({} taken over from the output) — {} responses in {:.1} s, {:.1} responses/s\n",
            self.scored, self.records, self.resumed, self.responses, self.seconds, self.responses_per_s
        );
        if self.skipped_invalid > 0 {
            s.push_str(&format!(
                "{} invalid input records skipped\n",
                self.skipped_invalid
            ));
        }
        if self.unscored > 0 {
            s.push_str(&format!(
                "{} records left unscored (rerun with --resume to retry them), e.g.:\n",
                self.unscored
            ));
            for e in &self.unscored_examples {
                s.push_str(&format!("  {e}\n"));
            }
        }
        if let Some(kl) = self.mean_kl {
            s.push_str(&format!(
                "mean log π(y|x) − log ρ(y|x) over the responses: {kl:.4}\n"
            ));
        }
        if !self.stats.is_empty() {
            s.push_str(&format_stats(&self.stats));
        }
        s
    }
}

/// How many unscored records the summary quotes.
const EXAMPLES: usize = 5;

enum Scorer {
    Model(Box<ModelScorer>),
    Judge(Judge),
    Vader(ScoreOn),
    /// The model, how its log-probs are taken, and the length penalty of p_i.
    Policy(Box<LoadedModel>, LogprobOptions, f64),
    Labels,
}

impl Scorer {
    /// Records per chunk between progress updates and saves.
    fn chunk(&self, cfg: &ScoreConfig) -> usize {
        match self {
            Scorer::Model(_) => cfg.reward_args.batch_size.max(1) * 4,
            Scorer::Judge(_) => cfg.judge_concurrency.max(1) * 2,
            Scorer::Vader(_) | Scorer::Labels => 1024,
            Scorer::Policy(..) => cfg.logprob.batch_queries.max(1) * 4,
        }
    }

    /// Per record: the rewards, or why it cannot be scored. Errors of the model are fatal.
    fn score(
        &self,
        records: &[&Record],
        device: &candle_core::Device,
    ) -> Result<Vec<Result<Vec<f64>, String>>, ScoreError> {
        Ok(match self {
            Scorer::Model(m) => m.score(records)?.into_iter().map(Ok).collect(),
            Scorer::Judge(j) => j.score(records),
            Scorer::Vader(on) => records
                .iter()
                .map(|r| {
                    Ok(r.responses
                        .iter()
                        .map(|resp| match on {
                            ScoreOn::Response => vader::compound(resp),
                            ScoreOn::Full => vader::compound(&format!("{}{resp}", r.query)),
                        })
                        .collect())
                })
                .collect(),
            Scorer::Policy(m, opts, lp) => sequence_logprobs(m, records, opts, device)?
                .p(*lp)
                .into_iter()
                .map(Ok)
                .collect(),
            Scorer::Labels => records
                .iter()
                .map(|r| {
                    r.scores
                        .clone()
                        .ok_or_else(|| "no scores in the data (--reward labels keeps them)".into())
                })
                .collect(),
        })
    }
}

fn config_err(msg: impl Into<String>) -> ScoreError {
    ScoreError::Config(msg.into())
}

fn check_flags(cfg: &ScoreConfig) -> Result<(), ScoreError> {
    let is_model = matches!(cfg.reward, RewardSpec::Model(_));
    let is_judge = matches!(cfg.reward, RewardSpec::Judge(_));
    if !is_model {
        for (set, flag) in [
            (cfg.reward_args.label.is_some(), "--label"),
            (cfg.reward_args.rm_config.is_some(), "--rm-config"),
            (cfg.reward_args.rm_tokenizer.is_some(), "--rm-tokenizer"),
            (cfg.reward_args.rm_max_len.is_some(), "--rm-max-len"),
            (cfg.reward_args.rm_separator.is_some(), "--rm-separator"),
            (cfg.reward_args.rm_append_eos, "--rm-append-eos"),
        ] {
            if set {
                return Err(config_err(format!(
                    "{flag} applies to --reward model:DIR only (the reward is {})",
                    cfg.reward
                )));
            }
        }
    }
    if is_judge && cfg.reward_args.judge_model.is_none() {
        return Err(config_err(
            "--reward judge:URL needs --judge-model NAME (the `model` field of each request)",
        ));
    }
    if !is_judge && (cfg.reward_args.judge_model.is_some() || cfg.reward_args.api_key_env.is_some())
    {
        return Err(config_err(
            "--judge-model / --api-key-env apply to --reward judge:URL only",
        ));
    }
    if cfg.reward_args.score_on.is_some()
        && !matches!(cfg.reward, RewardSpec::Model(_) | RewardSpec::Vader)
    {
        return Err(config_err(
            "--score-on applies to --reward model:DIR and vader only",
        ));
    }
    match (cfg.kl_coef, &cfg.policy, &cfg.reference) {
        (Some(b), Some(_), Some(_)) if b.is_finite() => {}
        (Some(b), Some(_), Some(_)) => {
            return Err(config_err(format!("--kl-coef must be finite, got {b}")))
        }
        (Some(_), _, _) => {
            return Err(config_err(
                "--kl-coef needs both --policy DIR (π) and --reference DIR (ρ)",
            ))
        }
        (None, None, None) => {}
        (None, _, _) => {
            return Err(config_err(
                "--policy / --reference are the two models of the KL penalty: give --kl-coef β too",
            ))
        }
    }
    if cfg.output == cfg.data {
        return Err(config_err(
            "--output must differ from --data (the input is read once, the output rewritten while scoring)",
        ));
    }
    Ok(())
}

/// Key of a record for matching a resumed output to the input.
fn key(r: &Record) -> (String, Vec<String>) {
    (r.query.clone(), r.responses.clone())
}

/// Scores by record (query, responses); several equal records queue up.
type ScoresByRecord = HashMap<(String, Vec<String>), VecDeque<Vec<f64>>>;

/// Scores of the records already scored in `cfg.output`.
fn resumed_scores(cfg: &ScoreConfig, output: &Path) -> Result<ScoresByRecord, ScoreError> {
    let mut map: HashMap<_, VecDeque<Vec<f64>>> = HashMap::new();
    if !cfg.resume || !output.exists() {
        return Ok(map);
    }
    let prev = match read_records(
        output,
        &ReadOptions {
            format: InputFormat::Rrhf,
            require_scores: false,
            ..ReadOptions::default()
        },
    ) {
        Ok(p) => p,
        Err(crate::data::DataError::Empty(_)) => return Ok(map),
        Err(e) => return Err(e.into()),
    };
    for r in prev.records {
        if let Some(s) = r.scores.clone() {
            map.entry(key(&r)).or_default().push_back(s);
        }
    }
    Ok(map)
}

fn make_scorer(
    cfg: &ScoreConfig,
    device: &candle_core::Device,
    lp_opts: LogprobOptions,
) -> Result<Scorer, ScoreError> {
    let dtype = cfg.dtype.dtype();
    Ok(match &cfg.reward {
        RewardSpec::Model(path) => {
            let rm = load_reward_model(
                path,
                &RewardLoadOptions {
                    config: cfg.reward_args.rm_config.clone(),
                    tokenizer: cfg.reward_args.rm_tokenizer.clone(),
                    max_len: cfg.reward_args.rm_max_len,
                },
                device,
                dtype,
            )?;
            Scorer::Model(Box::new(ModelScorer::new(
                rm,
                cfg.reward_args.label.as_deref(),
                cfg.reward_args.score_on,
                cfg.reward_args.rm_separator.as_deref(),
                cfg.reward_args.rm_append_eos,
                cfg.reward_args.batch_size,
            )?))
        }
        RewardSpec::Judge(url) => {
            let ep = EndpointConfig {
                url: url.clone(),
                model: cfg.reward_args.judge_model.clone().unwrap_or_default(),
                api_key_env: cfg.reward_args.api_key_env.clone(),
                timeout: Duration::from_millis(cfg.judge_timeout_ms),
                max_retries: cfg.judge_retries,
                backoff: Duration::from_millis(cfg.judge_backoff_ms),
                concurrency: cfg.judge_concurrency.max(1),
            };
            Scorer::Judge(Judge::new(
                Client::new(ep)?,
                cfg.judge_max_tokens,
                cfg.judge_temperature,
            ))
        }
        RewardSpec::Vader => Scorer::Vader(cfg.reward_args.score_on.unwrap_or(ScoreOn::Response)),
        RewardSpec::Policy(path) => {
            let m = load_model(path, device, dtype)?;
            Scorer::Policy(Box::new(m), lp_opts, cfg.logprob.length_penalty)
        }
        RewardSpec::Labels => Scorer::Labels,
    })
}

/// The reward of `--reward` loaded once, for commands that score responses of their own (`rrhf eval`): the same
/// reward kinds and flags as `rrhf score`, without its files, resume or KL penalty.
pub struct RewardFn {
    scorer: Scorer,
    device: candle_core::Device,
    /// Records per call of the scorer (bounds memory as `rrhf score`'s chunks do).
    chunk: usize,
}

impl RewardFn {
    /// Checks the reward flags of `cfg` and loads the reward (model weights, judge client); `cfg.data`,
    /// `cfg.output` and the KL flags are not used.
    pub fn load(cfg: &ScoreConfig) -> Result<Self, ScoreError> {
        check_flags(cfg)?;
        let device = cfg.device.open()?;
        let lp_opts = LogprobOptions {
            tokenize: TokenizeOptions::new(cfg.max_len, cfg.max_query_len).map_err(config_err)?,
            layout: cfg.logprob.layout,
            batch_queries: cfg.logprob.batch_queries,
        };
        let scorer = make_scorer(cfg, &device, lp_opts)?;
        let chunk = scorer.chunk(cfg);
        Ok(RewardFn {
            scorer,
            device,
            chunk,
        })
    }

    /// Per record, one reward per response, or why the record could not be scored (a judge reply without
    /// scores). A NaN or infinite reward is an error naming the record (0-based index + 1) and response.
    pub fn score(&self, records: &[&Record]) -> Result<Vec<Result<Vec<f64>, String>>, ScoreError> {
        let mut out = Vec::with_capacity(records.len());
        for (c, chunk) in records.chunks(self.chunk.max(1)).enumerate() {
            for (j, res) in self
                .scorer
                .score(chunk, &self.device)?
                .into_iter()
                .enumerate()
            {
                let i = c * self.chunk.max(1) + j;
                if let Ok(s) = &res {
                    if s.len() != records[i].responses.len() {
                        return Err(config_err(format!(
                            "record {}: {} scores for {} responses",
                            i + 1,
                            s.len(),
                            records[i].responses.len()
                        )));
                    }
                    if let Some((r, x)) = s.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                        return Err(ScoreError::NonFinite(format!(
                            "record {}, response {}: the reward is {x} (with --dtype f16/bf16 try f32)",
                            i + 1,
                            r + 1
                        )));
                    }
                }
                out.push(res);
            }
        }
        Ok(out)
    }
}

/// Runs `rrhf score`.
pub fn score(cfg: &ScoreConfig) -> Result<ScoreSummary, ScoreError> {
    check_flags(cfg)?;
    if let Some(dir) = cfg.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| crate::data::DataError::io(dir, e))?;
    }
    let device = cfg.device.open()?;
    let tokenize = TokenizeOptions::new(cfg.max_len, cfg.max_query_len).map_err(config_err)?;
    let lp_opts = LogprobOptions {
        tokenize,
        layout: cfg.logprob.layout,
        batch_queries: cfg.logprob.batch_queries,
    };
    let read = read_records(&cfg.data, &cfg.read.options(false))?;
    let input = read.records;
    let n = input.len();

    // Under mpirun: this rank scores its blocks of records into its own part of the output (see dist::shard).
    let comm = dist::world();
    let shard = Shard::new(comm, &cfg.output);
    let part = shard.part();
    // Records already scored in the output being resumed.
    let mut resumed_map = resumed_scores(cfg, &part)?;
    let mut out: Vec<Record> = input
        .iter()
        .map(|r| Record {
            scores: None,
            ..r.clone()
        })
        .collect();
    let mut resumed = 0;
    for r in out.iter_mut() {
        if let Some(q) = resumed_map.get_mut(&key(r)) {
            if let Some(s) = q.pop_front() {
                r.scores = Some(s);
                resumed += 1;
            }
        }
    }
    let pending: Vec<usize> = (0..n).filter(|&i| out[i].scores.is_none()).collect();

    let scorer = make_scorer(cfg, &device, lp_opts)?;
    let kl_models = match (cfg.kl_coef, &cfg.policy, &cfg.reference) {
        (Some(beta), Some(p), Some(r)) => {
            let dtype = cfg.dtype.dtype();
            Some((
                beta,
                load_model(p, &device, dtype)?,
                load_model(r, &device, dtype)?,
            ))
        }
        _ => None,
    };

    let chunk = scorer.chunk(cfg);
    // Blocks of `chunk` records by absolute index, so that each record is scored in the batch one process would
    // score it in.
    let pending: Vec<usize> = pending
        .into_iter()
        .filter(|&i| shard.owns(i / chunk))
        .collect();
    let started = Instant::now();
    let mut last_save = Instant::now();
    // a plain line every 10% when stderr is not a terminal
    let progress = Progress::new(pending.len() as u64, 0, (pending.len() as u64 / 10).max(1));
    let mut failures: Vec<String> = Vec::new();
    let (mut done, mut responses) = (0usize, 0usize);
    let (mut kl_sum, mut kl_n) = (0f64, 0usize);
    let mut run = || -> Result<(), ScoreError> {
        for idx in pending.chunks(chunk) {
            let recs: Vec<&Record> = idx.iter().map(|&i| &input[i]).collect();
            let results = scorer.score(&recs, &device)?;
            // log π(y|x) − log ρ(y|x) per response.
            let kl: Option<Vec<Vec<f64>>> = match &kl_models {
                Some((_, pi, rho)) => {
                    let lp = sequence_logprobs(pi, &recs, &lp_opts, &device)?;
                    let lr = sequence_logprobs(rho, &recs, &lp_opts, &device)?;
                    Some(
                        lp.logp
                            .iter()
                            .zip(&lr.logp)
                            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect())
                            .collect(),
                    )
                }
                None => None,
            };
            for (j, (&i, res)) in idx.iter().zip(results).enumerate() {
                let mut s = match res {
                    Ok(s) => s,
                    Err(why) => {
                        failures.push(format!("record {}: {why}", i + 1));
                        continue;
                    }
                };
                if s.len() != input[i].responses.len() {
                    return Err(config_err(format!(
                        "record {}: {} scores for {} responses",
                        i + 1,
                        s.len(),
                        input[i].responses.len()
                    )));
                }
                if let (Some((beta, ..)), Some(kl)) = (&kl_models, &kl) {
                    for (x, d) in s.iter_mut().zip(&kl[j]) {
                        *x -= beta * d;
                        kl_sum += d;
                        kl_n += 1;
                    }
                }
                if let Some((r, x)) = s.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    return Err(ScoreError::NonFinite(format!(
                        "record {} of {}, response {}: the reward is {x}; refusing to write it (JSON has no NaN \
                         or infinity; with --dtype f16/bf16 try f32)",
                        i + 1,
                        cfg.data.display(),
                        r + 1
                    )));
                }
                responses += s.len();
                out[i].scores = Some(s);
            }
            done += idx.len();
            let rate = responses as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let detail = format!("{rate:.1} responses/s, {} unscored", failures.len());
            progress.report(done as u64, "score", &detail);
            if done < pending.len() && last_save.elapsed().as_secs() >= cfg.save_every_s {
                write_records(&part, &out)?;
                last_save = Instant::now();
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        // Keep what was scored so that --resume continues from it.
        if out.iter().any(|r| r.scores.is_some()) {
            write_records(&part, &out)?;
        }
        return Err(e);
    }
    if shard.is_parallel() {
        // Every rank's part holds all records (its own scored); each rank then gets the whole job's records and
        // counts, so that all of them report (and refuse) alike.
        write_records(&part, &out)?;
        shard.merge_scores(comm, &mut out, chunk)?;
        let mut sums = [responses as f64, kl_sum, kl_n as f64, resumed as f64];
        comm.sum_f64("the scoring counts", &mut sums);
        (responses, kl_sum, kl_n, resumed) = (
            sums[0] as usize,
            sums[1],
            sums[2] as usize,
            sums[3] as usize,
        );
    }
    let seconds = started.elapsed().as_secs_f64();

    let unscored = out.iter().filter(|r| r.scores.is_none()).count();
    let skipped_invalid = read.skipped.len();
    let final_records: Vec<Record> = if cfg.drop_unscored {
        out.into_iter().filter(|r| r.scores.is_some()).collect()
    } else {
        out
    };
    if unscored == n {
        return Err(config_err(format!(
            "no record could be scored, so nothing was written to {} (e.g. {})",
            cfg.output.display(),
            failures.first().map_or("-", String::as_str)
        )));
    }
    if comm.is_root() {
        write_records(&cfg.output, &final_records)?;
    }
    let stats = reward_stats(&final_records);
    if let Some(p) = cfg.stats_output.as_ref().filter(|_| comm.is_root()) {
        let text = serde_json::to_string_pretty(&stats).map_err(|e| config_err(e.to_string()))?;
        crate::fsutil::write_atomic(p, text.as_bytes()).map_err(crate::model::ModelError::from)?;
    }
    Ok(ScoreSummary {
        records: n,
        scored: n - unscored,
        resumed,
        unscored,
        unscored_examples: failures.into_iter().take(EXAMPLES).collect(),
        skipped_invalid,
        responses,
        seconds,
        responses_per_s: responses as f64 / seconds.max(1e-9),
        mean_kl: (kl_n > 0).then(|| kl_sum / kl_n as f64),
        stats,
    })
}

/// `rrhf score` for the command line: runs and prints the report.
pub fn run_cli(cfg: &ScoreConfig) -> Result<(), ScoreError> {
    let s = score(cfg)?;
    if dist::world().is_root() {
        print!("{}", s.report());
        eprintln!("wrote {}", cfg.output.display());
    }
    Ok(())
}
