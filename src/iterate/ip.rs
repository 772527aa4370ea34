//! IP-n (Table 1: "Iterate"): iteration i samples with the model iteration i − 1 trained (ρ*; the initial model for
//! i = 1), scores the samples, trains that model on them and evaluates the result. IP-1 is the paper's DP.
//!
//! Layout of `--output`: `args.json`; `iter-0/eval/` (the initial model's evaluation, the report's row 0);
//! `iter-i/samples.jsonl`, `scores.jsonl`, `model/` (an `rrhf train` output: model, metrics.jsonl, loss.png,
//! checkpoints), `eval/` (an `rrhf eval` output); `report.md`, `report.json`, `report.png`.
//!
//! Resuming: `iter-i/state.json` lists the stages of iteration i that finished, and is rewritten (atomically) only
//! after a stage's outputs are complete, so a stage listed there is never run again and a stage that was
//! interrupted is continued: `rrhf sample` and `rrhf score` with `--resume` on their partial output, `rrhf train`
//! from its newest checkpoint (or afresh), `rrhf eval` afresh (it writes everything at its end).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::DataError;
use crate::dist;
use crate::eval::command::eval;
use crate::fsutil::write_atomic;
use crate::sample::command::sample;
use crate::sample::prompts::read_prompts;
use crate::score::command::{score, RewardFn};
use crate::train::output::{latest_checkpoint, previous_run};
use crate::train::trainer::{data_fingerprint, train};

use super::report::{write_ip_report, IterRow};
use super::{check_common, stage_err, stop_hook, IterateConfig, IterateError};

/// One finished stage of an iteration and its wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageDone {
    /// `sample`, `score`, `train` or `eval`.
    pub stage: String,
    /// Wall time of the run that finished it.
    pub seconds: f64,
}

/// `iter-i/state.json`: the finished stages of iteration i, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterState {
    pub iteration: usize,
    /// The model this iteration samples with and trains (the evaluated model for iteration 0).
    pub model: PathBuf,
    pub done: Vec<StageDone>,
}

impl IterState {
    fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    /// The state in `dir`, or a new one when the iteration has not started.
    fn load_or_new(dir: &Path, iteration: usize, model: &Path) -> Result<Self, IterateError> {
        let path = Self::path(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                IterateError::Config(format!(
                    "{}: not a state file of rrhf iterate ({e}); remove the iteration folder to redo it",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IterState {
                iteration,
                model: model.to_path_buf(),
                done: Vec::new(),
            }),
            Err(e) => Err(DataError::io(&path, e).into()),
        }
    }

    fn is_done(&self, stage: &str) -> bool {
        self.done.iter().any(|d| d.stage == stage)
    }

    fn save(&self, dir: &Path) -> Result<(), IterateError> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| IterateError::Config(e.to_string()))?;
        write_atomic(&Self::path(dir), format!("{text}\n").as_bytes())?;
        Ok(())
    }
}

/// What an IP run did.
#[derive(Debug, Clone)]
pub struct IpSummary {
    /// Stages run now, and stages a previous run had finished.
    pub stages_run: usize,
    pub stages_skipped: usize,
    /// `report.md`.
    pub markdown: String,
    /// Per iteration (0 first), its finished stages and their wall times (of the run that finished each).
    pub timings: Vec<(usize, Vec<StageDone>)>,
}

/// Folder of iteration `i`.
pub fn iter_dir(output: &Path, i: usize) -> PathBuf {
    output.join(format!("iter-{i}"))
}

/// Refuses to continue a run in `output` that was started with other flags (`--iterations` may grow: a finished
/// IP-2 continues into IP-3); writes `args.json` on a first run.
fn check_args(cfg: &IterateConfig) -> Result<(), IterateError> {
    let path = cfg.output.join("args.json");
    let mut now = serde_json::to_value(cfg).map_err(|e| IterateError::Config(e.to_string()))?;
    now["command"] = json!("iterate");
    // The same path with other prompts in it is another run.
    now["prompts_content"] = json!(data_fingerprint(&cfg.prompts)?);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let then: Value = serde_json::from_str(&text).map_err(|e| {
                IterateError::Config(format!("{}: invalid JSON ({e})", path.display()))
            })?;
            let (Some(a), Some(b)) = (then.as_object(), now.as_object()) else {
                return Err(IterateError::Config(format!(
                    "{}: not the arguments of an rrhf iterate run",
                    path.display()
                )));
            };
            for (k, old) in a {
                let new = b.get(k).unwrap_or(&Value::Null);
                if k == "prompts_content" && old != new {
                    return Err(IterateError::Config(format!(
                        "{} holds an IP run on other prompts: {} held {old} and holds {new} now; choose another \
                         --output for new prompts",
                        cfg.output.display(),
                        cfg.prompts.display()
                    )));
                }
                if k != "iterations" && old != new {
                    return Err(IterateError::Config(format!(
                        "{} holds an IP run started with --{} {old}; this run has {new}: repeat that run's flags \
                         to continue it (only --iterations may change), or choose another --output",
                        cfg.output.display(),
                        k.replace('_', "-"),
                    )));
                }
            }
            write_atomic(
                &path,
                serde_json::to_string_pretty(&now)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(
                &path,
                serde_json::to_string_pretty(&now)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
        }
        Err(e) => return Err(DataError::io(&path, e).into()),
    }
    Ok(())
}

/// Runs the stages that are not done yet, and counts.
#[derive(Default)]
struct Runner {
    run: usize,
    skipped: usize,
}

impl Runner {
    /// Runs `stage` unless `state` lists it; then records it (after `f` returned, so its outputs are complete).
    fn stage(
        &mut self,
        dir: &Path,
        state: &mut IterState,
        stage: &'static str,
        f: impl FnOnce() -> Result<(), IterateError>,
    ) -> Result<(), IterateError> {
        let label = format!("iter-{}/{stage}", state.iteration);
        if state.is_done(stage) {
            if dist::world().is_root() {
                eprintln!("rrhf iterate: {label} finished in an earlier run; not redone");
            }
            self.skipped += 1;
            return Ok(());
        }
        let comm = dist::world();
        if comm.is_root() {
            eprintln!("rrhf iterate: {label}");
        }
        let t0 = Instant::now();
        f()?;
        state.done.push(StageDone {
            stage: stage.into(),
            seconds: t0.elapsed().as_secs_f64(),
        });
        if comm.is_root() {
            state.save(dir)?;
        }
        // Under mpirun the next stage reads what rank 0 wrote (the merged samples and scores, the trained model):
        // no rank goes on before it is there.
        comm.barrier("the end of an rrhf iterate stage");
        self.run += 1;
        stop_hook(&label)
    }
}

/// Sample stage of iteration `i`: `model`'s responses to `--prompts`.
fn sample_stage(
    cfg: &IterateConfig,
    i: usize,
    dir: &Path,
    model: &Path,
) -> Result<(), IterateError> {
    let out = dir.join("samples.jsonl");
    // A sample stage that was interrupted left a partial file: continue it rather than start over.
    let sc = cfg.sample_config(
        model,
        cfg.prompts.clone(),
        out.clone(),
        cfg.seed.wrapping_add(i as u64),
        out.exists(),
    );
    sample(&sc).map_err(stage_err(format!("iteration {i}"), "sample"))?;
    Ok(())
}

/// Score stage of iteration `i`: `--reward` of every sample.
fn score_stage(cfg: &IterateConfig, i: usize, dir: &Path) -> Result<(), IterateError> {
    let out = dir.join("scores.jsonl");
    let resume = out.exists();
    let sc = cfg.score_config(dir.join("samples.jsonl"), out, resume);
    let s = score(&sc).map_err(stage_err(format!("iteration {i}"), "score"))?;
    if s.unscored > 0 {
        // rrhf train refuses unscored records: say so here, where a rerun retries them.
        return Err(IterateError::Config(format!(
            "iteration {i}, score: {} records could not be scored (e.g. {}); rerun to retry them",
            s.unscored,
            s.unscored_examples.first().cloned().unwrap_or_default()
        )));
    }
    Ok(())
}

/// Train stage of iteration `i`: `model` trained on the scored samples into `iter-i/model`.
fn train_stage(
    cfg: &IterateConfig,
    i: usize,
    dir: &Path,
    model: &Path,
) -> Result<(), IterateError> {
    let out = dir.join("model");
    let mut tc = cfg.train_config(model, dir.join("scores.jsonl"), out.clone());
    // An interrupted training continues from its newest checkpoint; one that wrote none starts over.
    match latest_checkpoint(&out) {
        Some(ck) => tc.resume = Some(ck),
        None => tc.overwrite = !previous_run(&out)?.is_empty(),
    }
    let mut args = serde_json::to_value(&tc).map_err(|e| IterateError::Config(e.to_string()))?;
    args["command"] = json!("train");
    train(&tc, &args).map_err(stage_err(format!("iteration {i}"), "train"))?;
    Ok(())
}

/// Eval stage of iteration `i` on `model` into `iter-i/eval` (rank 0 alone under mpirun: `rrhf eval` is not
/// parallel; the others wait at the stage's end).
fn eval_stage(cfg: &IterateConfig, i: usize, dir: &Path, model: &Path) -> Result<(), IterateError> {
    if !dist::world().is_root() {
        return Ok(());
    }
    let ec = cfg.eval_config(model, dir.join("eval"));
    dist::alone(|| eval(&ec)).map_err(stage_err(format!("iteration {i}"), "eval"))?;
    Ok(())
}

/// Runs `rrhf iterate --setting IP`.
pub fn run_ip(cfg: &IterateConfig) -> Result<IpSummary, IterateError> {
    check_common(cfg)?;
    let iterations = cfg.iterations.unwrap_or(2);
    if iterations == 0 {
        return Err(IterateError::Config(
            "--iterations must be at least 1".into(),
        ));
    }
    if cfg.resample_every.is_some() || cfg.kl_coef.is_some() || cfg.resume.is_some() {
        return Err(IterateError::Config(
            "--resample-every, --kl-coef and --resume belong to --setting OP (an IP run continues by rerunning it)"
                .into(),
        ));
    }
    // Every input is checked, and the reward loaded once, before any model work.
    read_prompts(
        &cfg.prompts,
        cfg.records.read.format,
        cfg.records.read.prompt_template,
        cfg.records.read.skip_invalid,
    )?;
    if let Some(p) = &cfg.eval.eval_prompts {
        read_prompts(
            p,
            cfg.records.read.format,
            cfg.records.read.prompt_template,
            cfg.records.read.skip_invalid,
        )?;
    }
    RewardFn::load(&cfg.score_config(cfg.prompts.clone(), cfg.output.join("unused"), false))
        .map_err(|source| IterateError::Reward {
            spec: cfg.reward.to_string(),
            cause: Box::new(source),
        })?;
    std::fs::create_dir_all(&cfg.output).map_err(|e| DataError::io(&cfg.output, e))?;
    // Under mpirun: rank 0 checks and writes args.json (a refusal there ends the job on every rank).
    let comm = dist::world();
    if comm.is_root() {
        check_args(cfg)?;
    }
    comm.barrier("the start of rrhf iterate");

    let mut runner = Runner::default();
    let initial = cfg.model.model.clone();
    let dir0 = iter_dir(&cfg.output, 0);
    std::fs::create_dir_all(&dir0).map_err(|e| DataError::io(&dir0, e))?;
    let mut state0 = IterState::load_or_new(&dir0, 0, &initial)?;
    runner.stage(&dir0, &mut state0, "eval", || {
        eval_stage(cfg, 0, &dir0, &initial)
    })?;
    let mut timings = vec![(0, state0.done.clone())];

    // Rows and the report come from rank 0's evaluations.
    let root = comm.is_root();
    let mut rows = Vec::new();
    if root {
        rows.push(IterRow::read(&dir0, 0, &initial, None)?);
    }
    let mut model = initial;
    for i in 1..=iterations {
        let dir = iter_dir(&cfg.output, i);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        let mut state = IterState::load_or_new(&dir, i, &model)?;
        runner.stage(&dir, &mut state, "sample", || {
            sample_stage(cfg, i, &dir, &model)
        })?;
        runner.stage(&dir, &mut state, "score", || score_stage(cfg, i, &dir))?;
        runner.stage(&dir, &mut state, "train", || {
            train_stage(cfg, i, &dir, &model)
        })?;
        let trained = dir.join("model");
        runner.stage(&dir, &mut state, "eval", || {
            eval_stage(cfg, i, &dir, &trained)
        })?;
        if root {
            rows.push(IterRow::read(
                &dir,
                i,
                &trained,
                Some(&dir.join("scores.jsonl")),
            )?);
        }
        timings.push((i, state.done.clone()));
        model = trained;
    }
    let markdown = match root {
        true => write_ip_report(cfg, &rows)?,
        false => String::new(),
    };
    Ok(IpSummary {
        stages_run: runner.run,
        stages_skipped: runner.skipped,
        markdown,
        timings,
    })
}
