//! The flags of a run resolved against its preset (`Plan`): which generator, how many responses, and the
//! description printed at the start.

use std::path::Path;

use super::args::{config_err, SampleConfig, SampleError};
use super::settings::{EarlyStop, Setting, StrategyKind};
use super::{EarlyStopping, Strategy};

/// Where responses come from in this run.
#[derive(Debug, Clone)]
pub(super) enum Generator {
    /// Setting P: provided responses only.
    None,
    Local {
        strategy: Strategy,
    },
    Endpoint {
        temperature: f64,
        top_p: f64,
    },
}

/// The flags resolved against the preset.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) generator: Generator,
    /// Generated responses per prompt.
    pub(super) k: usize,
    pub(super) keep_provided: bool,
    /// The source label of generated responses.
    pub(super) source: String,
}

pub(super) fn positive(name: &str, v: Option<usize>) -> Result<Option<usize>, SampleError> {
    match v {
        Some(0) => Err(config_err(format!("{name} must be at least 1"))),
        v => Ok(v),
    }
}

/// Resolves presets and overrides, and checks the combination.
pub(super) fn plan(cfg: &SampleConfig) -> Result<Plan, SampleError> {
    let setting = cfg.setting;
    if cfg.endpoint.is_some() && cfg.model.is_some() {
        return Err(config_err(
            "give --model or --endpoint, not both: run `rrhf sample` once per source and combine them with --append",
        ));
    }
    let num_responses = positive("--num-responses", cfg.decoding.num_responses)?;
    if setting == Some(Setting::P) {
        if cfg.endpoint.is_some() || cfg.decoding.strategy.is_some() {
            return Err(config_err(
                "setting P uses the dataset's responses only: drop --endpoint / --strategy, or pick another setting",
            ));
        }
        if cfg.decoding.keep_provided == Some(false) {
            return Err(config_err(
                "setting P with --keep-provided false leaves no responses",
            ));
        }
        return Ok(Plan {
            generator: Generator::None,
            k: 0,
            keep_provided: true,
            source: String::new(),
        });
    }
    let keep_provided = cfg.decoding.keep_provided.unwrap_or(matches!(
        setting,
        Some(Setting::Bp | Setting::Sp | Setting::Dp)
    ));
    let sp = setting == Some(Setting::Sp);
    let temperature = cfg
        .decoding
        .temperature
        .unwrap_or(if sp { 0.8 } else { 1.0 });
    let top_p = cfg.decoding.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(config_err(format!(
            "--top-p must be in (0, 1], got {top_p}"
        )));
    }
    if let Some(url) = &cfg.endpoint {
        if let Some(s) = cfg.decoding.strategy.filter(|s| *s != StrategyKind::Sample) {
            return Err(config_err(format!(
                "--strategy {s} needs a local model: an endpoint samples (give --temperature / --top-p)"
            )));
        }
        let name = cfg.endpoint_model.clone().ok_or_else(|| {
            config_err(format!(
                "--endpoint {url} needs --endpoint-model NAME (the `model` of each request)"
            ))
        })?;
        if temperature.is_nan() || temperature < 0.0 {
            return Err(config_err(format!(
                "--temperature must be ≥ 0, got {temperature}"
            )));
        }
        return Ok(Plan {
            generator: Generator::Endpoint { temperature, top_p },
            k: num_responses.unwrap_or(if setting.is_some() { 4 } else { 1 }),
            keep_provided,
            source: format!("endpoint:{name}"),
        });
    }
    let kind = match (cfg.decoding.strategy, setting) {
        (Some(k), _) => k,
        (None, Some(Setting::Bp)) => StrategyKind::Beam,
        (None, Some(Setting::Dp | Setting::D)) => StrategyKind::DiverseBeam,
        (None, Some(Setting::Sp)) => StrategyKind::Sample,
        (None, _) => {
            return Err(config_err(
                "give --setting BP|SP|DP|D|P, --strategy greedy|beam|diverse-beam|sample, or --endpoint URL",
            ))
        }
    };
    if cfg.model.is_none() {
        return Err(config_err(format!(
            "--model DIR is required to generate ({} responses); only setting P and --endpoint need no model",
            kind
        )));
    }
    let k = num_responses.unwrap_or(if kind == StrategyKind::Greedy { 1 } else { 4 });
    let num_beams = positive("--num-beams", cfg.decoding.num_beams)?.unwrap_or(k.max(4));
    let length_penalty = cfg.decoding.beam_length_penalty.unwrap_or(1.0);
    let early_stopping = cfg
        .decoding
        .early_stopping
        .unwrap_or(EarlyStop::False)
        .engine();
    let beams_fit = |what: &str| -> Result<(), SampleError> {
        if k > num_beams {
            return Err(config_err(format!(
                "--num-responses {k} is more than the {num_beams} beams of {what}: raise --num-beams"
            )));
        }
        Ok(())
    };
    let strategy = match kind {
        StrategyKind::Greedy => {
            if k != 1 {
                return Err(config_err(format!(
                    "greedy decoding gives one response per prompt, not {k}: use --strategy beam, diverse-beam or sample"
                )));
            }
            Strategy::Greedy
        }
        StrategyKind::Beam => {
            beams_fit("beam search")?;
            Strategy::Beam {
                num_beams,
                length_penalty,
                early_stopping,
            }
        }
        StrategyKind::DiverseBeam => {
            beams_fit("diverse beam search")?;
            let groups =
                positive("--num-beam-groups", cfg.decoding.num_beam_groups)?.unwrap_or(num_beams);
            if num_beams % groups != 0 {
                return Err(config_err(format!(
                    "--num-beams {num_beams} must be divisible by --num-beam-groups {groups}"
                )));
            }
            let diversity_penalty = cfg.decoding.diversity_penalty.unwrap_or(1.0);
            if diversity_penalty.is_nan() || diversity_penalty < 0.0 {
                return Err(config_err(format!(
                    "--diversity-penalty must be ≥ 0, got {diversity_penalty}"
                )));
            }
            Strategy::DiverseBeam {
                num_beams,
                num_beam_groups: groups,
                diversity_penalty,
                length_penalty,
                early_stopping,
            }
        }
        StrategyKind::Sample => {
            if !temperature.is_finite() || temperature <= 0.0 {
                return Err(config_err(format!(
                    "--temperature must be > 0 for sampling, got {temperature} (temperature 0 is greedy: use --strategy greedy)"
                )));
            }
            Strategy::Sample {
                temperature,
                top_k: match cfg.decoding.top_k {
                    Some(0) => None,
                    Some(t) => Some(t),
                    None => Some(50),
                },
                top_p,
            }
        }
    };
    Ok(Plan {
        generator: Generator::Local { strategy },
        k,
        keep_provided,
        source: kind.source(),
    })
}

/// One line describing the resolved plan.
pub(super) fn describe(plan: &Plan, cfg: &SampleConfig, stops: &[String]) -> String {
    let setting = cfg
        .setting
        .map(|s| format!("setting {s}: "))
        .unwrap_or_default();
    let what = match &plan.generator {
        Generator::None => "the dataset's responses only (labels kept as scores)".to_string(),
        Generator::Local { strategy, .. } => {
            let s = match strategy {
                Strategy::Greedy => "greedy".to_string(),
                Strategy::Beam {
                    num_beams,
                    length_penalty,
                    early_stopping,
                } => format!(
                    "beam search ({num_beams} beams, length penalty {length_penalty}, early stopping {})",
                    early_name(early_stopping)
                ),
                Strategy::DiverseBeam {
                    num_beams,
                    num_beam_groups,
                    diversity_penalty,
                    length_penalty,
                    early_stopping,
                } => format!(
                    "diverse beam search ({num_beams} beams in {num_beam_groups} groups, diversity penalty \
                     {diversity_penalty}, length penalty {length_penalty}, early stopping {})",
                    early_name(early_stopping)
                ),
                Strategy::Sample {
                    temperature,
                    top_k,
                    top_p,
                } => format!(
                    "sampling (temperature {temperature}, top-k {}, top-p {top_p}, seed {})",
                    top_k.map_or("off".to_string(), |k| k.to_string()),
                    cfg.seed
                ),
            };
            format!("{} × {s} from {}", plan.k, cfg.model.as_deref().unwrap_or(Path::new("?")).display())
        }
        Generator::Endpoint { temperature, top_p } => format!(
            "{} × {} ({} API, temperature {temperature}, top-p {top_p}, concurrency {}, timeout {} ms, {} retries)",
            plan.k,
            plan.source,
            cfg.endpoint_api,
            cfg.concurrency.max(1),
            cfg.timeout_ms,
            cfg.retries
        ),
    };
    let provided = if plan.keep_provided && plan.k > 0 {
        " + the dataset's responses"
    } else {
        ""
    };
    let limits = if plan.k > 0 {
        format!(
            "; max new tokens {}, max prompt tokens {}, stop {stops:?}",
            cfg.gen.max_new_tokens, cfg.gen.max_prompt_len
        )
    } else {
        String::new()
    };
    format!(
        "rrhf sample: {setting}{what}{provided}{limits}{}{}",
        if cfg.resume { "; resume" } else { "" },
        if cfg.append { "; append" } else { "" },
    )
}

pub(super) fn early_name(e: &EarlyStopping) -> &'static str {
    match e {
        EarlyStopping::True => "true",
        EarlyStopping::False => "false",
        EarlyStopping::Never => "never",
    }
}
