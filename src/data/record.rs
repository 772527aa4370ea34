//! The RRHF record every command reads and writes (design.md, "Shared contracts").

use serde::{Deserialize, Serialize};

/// One query with k ≥ 1 responses and, once scored, one reward per response.
///
/// JSONL shape: `{"query": str, "responses": [str], "scores": [float] | null, "sources": [str]?,
/// "finish_reasons": ["stop" | "length"]?}`; the original RRHF code's files (`query`, `responses`, `scores`) read
/// unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub query: String,
    pub responses: Vec<String>,
    /// One reward per response; `None` = unscored (`rrhf score` fills it).
    #[serde(default)]
    pub scores: Option<Vec<f64>>,
    /// Where each response came from (`policy:beam`, `dataset:chosen`, `endpoint:NAME`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Why each generated response ended (`rrhf sample` writes it). A `length` response was cut at the token budget:
    /// training appends no EOS to it, so the policy is not taught to stop where the budget happened to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reasons: Option<Vec<FinishReason>>,
}

/// Why a response ended, in the OpenAI API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// At EOS or a stop string: a complete answer.
    Stop,
    /// At the token budget (`--max-new-tokens`): unfinished.
    Length,
}

impl FinishReason {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }

    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" => Some(FinishReason::Stop),
            "length" => Some(FinishReason::Length),
            _ => None,
        }
    }
}

impl Record {
    /// Whether response `i` was cut at a token budget (its `finish_reasons` entry is `length`).
    pub fn unfinished(&self, i: usize) -> bool {
        self.finish_reasons
            .as_ref()
            .and_then(|f| f.get(i))
            .is_some_and(|&f| f == FinishReason::Length)
    }

    /// Index of the best response: the highest reward, the first one on ties (`argmax_i r_i`, Eq. 3).
    pub fn best(&self) -> Option<usize> {
        let s = self.scores.as_ref()?;
        let mut best: Option<usize> = None;
        for (i, &r) in s.iter().enumerate() {
            if best.is_none_or(|b| r > s[b]) {
                best = Some(i);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_is_first_maximum() {
        let r = Record {
            query: "q".into(),
            responses: vec!["a".into(), "b".into(), "c".into()],
            scores: Some(vec![0.5, 2.0, 2.0]),
            sources: None,
            finish_reasons: None,
        };
        assert_eq!(r.best(), Some(1));
    }
}
