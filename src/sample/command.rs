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
use std::path::Path;
use std::time::{Duration, Instant};

use crate::data::readers::{read_records, write_records, InputFormat, PromptTemplate, ReadOptions};
use crate::data::{DataError, FinishReason, Record};
use crate::dist::{self, shard::Shard};
use crate::model::{LoadedModel, ModelError};
use crate::progress::Progress;

use super::args::config_err;
pub use super::args::{DecodingArgs, GenerationArgs, SampleConfig, SampleError, SampleSummary};
use super::plan::{describe, plan, Generator, Plan};
use super::prompts::{read_prompts, Prompt};
pub use super::settings::{EarlyStop, Setting, StrategyKind};
use super::source::{Job, Source, Target, Texts};
pub use super::text::{cut_at_stop, first_stop, resolve_stops, truncate_prompt};

/// The output is rewritten after a batch only if this long (or 10× the last write's time, if more) has passed since
/// the last write; always at the end and on errors.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------------------------
// The run.

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
    if cfg.gen.max_new_tokens == 0 && plan.k > 0 {
        return Err(config_err("--max-new-tokens must be at least 1"));
    }
    if cfg.gen.max_prompt_len == 0 {
        return Err(config_err("--max-prompt-len must be at least 1"));
    }
    let (prompts, invalid_skipped) = read_prompts(
        &cfg.prompts,
        cfg.read.format,
        cfg.read.prompt_template,
        cfg.read.skip_invalid,
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
    let stops = resolve_stops(&cfg.gen.stop, &prompts);
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
        Generator::Endpoint { .. } => cfg.gen.batch_prompts.max(cfg.concurrency).max(1),
        _ => cfg.gen.batch_prompts.max(1),
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
        s.at_budget,
    ]
    .map(|x| x as f64);
    comm.sum_f64("the sampling counts", &mut counts);
    let [processed, already_done, generated, provided, tokens, truncated, cut, at_budget] =
        counts.map(|x| x as usize);
    (s.processed, s.already_done, s.generated, s.provided) =
        (processed, already_done, generated, provided);
    (
        s.generated_tokens,
        s.truncated_prompts,
        s.cut_by_stop,
        s.at_budget,
    ) = (tokens as u64, truncated, cut, at_budget);
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

/// The `finish_reasons` field: written only where a response ran into the token budget (absent = all complete, as
/// in files without the field).
fn finish_reasons(f: Vec<FinishReason>) -> Option<Vec<FinishReason>> {
    f.contains(&FinishReason::Length).then_some(f)
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
    summary.cut_by_stop += generated.iter().filter(|g| g.cut_by_stop).count();
    summary.at_budget += generated
        .iter()
        .filter(|g| g.finish == FinishReason::Length)
        .count();
    let mut responses: Vec<String> = Vec::new();
    let mut sources: Vec<String> = Vec::new();
    let mut finish: Vec<FinishReason> = Vec::new();
    for g in generated {
        responses.push(g.text);
        sources.push(plan.source.clone());
        finish.push(g.finish);
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
            finish.push(FinishReason::Stop);
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
                finish_reasons: finish_reasons(finish),
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
            let old_finish = (0..r.responses.len()).map(|j| {
                if r.unfinished(j) {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                }
            });
            r.finish_reasons = finish_reasons(old_finish.chain(finish).collect());
            r.responses.extend(responses);
            r.sources = Some(old_sources.into_iter().chain(sources).collect());
        }
    }
    out.dirty = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::plan::Generator;
    use crate::sample::{EarlyStopping, Strategy};
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
