//! Batching tokenised records into model input, with every response token as a label.
//!
//! Two layouts give the same log-probs and gradients (design.md, "Speed: prefix sharing"):
//! - `Padded`: one row `[query, response_i]` per response;
//! - `Packed`: one row `[query, response_1, …, response_k]` per query, positions restarting after the query and a
//!   block mask letting each response see the query and its own earlier tokens. The first token of every
//!   response is predicted from the last query position, so that position carries k labels.

use std::str::FromStr;

use candle_core::Device;

use crate::model::{Input, Labels, ModelError};

use super::tokenize::TokenizedRecord;

/// How responses are laid out in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// One row per query, the query shared by its k responses.
    #[default]
    Packed,
    /// One row per (query, response).
    Padded,
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "packed" => Ok(Self::Packed),
            "padded" => Ok(Self::Padded),
            _ => Err(format!("unknown layout {s:?}: use packed or padded")),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Packed => "packed",
            Self::Padded => "padded",
        })
    }
}

/// Model input for a set of records plus the bookkeeping to regroup label log-probs per response.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub input: Input,
    /// Every response token, in order: record, response, token.
    pub labels: Labels,
    /// For each label, the global index of its response (records in order, responses in order).
    pub response_of_label: Vec<u32>,
    /// Per record, per response: number of tokens (= labels of that response).
    pub n_tokens: Vec<Vec<usize>>,
    /// Tokens fed to the model (without padding).
    pub tokens: usize,
}

impl TokenBatch {
    /// Number of responses in the batch.
    pub fn n_responses(&self) -> usize {
        self.n_tokens.iter().map(Vec::len).sum()
    }
}

/// One row under construction.
struct Row {
    ids: Vec<u32>,
    pos: Vec<u32>,
    /// For each position, the positions it may attend (sorted).
    visible: Vec<Vec<u32>>,
}

/// Builds the model input for `records` in `layout`; rows are right-padded with `pad_id`.
pub fn build_batch(
    records: &[&TokenizedRecord],
    layout: Layout,
    pad_id: u32,
    device: &Device,
) -> Result<TokenBatch, ModelError> {
    let mut rows: Vec<Row> = Vec::new();
    // Labels refer to (row, position); flattened once the padded width is known.
    let mut label_at: Vec<(usize, usize)> = Vec::new();
    let mut label_ids: Vec<u32> = Vec::new();
    let mut response_of_label = Vec::new();
    let mut n_tokens = Vec::with_capacity(records.len());
    let mut tokens = 0;
    let mut resp_index = 0u32;
    for rec in records {
        let q = rec.query.len();
        if q == 0 {
            return Err(ModelError::Input("a query tokenised to no tokens".into()));
        }
        n_tokens.push(rec.responses.iter().map(Vec::len).collect());
        match layout {
            Layout::Padded => {
                for resp in &rec.responses {
                    let ids: Vec<u32> = rec.query.iter().chain(resp).copied().collect();
                    let n = ids.len();
                    let row = rows.len();
                    rows.push(Row {
                        ids,
                        pos: (0..n as u32).collect(),
                        visible: (0..n).map(|i| (0..=i as u32).collect()).collect(),
                    });
                    for (j, &tok) in resp.iter().enumerate() {
                        label_at.push((row, q - 1 + j));
                        label_ids.push(tok);
                        response_of_label.push(resp_index);
                    }
                    tokens += n;
                    resp_index += 1;
                }
            }
            Layout::Packed => {
                let mut ids = rec.query.clone();
                let mut pos: Vec<u32> = (0..q as u32).collect();
                let mut visible: Vec<Vec<u32>> = (0..q).map(|i| (0..=i as u32).collect()).collect();
                let row = rows.len();
                for resp in &rec.responses {
                    let start = ids.len();
                    for (j, &tok) in resp.iter().enumerate() {
                        let here = start + j;
                        ids.push(tok);
                        pos.push((q + j) as u32);
                        visible.push((0..q as u32).chain(start as u32..=here as u32).collect());
                        let from = if j == 0 { q - 1 } else { here - 1 };
                        label_at.push((row, from));
                        label_ids.push(tok);
                        response_of_label.push(resp_index);
                    }
                    resp_index += 1;
                }
                tokens += ids.len();
                rows.push(Row { ids, pos, visible });
            }
        }
    }
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = vec![vec![pad_id; t]; b];
    let mut pos = vec![vec![0u32; t]; b];
    let mut mask = vec![0u8; b * t * t];
    for (r, row) in rows.iter().enumerate() {
        let n = row.ids.len();
        ids[r][..n].copy_from_slice(&row.ids);
        pos[r][..n].copy_from_slice(&row.pos);
        for q in 0..t {
            let m = &mut mask[(r * t + q) * t..(r * t + q + 1) * t];
            if q < n {
                for &k in &row.visible[q] {
                    m[k as usize] = 1;
                }
            } else {
                // Padding attends to itself only, so no mask row is empty.
                m[q] = 1;
            }
        }
    }
    let input = Input::from_host(&ids, &pos, &mask, device)?;
    let labels = Labels {
        flat_positions: label_at.iter().map(|&(r, p)| (r * t + p) as u32).collect(),
        ids: label_ids,
    };
    Ok(TokenBatch {
        input,
        labels,
        response_of_label,
        n_tokens,
        tokens,
    })
}
