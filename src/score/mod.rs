//! `rrhf score`: a reward for every response (design.md, "Commands"; paper §3, §5, Appendix E).
//!
//! Reward kinds (`--reward`): `model:DIR` (sequence-classification reward models, the Dahoas/gptj-rm-static layout,
//! BERT/DistilBERT classifiers), `judge:URL` (an LLM judge with the Appendix E prompt), `vader` (VADER sentiment),
//! `policy:DIR` (p_i of a causal LM) and `labels` (the scores already in the data); optionally the KL-penalised
//! reward R̃ = R − β·(log π(y|x) − log ρ(y|x)).
//!
//! May import: `model`, `data`, `client` and the base modules; never another stage.

pub mod args;
pub mod bench;
pub mod command;
pub mod judge;
pub mod logprob;
pub mod reward_model;
pub mod stats;
pub mod vader;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use command::{score, ScoreConfig, ScoreSummary};

/// What `--reward` names.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    /// `model:DIR` — a reward model directory or weight file.
    Model(PathBuf),
    /// `judge:URL` — an OpenAI-compatible endpoint.
    Judge(String),
    /// `vader` — VADER compound sentiment.
    Vader,
    /// `policy:DIR` — p_i of a causal LM.
    Policy(PathBuf),
    /// `labels` — keep the scores in the data.
    Labels,
}

impl FromStr for RewardSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let nonempty = |rest: &str, what: &str| -> Result<String, String> {
            if rest.trim().is_empty() {
                Err(format!("--reward {s}: give the {what} after the colon"))
            } else {
                Ok(rest.trim().to_string())
            }
        };
        if let Some(rest) = s.strip_prefix("model:") {
            Ok(Self::Model(
                nonempty(rest, "reward model directory or file")?.into(),
            ))
        } else if let Some(rest) = s.strip_prefix("judge:") {
            Ok(Self::Judge(nonempty(rest, "endpoint URL")?))
        } else if let Some(rest) = s.strip_prefix("policy:") {
            Ok(Self::Policy(nonempty(rest, "policy model")?.into()))
        } else if s == "vader" {
            Ok(Self::Vader)
        } else if s == "labels" {
            Ok(Self::Labels)
        } else {
            Err(format!(
                "unknown reward {s:?}: use model:DIR, judge:URL, vader, policy:DIR or labels"
            ))
        }
    }
}

impl fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model(p) => write!(f, "model:{}", p.display()),
            Self::Judge(u) => write!(f, "judge:{u}"),
            Self::Vader => f.write_str("vader"),
            Self::Policy(p) => write!(f, "policy:{}", p.display()),
            Self::Labels => f.write_str("labels"),
        }
    }
}

/// Which text a text-based reward sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreOn {
    /// The response alone.
    Response,
    /// Query + response.
    Full,
}

impl FromStr for ScoreOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "response" => Ok(Self::Response),
            "full" => Ok(Self::Full),
            _ => Err(format!("unknown --score-on {s:?}: use response or full")),
        }
    }
}

impl fmt::Display for ScoreOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Response => "response",
            Self::Full => "full",
        })
    }
}

serialize_as_display!(RewardSpec, ScoreOn);

/// An error of `rrhf score`.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("{0}")]
    Config(String),
    /// A reward came out NaN or infinite; nothing of it is written.
    #[error("{0}")]
    NonFinite(String),
}

impl From<candle_core::Error> for ScoreError {
    fn from(e: candle_core::Error) -> Self {
        ScoreError::Model(crate::model::ModelError::Candle(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_specs_round_trip() {
        for s in [
            "model:rm/dir",
            "judge:http://127.0.0.1:8000",
            "vader",
            "policy:out",
            "labels",
        ] {
            assert_eq!(s.parse::<RewardSpec>().unwrap().to_string(), s);
        }
        assert!("model:"
            .parse::<RewardSpec>()
            .unwrap_err()
            .contains("after the colon"));
        assert!("bleu"
            .parse::<RewardSpec>()
            .unwrap_err()
            .contains("model:DIR"));
        assert_eq!("full".parse::<ScoreOn>(), Ok(ScoreOn::Full));
    }
}
