//! OP-k (Table 1: "Online"; §5): one process, one policy. Training runs `rrhf train`'s steps over the prompts
//! (the same seeded order: step s covers a fixed slice of epoch e's shuffle); every k optimizer steps a *round*
//! begins: the queries of the round's k steps are sampled with the policy's current weights, scored by the reward
//! (minus β·(log π − log ρ) with `--kl-coef`), and trained on, step by step.
//!
//! The policy used for sampling is the training model itself: its weights are the optimizer's variables, which
//! AdamW updates in place, and generation reads the same storage (through detached tensors, so decoding records no
//! autograd graph), hence the updated weights, with no save or reload. The reference ρ (the
//! initial model) is loaded only when β > 0.
//!
//! Outputs: the model and `checkpoint-N/` as `rrhf train` writes them (N a multiple of k, so a resumed run starts
//! at a round boundary and samples exactly what the uninterrupted run would have), `metrics.jsonl` (a line per
//! step and a line per round: mean reward of the fresh samples, mean KL, mean loss, wall times), `op.png` (reward
//! and KL per round) and `rounds/round-R.jsonl` (each round's records: `scores` = the trained reward R̃, with the
//! reward R and the KL per response beside it).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::data::args::ReadArgs;
use crate::data::prepare::check_max_len;
use crate::data::readers::{read_records, InputFormat, ReadOptions};
use crate::data::tokenize::{tokenize_record, TokenizedRecord};
use crate::data::{DataError, Record};
use crate::fsutil::{write_atomic, write_atomic_with};
use crate::model::save::link_pretrained;
use crate::model::{load_model, CausalLm, LoadedModel, Weights};
use crate::plot::{plot_curves, Series};
use crate::rng::Rng;
use crate::sample::command::sample_with_model;
use crate::sample::prompts::{read_prompts, Prompt};
use crate::score::command::RewardFn;
use crate::score::logprob::{sequence_logprobs, LogprobOptions};
use crate::train::checkpoint::{
    load_checkpoint_state, save_checkpoint, CheckpointParts, TrainerState,
};
use crate::train::log::{read_metrics, MetricsLog};
use crate::train::optim::AdamW;
use crate::train::output::{latest_checkpoint, previous_run};
use crate::train::schedule::{lr_at, warmup_steps};
use crate::train::trainer::{
    check_finite_weights, check_same_run, config_of, data_fingerprint, epoch_seed, fault_nan_at,
    nonfinite_error, optimizer_step, run_fingerprint, StepOutcome, TrainError,
};

use super::{check_common, stage_err, stop_hook, IterateConfig, IterateError};

/// What an OP run did.
#[derive(Debug, Clone)]
pub struct OpSummary {
    /// Rounds and optimizer steps run by this process.
    pub rounds: u64,
    pub steps: u64,
    /// Mean reward R and mean KL (with a reference, β > 0) of the last round's samples.
    pub last_reward: f64,
    pub last_kl: Option<f64>,
}

/// A scratch directory for the round's prompt and sample files, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks the OP flags that need no file; returns k and β.
fn check_flags(cfg: &IterateConfig) -> Result<(u64, f64), IterateError> {
    let bad = |m: String| Err(IterateError::Config(m));
    let Some(k) = cfg.resample_every else {
        return bad("--setting OP needs --resample-every k (optimizer steps between samplings; the paper: 32)".into());
    };
    if k == 0 {
        return bad("--resample-every must be at least 1".into());
    }
    let beta = cfg.kl_coef.unwrap_or(0.0);
    if !beta.is_finite() || beta < 0.0 {
        return bad(format!("--kl-coef must be a finite β ≥ 0, got {beta}"));
    }
    if let Some(se) = cfg.train.save_every {
        if se == 0 || se % k != 0 {
            return bad(format!(
                "--save-every {se} must be a multiple of --resample-every {k}: a checkpoint sits at a round boundary \
                 so that a resumed run samples what the uninterrupted run would have"
            ));
        }
    }
    if cfg.iterations.is_some() {
        return bad(
            "--iterations counts IP iterations; OP runs --epochs or --max-steps, sampling every --resample-every steps"
                .into(),
        );
    }
    let e = &cfg.eval;
    if e.eval_prompts.is_some() || e.ppl_model.is_some() || e.pairs.is_some() || e.best_of.is_some()
    {
        return bad(
            "--eval-prompts, --ppl-model, --pairs and --best-of evaluate IP iterations; evaluate an OP model with \
             rrhf eval"
                .into(),
        );
    }
    if cfg.train.optim.batch_queries == 0 || cfg.train.optim.grad_accum == 0 {
        return bad("--batch-queries and --grad-accum must be at least 1".into());
    }
    Ok((k, beta))
}

/// The prompts of `slots` as a file `rrhf sample` reads: RRHF records with the dataset's responses where every
/// prompt has some (so a D/DP setting keeps them), else `{"query"}` lines. Queries are already templated.
fn write_round_prompts(
    path: &Path,
    prompts: &[Prompt],
    slots: &[(u64, usize)],
) -> Result<(), IterateError> {
    let with_provided = slots.iter().all(|&(_, i)| !prompts[i].provided.is_empty());
    write_atomic_with(path, |w| {
        for &(_, i) in slots {
            let p = &prompts[i];
            let v = if with_provided {
                json!({"query": p.query, "responses": p.provided, "sources": p.provided_sources})
            } else {
                json!({"query": p.query})
            };
            writeln!(w, "{v}")?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Per-round values for `metrics.jsonl`.
#[derive(Default)]
struct RoundStats {
    reward_sum: f64,
    penalized_sum: f64,
    kl_sum: f64,
    responses: usize,
    unscored: usize,
    loss_sum: f64,
    steps: usize,
}

/// Runs `rrhf iterate --setting OP`.
pub fn run_op(cfg: &IterateConfig) -> Result<OpSummary, IterateError> {
    check_common(cfg)?;
    let (k, beta) = check_flags(cfg)?;
    let t = &cfg.train;
    let mut tc = cfg.train_config(&cfg.model.model, cfg.prompts.clone(), cfg.output.clone());
    tc.resume = cfg.resume.clone();
    let previous = previous_run(&cfg.output)?;
    if !previous.is_empty() && cfg.resume.is_none() {
        return Err(TrainError::OutputInUse {
            dir: cfg.output.clone(),
            found: previous.join(", "),
            resume: latest_checkpoint(&cfg.output).map_or_else(
                || cfg.output.join("checkpoint-N").display().to_string(),
                |p| p.display().to_string(),
            ),
        }
        .into());
    }
    let tok_opts = cfg
        .records
        .tokenize_options()
        .map_err(IterateError::Config)?;

    // Every input is checked, and the reward loaded, before the policy.
    let (prompts, _) = read_prompts(
        &cfg.prompts,
        cfg.records.read.format,
        cfg.records.read.prompt_template,
        cfg.records.read.skip_invalid,
    )?;
    let reward =
        RewardFn::load(&cfg.score_config(cfg.prompts.clone(), cfg.output.join("unused"), false))
            .map_err(|source| IterateError::Reward {
                spec: cfg.reward.to_string(),
                cause: Box::new(source),
            })?;
    let resume_state = cfg
        .resume
        .as_deref()
        .map(load_checkpoint_state)
        .transpose()?;

    let n = prompts.len();
    let per_step = t.optim.batch_queries * t.optim.grad_accum;
    let steps_per_epoch = n.div_ceil(per_step) as u64;
    let total_steps = t.max_steps.unwrap_or(steps_per_epoch * t.epochs);
    if total_steps == 0 {
        return Err(IterateError::Config(
            "nothing to do: 0 training steps (check --epochs / --max-steps)".into(),
        ));
    }
    let mut run = run_fingerprint(&tc, tok_opts.max_query_len, data_fingerprint(&cfg.prompts)?);
    // What else decides the samples of a round: a resumed run must repeat it.
    let s = &cfg.sampling;
    for (flag, v) in [
        ("--model", json!(cfg.model.model.display().to_string())),
        ("--reward", json!(cfg.reward.to_string())),
        ("--resample-every", json!(k)),
        ("--kl-coef", json!(beta)),
        ("--sample-setting", json!(s.sample_setting.to_string())),
        (
            "--strategy",
            json!(s.decoding.strategy.map(|x| x.to_string())),
        ),
        ("--num-responses", json!(s.decoding.num_responses)),
        ("--temperature", json!(s.decoding.temperature)),
        ("--top-k", json!(s.decoding.top_k)),
        ("--top-p", json!(s.decoding.top_p)),
        ("--max-new-tokens", json!(s.gen.max_new_tokens)),
        ("--max-prompt-len", json!(s.gen.max_prompt_len)),
    ] {
        run.insert(flag.into(), v);
    }
    if let (Some((state, _)), Some(dir)) = (&resume_state, &cfg.resume) {
        if let Some(then) = &state.run {
            check_same_run(dir, then, &run)?;
        }
        if state.n_records != n as u64 || state.seed != cfg.seed || state.total_steps != total_steps
        {
            return Err(IterateError::Config(format!(
                "--resume: the checkpoint was written by a run with {} prompts, seed {} and {} steps; this run has \
                 {n}, {} and {total_steps}: pass the same prompts and flags",
                state.n_records, state.seed, state.total_steps, cfg.seed
            )));
        }
        if state.step % k != 0 && state.step != total_steps {
            return Err(IterateError::Config(format!(
                "--resume {}: step {} is not a round boundary of --resample-every {k}",
                dir.display(),
                state.step
            )));
        }
    }

    let device = cfg.model.device.open()?;
    let dtype = cfg.model.dtype.dtype();
    if dtype != candle_core::DType::F32 {
        // rrhf train keeps f32 masters for bf16/f16; the OP loop does not yet, and updates below half an ulp
        // would vanish in a low-precision policy.
        return Err(IterateError::Config(format!(
            "--setting OP trains in f32 only for now (--dtype {}); rrhf train and --setting IP support bf16/f16",
            cfg.model.dtype
        )));
    }
    let policy_path = cfg.resume.as_ref().unwrap_or(&cfg.model.model);
    if let Some(config) = config_of(policy_path) {
        check_max_len(cfg.records.max_len, &config, policy_path)?;
    }
    let loaded = load_model(policy_path, &device, dtype)?;
    check_max_len(cfg.records.max_len, &loaded.side.config, policy_path)?;
    let reference = if beta > 0.0 {
        Some(load_model(&cfg.model.model, &device, dtype)?)
    } else {
        None
    };

    std::fs::create_dir_all(&cfg.output).map_err(|e| DataError::io(&cfg.output, e))?;
    let rounds_dir = cfg.output.join("rounds");
    std::fs::create_dir_all(&rounds_dir).map_err(|e| DataError::io(&rounds_dir, e))?;
    let mut args_json =
        serde_json::to_value(cfg).map_err(|e| IterateError::Config(e.to_string()))?;
    args_json["command"] = json!("iterate");
    let args_text = serde_json::to_string_pretty(&args_json)
        .map_err(|e| IterateError::Config(e.to_string()))?;
    write_atomic(&cfg.output.join("args.json"), args_text.as_bytes())?;

    // The policy: its tensors are the optimizer's variables, so sampling sees every update in place.
    let (model, vars) = loaded.model.trainable()?;
    let policy = LoadedModel {
        model,
        tokenizer: loaded.tokenizer.clone(),
        side: loaded.side.clone(),
        source: loaded.source.clone(),
    };
    drop(loaded);
    // Sampling and log π read the same storage through detached tensors: they see every in-place update, and build
    // no autograd graph (with variable weights every decoding op would be recorded and kept alive by the KV cache).
    let sampler = LoadedModel {
        model: CausalLm::new(
            policy.model.config().clone(),
            Weights::new(
                policy
                    .model
                    .weights()
                    .tensors()
                    .iter()
                    .map(|(k, t)| (k.clone(), t.detach()))
                    .collect(),
                policy.model.weights().source(),
            ),
        )?,
        tokenizer: policy.tokenizer.clone(),
        side: policy.side.clone(),
        source: policy.source.clone(),
    };
    let mut optimizer = AdamW::new(vars.clone(), t.optim.adamw())?;
    let mut start_step = 0;
    let mut skipped_nonfinite = 0u64;
    if let Some((state, opt)) = &resume_state {
        optimizer.load_state(opt, state.optimizer_steps.unwrap_or(state.step))?;
        start_step = state.step;
        skipped_nonfinite = state.skipped_nonfinite;
    }
    let mut metrics = MetricsLog::open(
        &cfg.output.join("metrics.jsonl"),
        resume_state.as_ref().map(|s| s.0.step),
    )?;
    let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let warmup = warmup_steps(t.optim.warmup_ratio, total_steps);
    let loss_cfg = t.loss.config();
    let lp_opts = LogprobOptions {
        tokenize: tok_opts,
        layout: t.optim.layout,
        batch_queries: t.optim.batch_queries,
    };
    let scratch = Scratch(cfg.output.join(format!(".op-work-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).map_err(|e| DataError::io(&scratch.0, e))?;
    eprintln!(
        "rrhf iterate OP-{k}: {n} prompts, {total_steps} steps of {per_step} queries ({} rounds), β = {beta}",
        total_steps.div_ceil(k)
    );

    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    let mut last_checkpoint = cfg.resume.clone();
    let mut final_checkpoint: Option<PathBuf> = None;
    let mut summary = OpSummary {
        rounds: 0,
        steps: 0,
        last_reward: f64::NAN,
        last_kl: None,
    };
    let mut step = start_step;
    while step < total_steps {
        let round = step / k + 1;
        let at = format!("round {round}");
        let round_end = (step + k).min(total_steps);
        // The (step, prompt) slots of the round, in the trainer's order.
        let mut slots: Vec<(u64, usize)> = Vec::new();
        for s in step..round_end {
            let epoch = s / steps_per_epoch;
            if epoch != order_epoch {
                order = (0..n).collect();
                Rng::new(epoch_seed(cfg.seed, epoch)).shuffle(&mut order);
                order_epoch = epoch;
            }
            let offset = ((s % steps_per_epoch) as usize) * per_step;
            slots.extend(
                order[offset..(offset + per_step).min(n)]
                    .iter()
                    .map(|&i| (s, i)),
            );
        }

        // Sample with the current weights.
        let t0 = Instant::now();
        let prompts_path = scratch.0.join("prompts.jsonl");
        let samples_path = scratch.0.join("samples.jsonl");
        write_round_prompts(&prompts_path, &prompts, &slots)?;
        // The name `rrhf sample` prints for the (preloaded) model.
        let label = PathBuf::from(format!("the policy after {step} steps"));
        let mut sc = cfg.sample_config(
            &label,
            prompts_path,
            samples_path.clone(),
            cfg.seed.wrapping_add(round),
            false,
        );
        sc.read = ReadArgs::default();
        sample_with_model(&sc, &sampler).map_err(stage_err(at.clone(), "sample"))?;
        let records = read_records(
            &samples_path,
            &ReadOptions {
                format: InputFormat::Rrhf,
                require_scores: false,
                ..ReadOptions::default()
            },
        )?
        .records;
        if records.len() != slots.len() {
            return Err(IterateError::Config(format!(
                "{at}: sampling gave {} records for {} prompts",
                records.len(),
                slots.len()
            )));
        }
        let sample_s = t0.elapsed().as_secs_f64();

        // Score: R, and R̃ = R − β·(log π − log ρ) as `rrhf score --kl-coef` computes it.
        let t1 = Instant::now();
        let refs: Vec<&Record> = records.iter().collect();
        let rewards = reward.score(&refs).map_err(|source| IterateError::Reward {
            spec: cfg.reward.to_string(),
            cause: Box::new(source),
        })?;
        let kl: Option<Vec<Vec<f64>>> = match &reference {
            Some(rho) => {
                let lp = sequence_logprobs(&sampler, &refs, &lp_opts, &device)?;
                let lr = sequence_logprobs(rho, &refs, &lp_opts, &device)?;
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
        let mut rs = RoundStats::default();
        let mut lines = Vec::with_capacity(records.len());
        let mut train_records: Vec<(u64, usize, TokenizedRecord)> = Vec::new();
        for (j, (r, res)) in records.iter().zip(&rewards).enumerate() {
            let kl_j = kl.as_ref().map(|v| v[j].clone());
            let (raw, penalized) = match res {
                Ok(raw) => {
                    let pen: Vec<f64> = match &kl_j {
                        Some(d) => raw.iter().zip(d).map(|(x, d)| x - beta * d).collect(),
                        None => raw.clone(),
                    };
                    rs.reward_sum += raw.iter().sum::<f64>();
                    rs.penalized_sum += pen.iter().sum::<f64>();
                    rs.kl_sum += kl_j.as_ref().map_or(0.0, |d| d.iter().sum());
                    rs.responses += raw.len();
                    (Some(raw.clone()), Some(pen))
                }
                Err(_) => {
                    // A judge reply without scores: the record is left out of training, and counted.
                    rs.unscored += 1;
                    (None, None)
                }
            };
            lines.push(json!({
                "query": r.query,
                "responses": r.responses,
                "scores": penalized,
                "sources": r.sources,
                "finish_reasons": r.finish_reasons,
                "reward": raw,
                "kl": kl_j,
                "step": slots[j].0 + 1,
            }));
            if let Some(pen) = penalized {
                let rec = Record {
                    scores: Some(pen),
                    ..r.clone()
                };
                let tok = tokenize_record(&policy.tokenizer, &rec, &tok_opts)?;
                if tok.query.is_empty() {
                    return Err(IterateError::Config(format!(
                        "{at}: the query {:?} tokenises to zero tokens and this tokenizer adds no BOS, so the first \
                         response token has no position to be predicted from",
                        r.query
                    )));
                }
                train_records.push((slots[j].0, j, tok));
            }
        }
        let round_path = rounds_dir.join(format!("round-{round}.jsonl"));
        write_atomic_with(&round_path, |w| {
            for l in &lines {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })?;
        let score_s = t1.elapsed().as_secs_f64();

        // Train the round's steps on its samples.
        let t2 = Instant::now();
        for s in step..round_end {
            let done = s + 1;
            let picked: Vec<&TokenizedRecord> = train_records
                .iter()
                .filter(|(st, ..)| *st == s)
                .map(|(_, _, r)| r)
                .collect();
            let picked_j: Vec<usize> = train_records
                .iter()
                .filter(|(st, ..)| *st == s)
                .map(|(_, j, _)| *j)
                .collect();
            if picked.is_empty() {
                return Err(IterateError::Config(format!(
                    "{at}, step {done}: no query of the step could be scored; nothing to train on"
                )));
            }
            let lr = lr_at(t.optim.schedule, t.optim.lr, s, warmup, total_steps);
            let t_step = Instant::now();
            match optimizer_step(
                &policy.model,
                &picked,
                &tc,
                &loss_cfg,
                policy.tokenizer.pad_id,
                &device,
                (&var_list, &mut optimizer),
                lr,
                fault_nan_at(done),
                None,
            )? {
                // Only f16 mixed precision scales the loss; OP trains in f32 (checked at the start).
                StepOutcome::Overflow => {
                    return Err(IterateError::Config(
                        "a loss-scale overflow without loss scaling".into(),
                    ))
                }
                StepOutcome::Updated { stats, grad_norm } => {
                    let loss = stats.mean(stats.loss);
                    rs.loss_sum += loss;
                    rs.steps += 1;
                    let secs = t_step.elapsed().as_secs_f64();
                    metrics.write(&json!({
                        "step": done,
                        "round": round,
                        "loss": loss,
                        "rank_loss": stats.mean(stats.rank_loss),
                        "sft_loss": stats.mean(stats.sft_loss),
                        "rank_acc": stats.rank_acc(),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "skipped_nonfinite": skipped_nonfinite,
                        "tokens": stats.tokens,
                        "step_s": secs,
                    }))?;
                }
                StepOutcome::NonFinite {
                    what,
                    value,
                    blamed,
                } => {
                    let origins: Vec<String> = picked_j[blamed]
                        .iter()
                        .map(|&j| format!("{}:{}", round_path.display(), j + 1))
                        .collect();
                    if skipped_nonfinite >= t.optim.skip_nonfinite {
                        metrics.write(&json!({
                            "step": done,
                            "nonfinite": what,
                            "records": origins,
                            "stopped": true,
                        }))?;
                        return Err(nonfinite_error(
                            &tc,
                            done,
                            what,
                            value,
                            &origins,
                            last_checkpoint.as_deref(),
                            skipped_nonfinite,
                        )
                        .into());
                    }
                    skipped_nonfinite += 1;
                    metrics.write(&json!({
                        "step": done,
                        "round": round,
                        "skipped_nonfinite": skipped_nonfinite,
                        "nonfinite": what,
                        "records": origins,
                        "lr": lr,
                    }))?;
                    eprintln!(
                        "step {done}: {what} is {value}; step skipped, no update ({skipped_nonfinite} of at most {} \
                         skipped)",
                        t.optim.skip_nonfinite
                    );
                }
            }
        }
        let train_s = t2.elapsed().as_secs_f64();
        let responses = rs.responses.max(1) as f64;
        let reward_mean = rs.reward_sum / responses;
        let kl_mean = rs.kl_sum / responses;
        metrics.write(&json!({
            "step": round_end,
            "round": round,
            "reward_mean": reward_mean,
            "penalized_reward_mean": rs.penalized_sum / responses,
            "kl_mean": kl.as_ref().map(|_| kl_mean),
            "loss": if rs.steps > 0 { json!(rs.loss_sum / rs.steps as f64) } else { Value::Null },
            "responses": rs.responses,
            "unscored": rs.unscored,
            "sample_s": sample_s,
            "score_s": score_s,
            "train_s": train_s,
        }))?;
        // Without a reference (β = 0) there is no KL to show.
        let kl_text = kl
            .as_ref()
            .map_or(String::new(), |_| format!(", mean KL {kl_mean:.4}"));
        eprintln!(
            "round {round}: steps {}..{round_end}, mean reward {reward_mean:.4}{kl_text}, loss {:.4} \
             (sample {sample_s:.1} s, score {score_s:.1} s, train {train_s:.1} s)",
            step + 1,
            rs.loss_sum / rs.steps.max(1) as f64,
        );
        summary.rounds += 1;
        summary.steps += round_end - step;
        summary.last_reward = reward_mean;
        summary.last_kl = kl.as_ref().map(|_| kl_mean);

        let is_last = round_end == total_steps;
        if is_last || t.save_every.is_some_and(|e| round_end % e == 0) {
            check_finite_weights(policy.model.weights())?;
            let state = TrainerState {
                step: round_end,
                total_steps,
                epoch: round_end / steps_per_epoch,
                epoch_offset: (round_end % steps_per_epoch) * per_step as u64,
                seed: cfg.seed,
                n_records: n as u64,
                rrhf_version: env!("CARGO_PKG_VERSION").into(),
                skipped_nonfinite,
                loss_scaler: None,
                optimizer_steps: Some(optimizer.steps()),
                run: Some(run.clone()),
            };
            let dir = save_checkpoint(
                &cfg.output,
                &CheckpointParts {
                    weights: policy.model.weights(),
                    tokenizer: &policy.tokenizer,
                    side: &policy.side,
                    optimizer: optimizer.state_tensors()?,
                    state: &state,
                    args_json: &args_json,
                    save_dtype: None,
                },
                t.save_total_limit,
            )?;
            if is_last {
                final_checkpoint = Some(dir.clone());
            }
            last_checkpoint = Some(dir);
        }
        plot_rounds(&cfg.output)?;
        stop_hook(&format!("round-{round}"))?;
        step = round_end;
    }
    // The final model at the top of the output, linked from the last checkpoint (the same files).
    if let Some(ck) = final_checkpoint {
        link_pretrained(&ck, &cfg.output)?;
    }
    Ok(summary)
}

/// Draws `op.png` from `metrics.jsonl`: mean reward (and R̃) of the fresh samples, mean KL and loss per round,
/// placed at the round's last optimizer step.
pub fn plot_rounds(output: &Path) -> Result<(), IterateError> {
    let lines: Vec<Value> = read_metrics(&output.join("metrics.jsonl"))?
        .into_iter()
        .filter(|v| v.get("reward_mean").is_some())
        .collect();
    let series = |key: &str| -> Series {
        let pts = lines
            .iter()
            .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
            .collect();
        Series::new(key, pts)
    };
    let mut panels = vec![(
        "reward of the fresh samples",
        vec![series("reward_mean"), series("penalized_reward_mean")],
    )];
    if lines
        .iter()
        .any(|v| v.get("kl_mean").is_some_and(|k| !k.is_null()))
    {
        panels.push(("KL: log π − log ρ", vec![series("kl_mean")]));
    }
    panels.push(("loss", vec![series("loss")]));
    plot_curves(
        &output.join("op.png"),
        "rrhf iterate OP: per round (at its last step)",
        &panels,
    )?;
    Ok(())
}
