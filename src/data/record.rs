//! The RRHF record every command reads and writes (design.md, "Shared contracts").

use serde::{Deserialize, Serialize};

/// One query with k ≥ 1 responses and, once scored, one reward per response.
///
/// JSONL shape: `{"query": str, "responses": [str], "scores": [float] | null, "sources": [str]?}`; the original
/// RRHF code's files (`query`, `responses`, `scores`) read unchanged.
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
}

impl Record {
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
        };
        assert_eq!(r.best(), Some(1));
    }
}
