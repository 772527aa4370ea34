//! The outputs of `rrhf eval`: `report.json`, `report.md` (one row per model in the layout of the paper's Tables 2
//! and 6), `generations.jsonl` and `eval.png`, each written atomically (temporary file + rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::write_atomic;
use crate::fsutil::FsError;
use crate::plot::PlotError;
use crate::plot::{plot_bars, BarSeries};
use crate::score::stats::RewardStats;

/// An error while writing the report's files.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file (or its directory) could not be written.
    #[error(transparent)]
    Io(#[from] FsError),
    /// A value could not be serialised.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    /// The chart could not be drawn or written.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// The metrics of one evaluated model (one row of the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// The model path as given to `--model`.
    pub model: String,
    /// Mean reward of the greedy generations that could be scored.
    pub reward_mean: f64,
    /// Population standard deviation of those rewards (as `rrhf score`'s statistics).
    pub reward_std: f64,
    /// Standard error of the mean (sample standard deviation / √n); `None` below 2 generations.
    pub reward_se: Option<f64>,
    /// Generations with a reward.
    pub n: usize,
    /// Generations the reward could not score (a judge reply without scores), left out of the mean.
    pub unscored: usize,
    /// Mean over generations of exp(mean NLL of the response tokens) under `--ppl-model`.
    pub ppl: Option<f64>,
    /// Generations without a scored token (empty responses), left out of `ppl`.
    pub ppl_excluded: usize,
    /// Generations cut to the evaluator's positions.
    pub ppl_truncated: usize,
    /// Fraction of `--pairs` where the model's p_i puts chosen above rejected.
    pub rm_accuracy: Option<f64>,
    /// Pairs behind `rm_accuracy`.
    pub rm_pairs: Option<usize>,
    /// Mean over prompts of the best reward among `--best-of` samples.
    pub best_of_n: Option<f64>,
    /// Mean response length in the model's own tokens (after the stop-string cut, no EOS).
    pub gen_len_mean: f64,
    /// Greedy generations that are empty (after the stop-string cut).
    pub empty: usize,
}

/// One line of `generations.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationLine {
    /// The model path as given to `--model`.
    pub model: String,
    /// The prompt.
    pub query: String,
    /// The greedy generation, cut at the first stop string.
    pub response: String,
    /// `None` when the reward could not score it.
    pub reward: Option<f64>,
    /// Mean NLL per response token under `--ppl-model` (`exp(nll)` is its perplexity); `None` without one, or
    /// for a response without scored tokens.
    pub nll: Option<f64>,
    /// Response tokens scored by `--ppl-model`; `None` without one.
    pub n_tokens: Option<usize>,
}

/// Table-6 statistics of `--train-data`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainDataReport {
    /// The `--train-data` path.
    pub file: String,
    /// `all`, then one row per source.
    pub stats: Vec<RewardStats>,
}

/// Everything `rrhf eval` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The flags of the run and what they resolved to (stop strings, prompt count).
    pub settings: Value,
    /// Lines of the header of `report.md`, one per setting.
    #[serde(skip)]
    pub header: Vec<String>,
    /// `N` of `--best-of`, for the column name.
    #[serde(skip)]
    pub best_of: Option<usize>,
    /// One entry per `--model`, in order.
    pub models: Vec<ModelReport>,
    /// Statistics of `--train-data`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_data: Option<TrainDataReport>,
}

/// `x` with `d` decimals, or `-`.
fn cell(x: Option<f64>, d: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"))
}

/// `|`-separated table row, with `|` in the cells escaped.
fn row(cells: &[String]) -> String {
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", cells.join(" | "))
}

impl Report {
    /// `report.md`: a title, the settings, and one table with a row per model (the paper's columns: PPL,
    /// reward; then the reward's spread, RM accuracy, best-of-n and length); Table-6 statistics of the training
    /// data below when given.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# rrhf eval\n\n");
        for line in &self.header {
            s.push_str(&format!("- {line}\n"));
        }
        s.push('\n');
        let best = self
            .best_of
            .map_or("Best-of-n".to_string(), |n| format!("Best-of-{n}"));
        s.push_str(&row(&[
            "Model".into(),
            "PPL".into(),
            "Reward".into(),
            "± s.e.".into(),
            "Std.".into(),
            "n".into(),
            "RM acc.".into(),
            best,
            "Gen. len.".into(),
        ]));
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for m in &self.models {
            s.push_str(&row(&[
                format!("`{}`", m.model),
                cell(m.ppl, 2),
                cell(Some(m.reward_mean), 4),
                cell(m.reward_se, 4),
                cell(Some(m.reward_std), 4),
                m.n.to_string(),
                cell(m.rm_accuracy, 4),
                cell(m.best_of_n, 4),
                cell(Some(m.gen_len_mean), 1),
            ]));
        }
        // What the averages leave out or cut, per model.
        let mut notes = Vec::new();
        for m in &self.models {
            let mut what = Vec::new();
            let n = |k: usize| format!("{k} generation{}", if k == 1 { "" } else { "s" });
            if m.unscored > 0 {
                what.push(format!("{} the reward could not score", n(m.unscored)));
            }
            if m.empty > 0 {
                what.push(format!("{} empty", n(m.empty)));
            }
            if m.ppl_excluded > 0 {
                what.push(format!(
                    "{} without a token to score, left out of PPL",
                    n(m.ppl_excluded)
                ));
            }
            if m.ppl_truncated > 0 {
                what.push(format!(
                    "{} cut to the evaluator's positions for PPL",
                    n(m.ppl_truncated)
                ));
            }
            if !what.is_empty() {
                notes.push(format!("- `{}`: {}\n", m.model, what.join("; ")));
            }
        }
        if !notes.is_empty() {
            s.push('\n');
            s.extend(notes);
        }
        if let Some(t) = &self.train_data {
            s.push_str(&format!(
                "\nTraining data `{}` (Table 6: max = mean over queries of the best reward):\n\n",
                t.file
            ));
            s.push_str(&row(&[
                "Source".into(),
                "Responses".into(),
                "Queries".into(),
                "Mean".into(),
                "Std.".into(),
                "Max".into(),
                "Min".into(),
            ]));
            s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
            for r in &t.stats {
                s.push_str(&row(&[
                    r.group.clone(),
                    r.responses.to_string(),
                    r.queries.to_string(),
                    format!("{:.4}", r.mean),
                    format!("{:.4}", r.std),
                    format!("{:.4}", r.max),
                    format!("{:.4}", r.min),
                ]));
            }
        }
        s
    }

    /// Short names of the models for the plot's axis: the last path component, numbered when two coincide.
    fn labels(&self) -> Vec<String> {
        let short: Vec<String> = self
            .models
            .iter()
            .map(|m| {
                Path::new(&m.model)
                    .file_name()
                    .map_or_else(|| m.model.clone(), |n| n.to_string_lossy().into_owned())
            })
            .collect();
        short
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if short.iter().filter(|t| *t == s).count() > 1 {
                    format!("{}: {s}", i + 1)
                } else {
                    s.clone()
                }
            })
            .collect()
    }

    /// `eval.png`: average reward (± standard error; best-of-n beside it) per model, then perplexity and RM
    /// accuracy when measured.
    pub fn plot(&self, path: &Path, reward: &str) -> Result<(), PlotError> {
        let per_model = |f: &dyn Fn(&ModelReport) -> Option<f64>| -> Vec<Option<f64>> {
            self.models.iter().map(f).collect()
        };
        let mut greedy = BarSeries::new("greedy", per_model(&|m| Some(m.reward_mean)));
        greedy.errors = per_model(&|m| m.reward_se);
        let mut rewards = vec![greedy];
        if let Some(n) = self.best_of {
            rewards.push(BarSeries::new(
                format!("best-of-{n}"),
                per_model(&|m| m.best_of_n),
            ));
        }
        let mut panels = vec![("reward", rewards)];
        if self.models.iter().any(|m| m.ppl.is_some()) {
            panels.push((
                "perplexity",
                vec![BarSeries::new("PPL", per_model(&|m| m.ppl))],
            ));
        }
        if self.models.iter().any(|m| m.rm_accuracy.is_some()) {
            panels.push((
                "RM accuracy",
                vec![BarSeries::new(
                    "p_i accuracy",
                    per_model(&|m| m.rm_accuracy),
                )],
            ));
        }
        plot_bars(
            path,
            &format!("rrhf eval: reward {reward}"),
            &self.labels(),
            &panels,
        )
    }

    /// Writes `report.json`, `report.md`, `generations.jsonl` and `eval.png` into `dir`, each atomically.
    pub fn write(
        &self,
        dir: &Path,
        generations: &[GenerationLine],
        reward: &str,
    ) -> Result<(), ReportError> {
        let json_err = |path: &Path, e: serde_json::Error| ReportError::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let mut lines = Vec::new();
        let gen_path = dir.join("generations.jsonl");
        for g in generations {
            lines.extend(serde_json::to_vec(g).map_err(|e| json_err(&gen_path, e))?);
            lines.push(b'\n');
        }
        write_atomic(&gen_path, &lines)?;
        let json_path = dir.join("report.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| json_err(&json_path, e))?;
        write_atomic(&json_path, format!("{text}\n").as_bytes())?;
        write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        Ok(self.plot(&dir.join("eval.png"), reward)?)
    }
}

/// Mean, population standard deviation and standard error of `xs` (`None` below 2 values); 0s for no values.
pub fn mean_std_se(xs: &[f64]) -> (f64, f64, Option<f64>) {
    if xs.is_empty() {
        return (0.0, 0.0, None);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    // Population std / √(n − 1) = sample std / √n.
    let se = (xs.len() > 1).then(|| (var / (n - 1.0)).sqrt());
    (mean, var.sqrt(), se)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelReport {
        ModelReport {
            model: name.into(),
            reward_mean: 0.5,
            reward_std: 0.25,
            reward_se: Some(0.125),
            n: 5,
            unscored: 0,
            ppl: None,
            ppl_excluded: 0,
            ppl_truncated: 0,
            rm_accuracy: Some(0.75),
            rm_pairs: Some(4),
            best_of_n: None,
            gen_len_mean: 12.0,
            empty: 0,
        }
    }

    #[test]
    fn markdown_has_one_row_per_model_and_dashes_for_missing_metrics() {
        let r = Report {
            settings: Value::Null,
            header: vec!["reward: `vader`".into()],
            best_of: Some(4),
            models: vec![model("runs/a"), model("runs/b|c")],
            train_data: None,
        };
        let md = r.markdown();
        assert!(md.contains("- reward: `vader`"), "{md}");
        assert!(md.contains("| Best-of-4 |"), "{md}");
        assert!(
            md.contains("| `runs/a` | - | 0.5000 | 0.1250 | 0.2500 | 5 | 0.7500 | - | 12.0 |"),
            "{md}"
        );
        assert!(md.contains("`runs/b\\|c`"), "{md}");
        assert_eq!(md.matches("\n| `").count(), 2);
        assert!(!md.contains("left out"), "{md}");
        let mut m = model("runs/c");
        (m.empty, m.ppl_excluded, m.ppl_truncated) = (1, 1, 2);
        let md = Report {
            models: vec![m],
            ..r
        }
        .markdown();
        assert!(
            md.contains(
                "- `runs/c`: 1 generation empty; 1 generation without a token to score, left out of PPL; \
                 2 generations cut to"
            ),
            "{md}"
        );
    }

    #[test]
    fn mean_std_and_standard_error() {
        let (m, s, se) = mean_std_se(&[1.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert!((se.unwrap() - 1.0).abs() < 1e-12); // sample std √2, / √2
        assert_eq!(mean_std_se(&[4.0]), (4.0, 0.0, None));
    }

    #[test]
    fn plot_labels_are_short_and_unique() {
        let r = Report {
            settings: Value::Null,
            header: Vec::new(),
            best_of: None,
            models: vec![model("x/run"), model("y/run"), model("z/base")],
            train_data: None,
        };
        assert_eq!(r.labels(), ["1: run", "2: run", "base"]);
    }
}
