//! Reward statistics like the paper's Table 6: mean, standard deviation and "max" (the mean over queries of the
//! best reward among a query's responses), over all responses and per source (`sources` field) when records carry
//! one.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::Record;

/// Statistics of one group of responses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardStats {
    /// `all`, or a source such as `policy:beam`.
    pub group: String,
    /// Responses in the group.
    pub responses: usize,
    /// Queries with at least one response in the group.
    pub queries: usize,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Mean over queries of the largest reward of the group's responses to that query.
    pub max: f64,
    pub min: f64,
}

#[derive(Default)]
struct Acc {
    values: Vec<f64>,
    query_max: Vec<f64>,
}

impl Acc {
    fn finish(self, group: String) -> RewardStats {
        let n = self.values.len().max(1) as f64;
        let mean = self.values.iter().sum::<f64>() / n;
        let var = self.values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        RewardStats {
            group,
            responses: self.values.len(),
            queries: self.query_max.len(),
            mean,
            std: var.sqrt(),
            max: self.query_max.iter().sum::<f64>() / self.query_max.len().max(1) as f64,
            min: self.values.iter().copied().fold(f64::INFINITY, f64::min),
        }
    }
}

/// Statistics over the scored records: `all` first, then each source in name order (when any record has sources).
pub fn reward_stats(records: &[Record]) -> Vec<RewardStats> {
    let mut all = Acc::default();
    let mut by_source: BTreeMap<String, Acc> = BTreeMap::new();
    for r in records {
        let Some(scores) = &r.scores else { continue };
        if scores.is_empty() {
            continue;
        }
        all.values.extend_from_slice(scores);
        all.query_max
            .push(scores.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        if let Some(sources) = &r.sources {
            let mut best: BTreeMap<&str, f64> = BTreeMap::new();
            for (s, &x) in sources.iter().zip(scores) {
                by_source.entry(s.clone()).or_default().values.push(x);
                let b = best.entry(s.as_str()).or_insert(f64::NEG_INFINITY);
                *b = b.max(x);
            }
            for (s, b) in best {
                if let Some(acc) = by_source.get_mut(s) {
                    acc.query_max.push(b);
                }
            }
        }
    }
    if all.values.is_empty() {
        return Vec::new();
    }
    let mut out = vec![all.finish("all".into())];
    out.extend(by_source.into_iter().map(|(s, a)| a.finish(s)));
    out
}

/// The statistics as an aligned text table.
pub fn format_stats(stats: &[RewardStats]) -> String {
    let w = stats
        .iter()
        .map(|s| s.group.chars().count())
        .max()
        .unwrap_or(5)
        .max(6);
    let mut s = format!(
        "{:<w$} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
        "source", "responses", "queries", "mean", "std", "max", "min"
    );
    for r in stats {
        s.push_str(&format!(
            "{:<w$} {:>9} {:>8} {:>10.4} {:>10.4} {:>10.4} {:>10.4}\n",
            r.group, r.responses, r.queries, r.mean, r.std, r.max, r.min
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(scores: &[f64], sources: Option<&[&str]>) -> Record {
        Record {
            query: "q".into(),
            responses: scores.iter().map(|_| "r".to_string()).collect(),
            scores: Some(scores.to_vec()),
            sources: sources.map(|s| s.iter().map(|x| x.to_string()).collect()),
            finish_reasons: None,
        }
    }

    #[test]
    fn mean_std_and_mean_of_query_maxima() {
        let recs = vec![
            rec(&[1.0, 3.0], Some(&["a", "b"])),
            rec(&[2.0, 6.0], Some(&["a", "a"])),
            Record {
                scores: None,
                ..rec(&[9.0], None)
            },
        ];
        let s = reward_stats(&recs);
        assert_eq!(s[0].group, "all");
        assert_eq!(s[0].responses, 4);
        assert!((s[0].mean - 3.0).abs() < 1e-12);
        assert!((s[0].std - (3.5f64).sqrt()).abs() < 1e-12);
        assert!((s[0].max - 4.5).abs() < 1e-12); // (3 + 6) / 2
        let a = s.iter().find(|x| x.group == "a").unwrap();
        assert_eq!((a.responses, a.queries), (3, 2));
        assert!((a.max - 3.5).abs() < 1e-12); // (1 + 6) / 2
        let b = s.iter().find(|x| x.group == "b").unwrap();
        assert_eq!((b.responses, b.queries), (1, 1));
        assert!(format_stats(&s).contains("source"));
    }
}
