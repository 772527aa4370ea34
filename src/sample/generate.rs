//! The generation entry point: checks the options and runs the chosen strategy (`strategy_*.rs`) over the
//! shared decoding primitives of [`super::decode`].

use crate::model::error::Result;
use crate::model::CausalLm;

use super::decode::bad;
pub use super::decode::{
    log_softmax_into, logsumexp, Decoder, EarlyStopping, GenerateOptions, Generated, Logits,
    StopCheck, Strategy,
};
use super::strategy_beam;
use super::strategy_group;
use super::strategy_sample::{self, Warper};

/// Generates for a batch of prompts (token ids, any lengths ≥ 1); returns, per prompt, `num_return_sequences`
/// results in transformers' order (best beam first for beam search).
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<Generated>>> {
    let n = opts.num_return_sequences;
    validate(model, prompts, opts)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if opts.max_new_tokens == 0 {
        let empty = Generated {
            ids: Vec::new(),
            logprob_sum: 0.0,
            score: 0.0,
            finished: false,
        };
        return Ok(vec![vec![empty; n]; prompts.len()]);
    }
    match &opts.strategy {
        Strategy::Greedy => strategy_sample::run(model, prompts, opts, None),
        Strategy::Beam { num_beams: 1, .. } => strategy_sample::run(model, prompts, opts, None),
        Strategy::DiverseBeam {
            num_beams: 1,
            num_beam_groups: 1,
            ..
        } => strategy_sample::run(model, prompts, opts, None),
        Strategy::Sample {
            temperature,
            top_k,
            top_p,
        } => {
            let w = Warper::new(*temperature, *top_k, *top_p)?;
            strategy_sample::run(model, prompts, opts, Some(w))
        }
        Strategy::Beam {
            num_beams,
            length_penalty,
            early_stopping,
        } => strategy_beam::run(
            model,
            prompts,
            opts,
            *num_beams,
            *length_penalty,
            *early_stopping,
        ),
        Strategy::DiverseBeam {
            num_beams,
            num_beam_groups: 1,
            length_penalty,
            early_stopping,
            ..
        } => strategy_beam::run(
            model,
            prompts,
            opts,
            *num_beams,
            *length_penalty,
            *early_stopping,
        ),
        Strategy::DiverseBeam {
            num_beams,
            num_beam_groups,
            diversity_penalty,
            length_penalty,
            early_stopping,
        } => strategy_group::run(
            model,
            prompts,
            opts,
            strategy_group::GroupParams {
                num_beams: *num_beams,
                groups: *num_beam_groups,
                diversity_penalty: *diversity_penalty,
                length_penalty: *length_penalty,
                early_stopping: *early_stopping,
            },
        ),
    }
}

fn validate(model: &CausalLm, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<()> {
    let n = opts.num_return_sequences;
    if n == 0 {
        return Err(bad("num_return_sequences must be at least 1"));
    }
    let beams = match &opts.strategy {
        Strategy::Greedy => {
            if n != 1 {
                return Err(bad(format!(
                    "greedy decoding returns one sequence per prompt, not {n}: use beam search or sampling"
                )));
            }
            1
        }
        Strategy::Beam {
            num_beams,
            length_penalty,
            ..
        } => {
            if *num_beams == 0 || !length_penalty.is_finite() {
                return Err(bad(format!(
                    "beam search needs num_beams ≥ 1 and a finite length penalty (got {num_beams}, {length_penalty})"
                )));
            }
            *num_beams
        }
        Strategy::DiverseBeam {
            num_beams,
            num_beam_groups,
            diversity_penalty,
            length_penalty,
            ..
        } => {
            if *num_beams == 0
                || *num_beam_groups == 0
                || num_beam_groups > num_beams
                || num_beams % num_beam_groups != 0
            {
                return Err(bad(format!(
                    "diverse beam search needs num_beams divisible by num_beam_groups, and groups ≤ beams \
                     (got {num_beams} beams, {num_beam_groups} groups)"
                )));
            }
            if !diversity_penalty.is_finite() || !length_penalty.is_finite() {
                return Err(bad("diversity and length penalties must be finite"));
            }
            *num_beams
        }
        Strategy::Sample {
            temperature, top_p, ..
        } => {
            Warper::new(*temperature, None, *top_p)?;
            usize::MAX
        }
    };
    if n > beams {
        return Err(bad(format!(
            "num_return_sequences ({n}) cannot exceed num_beams ({beams})"
        )));
    }
    let vocab = model.config().vocab_size();
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(bad(format!(
                "prompt {i} is empty: generation needs at least one token (e.g. BOS)"
            )));
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(format!(
                "prompt {i}: token id {t} is outside the vocabulary ({vocab})"
            )));
        }
        if let Some(max) = model.max_positions() {
            if p.len() + opts.max_new_tokens > max + 1 {
                return Err(bad(format!(
                    "prompt {i}: {} tokens + {} new tokens exceed the model's {max} positions",
                    p.len(),
                    opts.max_new_tokens
                )));
            }
        }
    }
    Ok(())
}
