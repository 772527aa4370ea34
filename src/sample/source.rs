//! Where a run's responses come from (`Source`): none (setting P), the local model in batches, or an endpoint
//! with bounded concurrency.

use std::sync::Arc;
use std::time::Duration;

use crate::client::{
    map_concurrent, messages_from_prompt, ApiKind, Choice, Client, ClientError, CompletionParams,
    EndpointConfig,
};
use crate::data::FinishReason;
use crate::device::DTypeSpec;
use crate::model::{load_model, LoadedModel};

use super::args::{config_err, SampleConfig, SampleError, SampleSummary};
use super::plan::{Generator, Plan};
use super::prompts::Prompt;
use super::text::{continuation, cut_at_stop, first_stop, truncate_prompt};
use super::{generate, GenerateOptions, StopCheck, Strategy};

/// Where a prompt's responses go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// Into this record of the existing output (--append).
    Existing(usize),
    /// A new record at the end.
    New,
}

#[derive(Debug, Clone, Copy)]
/// A prompt of this run and where its responses go.
pub(super) struct Job {
    pub(super) prompt: usize,
    pub(super) target: Target,
}

/// OpenAI accepts at most 4 stop strings; more are applied on our side only.
pub(super) const MAX_API_STOPS: usize = 4;

/// One generated response.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Generated {
    pub text: String,
    /// Cut at a stop string.
    pub cut_by_stop: bool,
    /// `length` when it ran into `--max-new-tokens` without an EOS or a stop string.
    pub finish: FinishReason,
}

impl Generated {
    /// A response cut at its first stop string; `at_budget` = the generator stopped at its token budget.
    fn new(text: &str, stops: &[String], at_budget: bool) -> Self {
        let (text, cut_by_stop) = cut_at_stop(text, stops);
        let finish = if at_budget && !cut_by_stop {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Generated {
            text,
            cut_by_stop,
            finish,
        }
    }
}

/// Responses generated for one prompt.
pub(super) type Texts = Vec<Generated>;

/// The response generator of a run.
pub(super) enum Source {
    None,
    Local {
        model: Box<LoadedModel>,
        strategy: Strategy,
        /// Effective prompt budget (≤ --max-prompt-len, leaving room for the new tokens in the model's positions).
        max_prompt_len: usize,
    },
    Endpoint {
        client: Client,
    },
}

/// The responses of a batch's prompts, in order, up to the first failure (and the failure, if any).
pub(super) type BatchResult = (Vec<Texts>, Option<SampleError>);

impl Source {
    pub(super) fn open(
        cfg: &SampleConfig,
        plan: &Plan,
        preloaded: Option<&LoadedModel>,
    ) -> Result<Source, SampleError> {
        match &plan.generator {
            Generator::None => Ok(Source::None),
            Generator::Local { strategy, .. } => {
                let mut model = match preloaded {
                    // A clone shares the weights' storage.
                    Some(m) => m.clone(),
                    None => {
                        let path = cfg.model.as_ref().expect("checked by plan()");
                        let device = cfg.device.open()?;
                        load_model(path, &device, cfg.dtype.dtype())?
                    }
                };
                match cfg.gen.decode_dtype {
                    None | Some(DTypeSpec::F32) => {}
                    Some(DTypeSpec::Bf16) => model.model.enable_bf16_decode()?,
                    Some(DTypeSpec::F16) => {
                        return Err(config_err("--decode-dtype takes f32 or bf16".to_string()))
                    }
                }
                let mut max_prompt_len = cfg.gen.max_prompt_len;
                if let Some(positions) = model.model.max_positions() {
                    if cfg.gen.max_new_tokens >= positions {
                        return Err(config_err(format!(
                            "--max-new-tokens {} leaves no room for a prompt in the model's {positions} positions",
                            cfg.gen.max_new_tokens
                        )));
                    }
                    if max_prompt_len + cfg.gen.max_new_tokens > positions {
                        max_prompt_len = positions - cfg.gen.max_new_tokens;
                        eprintln!(
                            "note: prompts are cut to {max_prompt_len} tokens so that {} new tokens fit the model's \
                             {positions} positions",
                            cfg.gen.max_new_tokens
                        );
                    }
                }
                Ok(Source::Local {
                    model: Box::new(model),
                    strategy: strategy.clone(),
                    max_prompt_len,
                })
            }
            Generator::Endpoint { .. } => {
                let endpoint = EndpointConfig {
                    url: cfg.endpoint.clone().expect("checked by plan()"),
                    model: cfg.endpoint_model.clone().expect("checked by plan()"),
                    api_key_env: cfg.api_key_env.clone(),
                    timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
                    max_retries: cfg.retries,
                    backoff: Duration::from_millis(cfg.backoff_ms),
                    concurrency: cfg.concurrency.max(1),
                };
                Ok(Source::Endpoint {
                    client: Client::new(endpoint).map_err(Box::new)?,
                })
            }
        }
    }

    /// Responses for the prompts of one batch, in order.
    pub(super) fn run(
        &mut self,
        cfg: &SampleConfig,
        plan: &Plan,
        prompts: &[Prompt],
        batch: &[Job],
        stops: &[String],
        summary: &mut SampleSummary,
    ) -> BatchResult {
        match self {
            Source::None => (vec![Vec::new(); batch.len()], None),
            Source::Local {
                model,
                strategy,
                max_prompt_len,
            } => local_batch(
                model,
                strategy,
                *max_prompt_len,
                cfg,
                plan,
                prompts,
                batch,
                stops,
                summary,
            )
            .map_or_else(|e| (Vec::new(), Some(e)), |t| (t, None)),
            Source::Endpoint { client } => {
                let Generator::Endpoint { temperature, top_p } = plan.generator else {
                    unreachable!("an endpoint source has an endpoint plan")
                };
                let params = CompletionParams {
                    max_tokens: cfg.gen.max_new_tokens,
                    temperature,
                    top_p,
                    n: plan.k,
                    stop: stops.iter().take(MAX_API_STOPS).cloned().collect(),
                    seed: Some(cfg.seed),
                };
                let results = map_concurrent(batch, cfg.concurrency.max(1), |job| {
                    fetch(
                        client,
                        cfg.endpoint_api,
                        &prompts[job.prompt].query,
                        &params,
                    )
                });
                let mut texts = Vec::with_capacity(batch.len());
                for (job, r) in batch.iter().zip(results) {
                    match r {
                        // The server's `finish_reason` "length": cut at `max_tokens`.
                        Ok(v) => texts.push(
                            v.iter()
                                .map(|c| {
                                    let at_budget = c.finish_reason.as_deref() == Some("length");
                                    Generated::new(&c.text, stops, at_budget)
                                })
                                .collect(),
                        ),
                        Err(e) => {
                            let e = SampleError::Endpoint {
                                prompts: cfg.prompts.clone(),
                                index: job.prompt + 1,
                                source: Box::new(e),
                            };
                            return (texts, Some(e));
                        }
                    }
                }
                (texts, None)
            }
        }
    }
}

/// `p.n` responses from the endpoint: asks again for the rest when a server returns fewer choices (some ignore
/// `n`), at most `n` rounds.
pub(super) fn fetch(
    client: &Client,
    api: ApiKind,
    query: &str,
    p: &CompletionParams,
) -> Result<Vec<Choice>, ClientError> {
    let mut out: Vec<Choice> = Vec::with_capacity(p.n);
    for _ in 0..p.n.max(1) {
        let want = p.n - out.len();
        let params = CompletionParams {
            n: want,
            ..p.clone()
        };
        let got = match api {
            ApiKind::Chat => client.chat_choices(&messages_from_prompt(query), &params)?,
            ApiKind::Completions => client.complete_choices(query, &params)?,
        };
        out.extend(got.into_iter().take(want));
        if out.len() >= p.n {
            break;
        }
    }
    if out.len() < p.n {
        return Err(ClientError::Malformed {
            url: client.url_of(api),
            field: "choices".into(),
            msg: format!("asked {} times for {} choices, got {}", p.n, p.n, out.len()),
            body: String::new(),
        });
    }
    Ok(out)
}

/// Generates one batch with the local model.
#[allow(clippy::too_many_arguments)]
pub(super) fn local_batch(
    m: &LoadedModel,
    strategy: &Strategy,
    max_prompt_len: usize,
    cfg: &SampleConfig,
    plan: &Plan,
    prompts: &[Prompt],
    batch: &[Job],
    stops: &[String],
    summary: &mut SampleSummary,
) -> Result<Vec<Texts>, SampleError> {
    let tok = &m.tokenizer;
    let mut ids = Vec::with_capacity(batch.len());
    for job in batch {
        let full = tok.encode(&prompts[job.prompt].query, true)?;
        let (cut, truncated) = truncate_prompt(full, max_prompt_len, tok.bos_id);
        summary.truncated_prompts += usize::from(truncated);
        ids.push(cut);
    }
    let stop_check: Option<StopCheck> = if stops.is_empty() {
        None
    } else {
        let tok = tok.clone();
        let stops = stops.to_vec();
        Some(Arc::new(move |new: &[u32]| {
            tok.decode(new, true)
                .map(|t| first_stop(&t, &stops).is_some())
                .unwrap_or(false)
        }))
    };
    let first = batch[0].prompt as u64;
    let opts = GenerateOptions {
        strategy: strategy.clone(),
        num_return_sequences: plan.k,
        max_new_tokens: cfg.gen.max_new_tokens,
        stop_ids: tok.stop_ids.clone(),
        pad_id: tok.pad_id,
        // One seed per block of prompts: the same in a resumed run.
        seed: cfg
            .seed
            .wrapping_add(first.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        stop_check,
    };
    let generated = generate(&m.model, &ids, &opts)?;
    if generated.len() != batch.len() {
        return Err(config_err(format!(
            "the generator returned {} results for {} prompts",
            generated.len(),
            batch.len()
        )));
    }
    let mut out = Vec::with_capacity(batch.len());
    for (prompt_ids, seqs) in ids.iter().zip(generated) {
        let prompt_text = tok.decode(prompt_ids, true)?;
        let mut texts = Vec::with_capacity(seqs.len());
        for g in seqs {
            let end = g
                .ids
                .iter()
                .position(|id| tok.stop_ids.contains(id))
                .unwrap_or(g.ids.len());
            let new = &g.ids[..end];
            summary.generated_tokens += new.len() as u64;
            let text = continuation(tok, prompt_ids, &prompt_text, new)?;
            texts.push(Generated::new(&text, stops, !g.finished));
        }
        out.push(texts);
    }
    Ok(out)
}
