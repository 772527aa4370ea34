//! Beam search with the rules of transformers' vectorised `_beam_search` (4.50 onwards; fixtures from 4.57.6).
//!
//! Per prompt and step: the `K = max(2, 1 + |stop ids|) · num_beams` best continuations of all beams by
//! accumulated log-probability (f32, as torch); the best `num_beams` of them that do not stop continue; those among
//! the first `num_beams` that stop (stop id, `stop_check`, or the last step) compete for the `num_beams` finished
//! slots with score `sum / len^length_penalty`. A prompt is decided (leaves the batch) when no running beam can
//! improve on a full set of finished ones (`early_stopping` heuristics) or, with `EarlyStopping::True`, when
//! the set is full.

use crate::model::error::Result;
use crate::model::CausalLm;

use super::decode::{
    hits_stop, log_softmax_into, Decoder, EarlyStopping, GenerateOptions, Generated, TopK,
};

const NEG: f32 = -1.0e9;

#[derive(Debug, Clone)]
struct Beam {
    ids: Vec<u32>,
    score: f32,
    logprob: f64,
    stopped: bool,
}

struct Prompt {
    running: Vec<Beam>,
    /// Sorted by score, best first; at most `num_beams`.
    finished: Vec<Beam>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`.
    open: bool,
    decided: bool,
}

/// Beam search over all prompts; `n` = `num_return_sequences` best finished hypotheses per prompt.
pub fn run(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    num_beams: usize,
    length_penalty: f64,
    early_stopping: EarlyStopping,
) -> Result<Vec<Vec<Generated>>> {
    let nb = num_beams;
    let max_new = opts.max_new_tokens;
    let k = (2usize).max(1 + opts.stop_ids.len()) * nb;
    let (mut dec, logits) = Decoder::prefill(model, prompts, opts.pad_id)?;
    // Every prompt starts with num_beams copies of itself; all but the first score −1e9.
    let expand: Vec<usize> = (0..prompts.len() * nb).map(|i| i / nb).collect();
    dec.select(&expand)?;
    let mut logits = logits.select(&expand);
    let mut state: Vec<Prompt> = (0..prompts.len())
        .map(|_| Prompt {
            running: (0..nb)
                .map(|j| Beam {
                    ids: Vec::new(),
                    score: if j == 0 { 0.0 } else { NEG },
                    logprob: 0.0,
                    stopped: false,
                })
                .collect(),
            finished: Vec::with_capacity(nb + k),
            open: true,
            decided: false,
        })
        .collect();
    // live[i]: the prompt whose beams are decoder rows i·nb .. (i+1)·nb.
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    let mut lps: Vec<Vec<f32>> = vec![Vec::new(); nb];
    for step in 0..max_new {
        let last = step + 1 == max_new;
        let mut next_rows = Vec::new();
        let mut next_tokens = Vec::new();
        let mut next_live = Vec::new();
        for (li, &p) in live.iter().enumerate() {
            let st = &mut state[p];
            let mut top = TopK::new(k);
            for (j, lp) in lps.iter_mut().enumerate() {
                log_softmax_into(logits.row(li * nb + j), lp);
                top.push_row(lp, st.running[j].score, j * lp.len());
            }
            let vocab = lps[0].len();
            let cands: Vec<(Beam, usize)> = top
                .into_sorted()
                .into_iter()
                .map(|(score, flat)| {
                    let (j, tok) = (flat / vocab, flat % vocab);
                    let parent = &st.running[j];
                    let mut ids = Vec::with_capacity(parent.ids.len() + 1);
                    ids.extend_from_slice(&parent.ids);
                    ids.push(tok as u32);
                    let stopped = hits_stop(opts, &ids);
                    let logprob = parent.logprob + lps[j][tok] as f64;
                    (
                        Beam {
                            ids,
                            score,
                            logprob,
                            stopped,
                        },
                        j,
                    )
                })
                .collect();
            // Running beams of the next step: the best candidates that do not stop (stopping ones sink by 1e9).
            let mut order: Vec<(f32, usize)> = cands
                .iter()
                .enumerate()
                .map(|(i, (b, _))| (b.score + if b.stopped || last { NEG } else { 0.0 }, i))
                .collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let running: Vec<(Beam, usize)> = order
                .iter()
                .take(nb)
                .map(|&(s, i)| {
                    let (b, j) = &cands[i];
                    (
                        Beam {
                            score: s,
                            ..b.clone()
                        },
                        *j,
                    )
                })
                .collect();
            // Finished hypotheses: stopping candidates among the first num_beams.
            let full = st.finished.len() == nb;
            if st.open && !(early_stopping == EarlyStopping::True && full) {
                let denom = ((step + 1) as f64).powf(length_penalty) as f32;
                for (b, _) in cands.iter().take(nb).filter(|(b, _)| b.stopped || last) {
                    st.finished.push(Beam {
                        score: b.score / denom,
                        ..b.clone()
                    });
                }
                st.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
                st.finished.truncate(nb);
            }
            // Can a running beam still beat the worst finished hypothesis?
            let hyp_len = if early_stopping == EarlyStopping::Never && length_penalty > 0.0 {
                max_new
            } else {
                step + 1
            };
            let best = running[0].0.score / (hyp_len as f64).powf(length_penalty) as f32;
            let worst = if st.finished.len() == nb {
                st.finished
                    .iter()
                    .map(|b| b.score)
                    .fold(f32::INFINITY, f32::min)
            } else {
                NEG
            };
            st.open &= best > worst;
            st.decided = last
                || !st.open
                || (early_stopping == EarlyStopping::True && st.finished.len() == nb);
            st.running = running.iter().map(|(b, _)| b.clone()).collect();
            if !st.decided {
                for (b, j) in &running {
                    next_rows.push(li * nb + j);
                    next_tokens.push(*b.ids.last().unwrap_or(&0));
                }
                next_live.push(p);
            }
        }
        if next_live.is_empty() {
            break;
        }
        dec.select(&next_rows)?;
        live = next_live;
        logits = dec.step(&next_tokens)?;
    }
    let n = opts.num_return_sequences;
    Ok(state
        .into_iter()
        .map(|st| {
            let mut out: Vec<Generated> = st
                .finished
                .into_iter()
                .take(n)
                .map(|b| Generated {
                    ids: b.ids,
                    logprob_sum: b.logprob,
                    score: b.score as f64,
                    finished: b.stopped,
                })
                .collect();
            // Cannot happen with transformers' rules (the last step fills every slot); kept total for safety.
            let mut extra = st.running.into_iter();
            while out.len() < n {
                match extra.next() {
                    Some(b) => out.push(Generated {
                        ids: b.ids,
                        logprob_sum: b.logprob,
                        score: b.score as f64,
                        finished: b.stopped,
                    }),
                    None => break,
                }
            }
            out
        })
        .collect())
}
