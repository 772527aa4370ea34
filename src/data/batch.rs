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

/// Tokens a packed row holds at most before its responses are split over several rows, each starting with the
/// query (unless one query and response alone are longer). The row's attention mask is `[T, T]` bytes on the
/// host and every row of a batch is padded to the longest one, so one query with many long responses would
/// otherwise cost quadratic memory and pad every other row of its batch to its length.
pub const MAX_PACKED_ROW: usize = 4096;

/// Builds the model input for `records` in `layout`; rows are right-padded with `pad_id`. Packed rows hold at
/// most [`MAX_PACKED_ROW`] tokens (see [`build_batch_limited`]).
pub fn build_batch(
    records: &[&TokenizedRecord],
    layout: Layout,
    pad_id: u32,
    device: &Device,
) -> Result<TokenBatch, ModelError> {
    build_batch_limited(records, layout, pad_id, MAX_PACKED_ROW, device)
}

/// As [`build_batch`], with packed rows of at most `max_row` tokens: a query whose responses do not fit in one
/// row gets several, each `[query, some of its responses]` with the responses in order (a response that does not
/// fit beside the query even alone gets a row of its own). Labels keep their order (record, response, token), so
/// the loss sees the same log-probs as from one row.
pub fn build_batch_limited(
    records: &[&TokenizedRecord],
    layout: Layout,
    pad_id: u32,
    max_row: usize,
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
                let new_row = || Row {
                    ids: rec.query.clone(),
                    pos: (0..q as u32).collect(),
                    visible: (0..q).map(|i| (0..=i as u32).collect()).collect(),
                };
                let mut cur = new_row();
                let mut row = rows.len();
                for resp in &rec.responses {
                    if cur.ids.len() > q && cur.ids.len() + resp.len() > max_row {
                        tokens += cur.ids.len();
                        rows.push(std::mem::replace(&mut cur, new_row()));
                        row = rows.len();
                    }
                    let start = cur.ids.len();
                    for (j, &tok) in resp.iter().enumerate() {
                        let here = start + j;
                        cur.ids.push(tok);
                        cur.pos.push((q + j) as u32);
                        cur.visible
                            .push((0..q as u32).chain(start as u32..=here as u32).collect());
                        let from = if j == 0 { q - 1 } else { here - 1 };
                        label_at.push((row, from));
                        label_ids.push(tok);
                        response_of_label.push(resp_index);
                    }
                    resp_index += 1;
                }
                tokens += cur.ids.len();
                rows.push(cur);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(q: usize, lens: &[usize]) -> TokenizedRecord {
        TokenizedRecord {
            query: (1..=q as u32).collect(),
            responses: lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n as u32).map(|t| 100 * (i as u32 + 1) + t).collect())
                .collect(),
            scores: lens.iter().map(|_| 0.0).collect(),
            query_truncated: false,
            responses_truncated: 0,
        }
    }

    #[test]
    fn long_packed_rows_split_into_rows_that_each_start_with_the_query() {
        let rec = record(4, &[3, 2, 5, 1]);
        let one = build_batch(&[&rec], Layout::Packed, 0, &Device::Cpu).unwrap();
        // Rows of at most 10 tokens: [q, y1, y2] (9 tokens), [q, y3, y4] (10).
        let split = build_batch_limited(&[&rec], Layout::Packed, 0, 10, &Device::Cpu).unwrap();
        assert_eq!(one.input.dims(), (1, 15));
        assert_eq!(split.input.dims(), (2, 10));
        assert_eq!(split.tokens, 9 + 10);
        assert_eq!(split.labels.ids, one.labels.ids);
        assert_eq!(split.response_of_label, one.response_of_label);
        assert_eq!(split.n_tokens, one.n_tokens);
        let ids = split.input.ids.to_vec2::<u32>().unwrap();
        for row in &ids {
            assert_eq!(&row[..4], &[1, 2, 3, 4]);
        }
        // The first label of response 3 is predicted from the last query position of the second row.
        assert_eq!(split.labels.flat_positions[5], 10 + 3);
        // A response longer than the limit beside the query still gets a row of its own.
        let tiny = build_batch_limited(&[&rec], Layout::Packed, 0, 1, &Device::Cpu).unwrap();
        assert_eq!(tiny.input.dims().0, 4);
    }
}
