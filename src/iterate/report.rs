//! The IP report: `report.md`, `report.json` and `report.png` in `--output`, one row per iteration (row 0: the
//! initial model), built from the files the stages wrote, so a resumed run writes the same report as one that ran
//! through.

use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::data::readers::{read_records, InputFormat, ReadOptions};
use crate::data::DataError;
use crate::eval::report::{ModelReport, Report};
use crate::fsutil::write_atomic;
use crate::model::ModelError;
use crate::score::stats::{reward_stats, RewardStats};
use crate::train::log::read_metrics;

use super::{IterateConfig, IterateError};

/// One iteration's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IterRow {
    /// 0 for the initial model.
    pub iteration: usize,
    /// The evaluated model: the initial `--model`, or `iter-i/model` (relative to `--output`).
    pub model: String,
    /// Table-6 statistics of the scored samples the iteration trained on (all responses); `None` for row 0.
    pub samples: Option<RewardStats>,
    /// Optimizer steps of the iteration's training, and the loss of its last step.
    pub train_steps: Option<u64>,
    pub train_loss: Option<f64>,
    /// The iteration's `rrhf eval` row (`iter-i/eval/report.json`).
    pub eval: ModelReport,
}

impl IterRow {
    /// Reads iteration `i`'s row from its folder; `scores` is its scored samples (none for row 0).
    pub fn read(
        dir: &Path,
        i: usize,
        model: &Path,
        scores: Option<&Path>,
    ) -> Result<Self, IterateError> {
        let path = dir.join("eval").join("report.json");
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let bad = |what: String| ModelError::Json {
            path: path.clone(),
            msg: what,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let first = v
            .get("models")
            .and_then(|m| m.get(0))
            .cloned()
            .ok_or_else(|| bad("no `models[0]`".into()))?;
        let mut eval: ModelReport =
            serde_json::from_value(first).map_err(|e| bad(e.to_string()))?;
        let samples = match scores {
            Some(p) => {
                let read = read_records(
                    p,
                    &ReadOptions {
                        format: InputFormat::Rrhf,
                        require_scores: true,
                        ..ReadOptions::default()
                    },
                )?;
                reward_stats(&read.records).into_iter().next()
            }
            None => None,
        };
        let (mut train_steps, mut train_loss) = (None, None);
        let metrics = dir.join("model").join("metrics.jsonl");
        if i > 0 {
            for line in read_metrics(&metrics)? {
                if let (Some(s), Some(l)) = (
                    line.get("step").and_then(Value::as_u64),
                    line.get("loss").and_then(Value::as_f64),
                ) {
                    train_steps = Some(s);
                    train_loss = Some(l);
                }
            }
        }
        // Named relative to --output, so the report does not depend on where the run was written.
        let name = if i == 0 {
            model.display().to_string()
        } else {
            format!("iter-{i}/model")
        };
        eval.model = name.clone();
        Ok(IterRow {
            iteration: i,
            model: name,
            samples,
            train_steps,
            train_loss,
            eval,
        })
    }
}

fn cell(x: Option<f64>, d: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"))
}

/// `report.md` of an IP run.
pub fn ip_markdown(cfg: &IterateConfig, rows: &[IterRow]) -> String {
    let s = &cfg.sampling;
    let t = &cfg.train;
    let n = rows.len() - 1;
    let mut md = format!("# rrhf iterate: IP-{n}\n\n");
    md.push_str(&format!(
        "- initial model `{}`, prompts `{}`, reward `{}`, device {}, dtype {}\n",
        cfg.model.model.display(),
        cfg.prompts.display(),
        cfg.reward,
        cfg.model.device,
        cfg.model.dtype
    ));
    let strategy = s
        .decoding
        .strategy
        .map_or(String::new(), |k| format!(", strategy {k}"));
    let k = s
        .decoding
        .num_responses
        .map_or(String::new(), |k| format!(", {k} responses"));
    md.push_str(&format!(
        "- sampling (iteration i samples with the model of iteration i − 1): setting {}{strategy}{k}, at most {} new \
         tokens, seed {} + i\n",
        s.sample_setting, s.gen.max_new_tokens, cfg.seed
    ));
    let length = match t.max_steps {
        Some(m) => format!("{m} steps"),
        None => format!("{} epochs", t.epochs),
    };
    md.push_str(&format!(
        "- training per iteration: {length} of {} queries, lr {}, {} schedule, max length {}\n",
        t.optim.batch_queries * t.optim.grad_accum,
        t.optim.lr,
        t.optim.schedule,
        cfg.records.max_len
    ));
    md.push_str(&format!(
        "- evaluation: `rrhf eval` of each model (greedy on `{}`; `iter-i/eval/report.md`)\n",
        cfg.eval
            .eval_prompts
            .as_ref()
            .unwrap_or(&cfg.prompts)
            .display()
    ));
    md.push_str(
        "- Samples: Table-6 statistics of the scored samples the iteration trained on (max = mean over queries of \
         the best reward)\n\n",
    );
    let best = cfg
        .eval
        .best_of
        .map_or("Best-of-n".to_string(), |n| format!("Best-of-{n}"));
    md.push_str(&format!(
        "| Iter. | Model | Samples mean | Samples std | Samples max | Train steps | Final loss | PPL | Reward | ± s.e. | RM acc. | {best} | Gen. len. |\n"
    ));
    md.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let e = &r.eval;
        md.push_str(&format!(
            "| {} | `{}` | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {:.1} |\n",
            r.iteration,
            r.model.replace('|', "\\|"),
            cell(r.samples.as_ref().map(|s| s.mean), 4),
            cell(r.samples.as_ref().map(|s| s.std), 4),
            cell(r.samples.as_ref().map(|s| s.max), 4),
            r.train_steps.map_or("-".into(), |s| s.to_string()),
            cell(r.train_loss, 4),
            cell(e.ppl, 2),
            e.reward_mean,
            cell(e.reward_se, 4),
            cell(e.rm_accuracy, 4),
            cell(e.best_of_n, 4),
            e.gen_len_mean
        ));
    }
    md
}

/// Writes `report.md`, `report.json` and `report.png` (reward, PPL, RM accuracy per iteration) into `--output`;
/// returns the markdown.
pub fn write_ip_report(cfg: &IterateConfig, rows: &[IterRow]) -> Result<String, IterateError> {
    let md = ip_markdown(cfg, rows);
    let out = &cfg.output;
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    let json = json!({
        "setting": "IP",
        "iterations": rows.len() - 1,
        "reward": cfg.reward.to_string(),
        "rows": rows,
    });
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| IterateError::Config(e.to_string()))?;
    write_atomic(&out.join("report.json"), format!("{text}\n").as_bytes())?;
    // The bar panels of `rrhf eval`'s plot, one bar per iteration.
    let plot = Report {
        settings: Value::Null,
        header: Vec::new(),
        best_of: cfg.eval.best_of,
        models: rows
            .iter()
            .map(|r| ModelReport {
                model: format!("iter-{}", r.iteration),
                ..r.eval.clone()
            })
            .collect(),
        train_data: None,
    };
    plot.plot(&out.join("report.png"), &cfg.reward.to_string())?;
    Ok(md)
}
