//! Group (diverse) beam search with the rules of transformers 4.x `_group_beam_search` + `BeamSearchScorer`
//! (built in up to 4.55; fixtures from 4.45.2). Later releases fetch the same code from the hub.
//!
//! The `num_beams` beams of a prompt form `num_beam_groups` groups of `g = num_beams / groups` beams. At each step
//! the groups choose in order; group `i` subtracts `diversity_penalty × (how often each token was just chosen by
//! groups 0..i of the same prompt)` from its log-probabilities (Hamming diversity) and keeps these penalised
//! scores in its running sums. Within a group: the best `max(2, 1 + |stop ids|) · g` candidates in order; a
//! stopping one among the first `g` becomes a hypothesis of the group (score `sum / len^length_penalty`, at most
//! `g` kept), the first `g` non-stopping ones run on. A group is done when its `g` hypotheses cannot be beaten
//! (`early_stopping`); a done group emits `pad_id` tokens, which still count in later groups' penalty. At the end
//! running beams of groups not done become hypotheses, and the prompt returns its best hypotheses over all groups.

use crate::model::error::Result;
use crate::model::CausalLm;

use super::decode::{
    hits_stop, log_softmax_into, Decoder, EarlyStopping, GenerateOptions, Generated, TopK,
};

const NEG: f32 = -1.0e9;

/// Parameters of [`run`].
#[derive(Debug, Clone, Copy)]
pub struct GroupParams {
    pub num_beams: usize,
    pub groups: usize,
    pub diversity_penalty: f64,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
}

#[derive(Debug, Clone)]
struct Beam {
    ids: Vec<u32>,
    score: f32,
    logprob: f64,
}

#[derive(Debug, Clone)]
struct Hyp {
    score: f64,
    ids: Vec<u32>,
    logprob: f64,
    stopped: bool,
}

/// transformers' `BeamHypotheses` for one group of one prompt.
struct Group {
    running: Vec<Beam>,
    hyps: Vec<Hyp>,
    worst: f64,
    done: bool,
}

impl Group {
    fn add(&mut self, cap: usize, lp: f64, b: &Beam, gen_len: usize, stopped: bool) {
        let score = b.score as f64 / (gen_len as f64).powf(lp);
        if self.hyps.len() < cap || score > self.worst {
            self.hyps.push(Hyp {
                score,
                ids: b.ids.clone(),
                logprob: b.logprob,
                stopped,
            });
            if self.hyps.len() > cap {
                // Python sorts (score, index) pairs: ties go to the lower index.
                let mut order: Vec<(f64, usize)> = self
                    .hyps
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (h.score, i))
                    .collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                self.hyps.remove(order[0].1);
                self.worst = order[1].0;
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    fn is_done(
        &self,
        cap: usize,
        p: &GroupParams,
        best: f64,
        gen_len: usize,
        max_new: usize,
    ) -> bool {
        if self.hyps.len() < cap {
            return false;
        }
        let len = match p.early_stopping {
            EarlyStopping::True => return true,
            EarlyStopping::False => gen_len,
            EarlyStopping::Never if p.length_penalty > 0.0 => max_new,
            EarlyStopping::Never => gen_len,
        };
        self.worst >= best / (len as f64).powf(p.length_penalty)
    }
}

/// Group beam search over all prompts.
pub fn run(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    p: GroupParams,
) -> Result<Vec<Vec<Generated>>> {
    let (nb, ng) = (p.num_beams, p.groups);
    let gs = nb / ng;
    let max_new = opts.max_new_tokens;
    let k = (2usize).max(1 + opts.stop_ids.len()) * gs;
    // With a stop_check more than the stop ids may stop; look further down the list then, where transformers
    // (which has no such check in beam search) would fail.
    let k_scan = if opts.stop_check.is_some() { 4 * k } else { k };
    let dp = p.diversity_penalty as f32;
    let (mut dec, logits) = Decoder::prefill(model, prompts, opts.pad_id)?;
    let expand: Vec<usize> = (0..prompts.len() * nb).map(|i| i / nb).collect();
    dec.select(&expand)?;
    let mut logits = logits.select(&expand);
    let mut state: Vec<Vec<Group>> = (0..prompts.len())
        .map(|_| {
            (0..ng)
                .map(|_| Group {
                    running: (0..gs)
                        .map(|j| Beam {
                            ids: Vec::new(),
                            score: if j == 0 { 0.0 } else { NEG },
                            logprob: 0.0,
                        })
                        .collect(),
                    hyps: Vec::new(),
                    worst: 1e9,
                    done: false,
                })
                .collect()
        })
        .collect();
    // Decoder rows: for each live prompt, for each of its groups not done, its gs beams.
    let mut rows_of: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|pi| (0..ng).map(move |g| (pi, g)))
        .collect();
    let mut lps: Vec<Vec<f32>> = vec![Vec::new(); gs];
    let vocab = model.config().vocab_size();
    let mut counts = vec![0u32; vocab];
    let mut steps_run = 0;
    for step in 0..max_new {
        steps_run = step + 1;
        let gen_len = step + 1;
        let mut next_rows = Vec::new();
        let mut next_tokens = Vec::new();
        let mut next_groups = Vec::new();
        let mut ri = 0; // index into rows_of
        for (pi, groups) in state.iter_mut().enumerate() {
            if groups.iter().all(|g| g.done) {
                continue;
            }
            // Tokens chosen at this step by the groups before the current one.
            let mut chosen: Vec<u32> = Vec::with_capacity(nb);
            for (gi, grp) in groups.iter_mut().enumerate() {
                if grp.done {
                    chosen.extend(std::iter::repeat_n(opts.pad_id, gs));
                    continue;
                }
                debug_assert_eq!(rows_of[ri], (pi, gi));
                let base_row = ri * gs;
                ri += 1;
                for &t in &chosen {
                    if let Some(c) = counts.get_mut(t as usize) {
                        *c += 1;
                    }
                }
                let mut top = TopK::new(k_scan);
                for (j, lp) in lps.iter_mut().enumerate() {
                    log_softmax_into(logits.row(base_row + j), lp);
                    let base = grp.running[j].score;
                    if gi == 0 || chosen.is_empty() || dp == 0.0 {
                        top.push_row(lp, base, j * vocab);
                    } else {
                        for (v, &x) in lp.iter().enumerate() {
                            let c = counts[v];
                            let s = if c > 0 { x - dp * c as f32 } else { x };
                            top.push(base + s, j * vocab + v);
                        }
                    }
                }
                let cands = top.into_sorted();
                let best = cands.first().map_or(NEG, |c| c.0) as f64;
                let mut running = Vec::with_capacity(gs);
                for (rank, &(score, flat)) in cands.iter().enumerate() {
                    let (j, tok) = (flat / vocab, flat % vocab);
                    let parent = &grp.running[j];
                    let mut ids = Vec::with_capacity(parent.ids.len() + 1);
                    ids.extend_from_slice(&parent.ids);
                    ids.push(tok as u32);
                    let beam = Beam {
                        ids,
                        score,
                        logprob: parent.logprob + lps[j][tok] as f64,
                    };
                    if hits_stop(opts, &beam.ids) {
                        if rank < gs {
                            grp.add(gs, p.length_penalty, &beam, gen_len, true);
                        }
                    } else {
                        running.push((beam, j));
                        if running.len() == gs {
                            break;
                        }
                    }
                }
                // Only reachable through stop_check: fill with hopeless copies so the group keeps its width.
                while running.len() < gs {
                    let (b, j) = running.first().cloned().unwrap_or_else(|| {
                        let b = grp.running[0].clone();
                        (b, 0)
                    });
                    running.push((Beam { score: NEG, ..b }, j));
                }
                for &t in &chosen {
                    if let Some(c) = counts.get_mut(t as usize) {
                        *c -= 1;
                    }
                }
                grp.done = grp.done || grp.is_done(gs, &p, best, gen_len, max_new);
                for (b, j) in &running {
                    chosen.push(*b.ids.last().unwrap_or(&0));
                    if !grp.done {
                        next_rows.push(base_row + j);
                        next_tokens.push(*b.ids.last().unwrap_or(&0));
                    }
                }
                if !grp.done {
                    next_groups.push((pi, gi));
                }
                grp.running = running.into_iter().map(|(b, _)| b).collect();
            }
        }
        if next_groups.is_empty() || step + 1 == max_new {
            break;
        }
        dec.select(&next_rows)?;
        rows_of = next_groups;
        logits = dec.step(&next_tokens)?;
    }
    // Running beams of groups not done become hypotheses; then the best over all groups.
    let n = opts.num_return_sequences;
    Ok(state
        .into_iter()
        .map(|mut groups| {
            let mut all = Vec::new();
            for grp in &mut groups {
                if !grp.done {
                    for b in grp.running.clone() {
                        grp.add(gs, p.length_penalty, &b, steps_run, false);
                    }
                }
                all.append(&mut grp.hyps);
            }
            // Python: sorted ascending (stable), then pop from the end.
            all.sort_by(|a, b| a.score.total_cmp(&b.score));
            all.into_iter()
                .rev()
                .take(n)
                .map(|h| Generated {
                    ids: h.ids,
                    logprob_sum: h.logprob,
                    score: h.score,
                    finished: h.stopped,
                })
                .collect()
        })
        .collect())
}
