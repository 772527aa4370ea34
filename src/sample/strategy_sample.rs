//! Greedy decoding and multinomial sampling (transformers' `_sample`): every sequence is independent; finished
//! ones leave the batch.

use crate::model::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::rng::Rng;

use super::decode::{hits_stop, logsumexp, Decoder, GenerateOptions, Generated};

/// transformers' sampling warpers in their order: `TemperatureLogitsWarper`, `TopKLogitsWarper`,
/// `TopPLogitsWarper` (`min_tokens_to_keep = 1`), then softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warper {
    temperature: f64,
    top_k: Option<usize>,
    top_p: f64,
}

impl Warper {
    /// Checks the parameters: temperature > 0 (0 is not a sampling setting: use greedy), top-p in (0, 1].
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: f64) -> Result<Self> {
        if temperature == 0.0 {
            return Err(ModelError::Input(
                "temperature 0 is not a valid sampling setting: use the greedy strategy".into(),
            ));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(ModelError::Input(format!(
                "temperature must be a positive number, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
        Ok(Self {
            temperature,
            top_k: top_k.filter(|&k| k > 0),
            top_p,
        })
    }

    /// The tokens that may be drawn and their probabilities (summing to 1), in descending order of probability
    /// when a filter is active, else in id order.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let inv_t = 1.0 / self.temperature;
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x as f64 * inv_t))
            .filter(|(_, s)| *s > f64::NEG_INFINITY)
            .collect();
        let filtered = self.top_k.is_some_and(|k| k < cand.len()) || self.top_p < 1.0;
        if filtered {
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        if let Some(k) = self.top_k {
            if k < cand.len() {
                // Ties with the k-th score stay (transformers removes only scores < the k-th).
                let kth = cand[k - 1].1;
                let keep = cand.iter().take_while(|c| c.1 >= kth).count();
                cand.truncate(keep);
            }
        }
        let mx = cand.first().map_or(0.0, |c| c.1);
        let mx = if filtered {
            mx
        } else {
            cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max)
        };
        for c in &mut cand {
            c.1 = (c.1 - mx).exp();
        }
        let total: f64 = cand.iter().map(|c| c.1).sum();
        for c in &mut cand {
            c.1 /= total;
        }
        if self.top_p < 1.0 {
            // transformers removes a token when the ascending cumulative probability up to it is ≤ 1 − top_p,
            // i.e. when the mass of the tokens above it is ≥ top_p; the most likely token always stays.
            let mut above = 0.0;
            let mut keep = 0;
            for c in &cand {
                if keep > 0 && above >= self.top_p {
                    break;
                }
                above += c.1;
                keep += 1;
            }
            cand.truncate(keep);
            let total: f64 = cand.iter().map(|c| c.1).sum();
            for c in &mut cand {
                c.1 /= total;
            }
        }
        cand
    }

    /// Draws one token.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        let dist = self.distribution(logits);
        let u = rng.uniform();
        let mut acc = 0.0;
        for &(t, p) in &dist {
            acc += p;
            if u < acc {
                return t;
            }
        }
        dist.last().map_or(0, |c| c.0)
    }
}

/// The random stream of sample `j` of prompt `i`.
pub fn sample_rng(seed: u64, prompt: usize, sample: usize) -> Rng {
    let mut s = Rng::new(seed);
    let a = s.next_u64();
    let mut r = Rng::new(
        a ^ (prompt as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (sample as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7),
    );
    r.next_u64();
    r
}

/// First index of the maximum (torch's `argmax`).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

struct Row {
    ids: Vec<u32>,
    logprob: f64,
    finished: bool,
    rng: Rng,
}

/// Greedy decoding (`warper: None`) or sampling: `num_return_sequences` independent sequences per prompt.
pub fn run(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    warper: Option<Warper>,
) -> Result<Vec<Vec<Generated>>> {
    let n = opts.num_return_sequences;
    let (mut dec, logits) = Decoder::prefill(model, prompts, opts.pad_id)?;
    let expand: Vec<usize> = (0..prompts.len() * n).map(|i| i / n).collect();
    let mut logits = if n > 1 {
        dec.select(&expand)?;
        logits.select(&expand)
    } else {
        logits
    };
    let mut rows: Vec<Row> = (0..prompts.len() * n)
        .map(|i| Row {
            ids: Vec::with_capacity(opts.max_new_tokens),
            logprob: 0.0,
            finished: false,
            rng: sample_rng(opts.seed, i / n, i % n),
        })
        .collect();
    // live[i]: the sequence in decoder row i.
    let mut live: Vec<usize> = (0..rows.len()).collect();
    for step in 0..opts.max_new_tokens {
        let mut keep = Vec::with_capacity(live.len());
        let mut tokens = Vec::with_capacity(live.len());
        for (r, &s) in live.iter().enumerate() {
            let lg = logits.row(r);
            let row = &mut rows[s];
            let tok = match &warper {
                None => argmax(lg),
                Some(w) => w.sample(lg, &mut row.rng),
            };
            row.logprob += (lg[tok as usize] - logsumexp(lg)) as f64;
            row.ids.push(tok);
            if hits_stop(opts, &row.ids) {
                row.finished = true;
            } else {
                keep.push(r);
                tokens.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() != live.len() {
            dec.select(&keep)?;
            live = keep.iter().map(|&r| live[r]).collect();
        }
        logits = dec.step(&tokens)?;
    }
    let mut out: Vec<Vec<Generated>> = vec![Vec::with_capacity(n); prompts.len()];
    for (i, row) in rows.into_iter().enumerate() {
        out[i / n].push(Generated {
            ids: row.ids,
            logprob_sum: row.logprob,
            score: row.logprob,
            finished: row.finished,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warpers_follow_transformers() {
        let logits = [2.0f32, 1.0, 0.5, 3.0, -1.0, 1.0];
        // Plain softmax at temperature 2.
        let w = Warper::new(2.0, None, 1.0).unwrap();
        let d = w.distribution(&logits);
        assert_eq!(d.len(), 6);
        let z: f64 = logits.iter().map(|&x| (x as f64 / 2.0).exp()).sum();
        for (t, p) in d {
            assert!((p - (logits[t as usize] as f64 / 2.0).exp() / z).abs() < 1e-12);
        }
        // Top-k keeps ties with the k-th score.
        let w = Warper::new(1.0, Some(3), 1.0).unwrap();
        let ids: Vec<u32> = w.distribution(&logits).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![3, 0, 1, 5]);
        // Top-p: keep the smallest prefix whose mass reaches p (the top token always).
        let w = Warper::new(1.0, None, 0.5).unwrap();
        let ids: Vec<u32> = w.distribution(&logits).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![3]); // p(3) ≈ 0.53 ≥ 0.5
        let w = Warper::new(1.0, None, 0.6).unwrap();
        let ids: Vec<u32> = w.distribution(&logits).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![3, 0]);
        assert!(Warper::new(0.0, None, 1.0)
            .unwrap_err()
            .to_string()
            .contains("greedy"));
        assert!(Warper::new(1.0, None, 0.0).is_err());
    }
}
