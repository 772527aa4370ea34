//! The generation engine against transformers' `generate` (tests/fixtures/generate, made by
//! tools/make_generate_fixtures.py), against a slow full-recompute reference, and sampling by its statistics.

use std::sync::Arc;

use candle_core::{DType, Device};
use rrhf::model::kv_cache::KvCache;
use rrhf::model::{CausalLm, Input};
use rrhf::sample::{generate, Decoder, EarlyStopping, GenerateOptions, Generated, Strategy};
use serde_json::Value;

use crate::common::{fixtures, load};

/// Steps whose top-2 margin (greedy) or candidate-score gap (beams) is below this are float near-ties.
const NEAR_TIE: f64 = 1e-4;

fn fixture() -> Value {
    let path = fixtures().join("generate/generate.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("generate.json")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn early(v: &Value) -> EarlyStopping {
    match v {
        Value::Bool(true) => EarlyStopping::True,
        Value::Bool(false) => EarlyStopping::False,
        Value::String(s) if s == "never" => EarlyStopping::Never,
        other => panic!("early_stopping {other}"),
    }
}

fn model(name: &str) -> CausalLm {
    load(name, DType::F32).model
}

/// Runs one fixture case through `generate`.
fn run_case(
    m: &CausalLm,
    prompts: &[Vec<u32>],
    eos: u32,
    case: &Value,
    doc: &Value,
) -> Vec<Vec<Generated>> {
    let f = |k: &str| case[k].as_f64().unwrap();
    let u = |k: &str| case[k].as_u64().unwrap() as usize;
    let strategy = match case["strategy"].as_str().unwrap() {
        "greedy" => Strategy::Greedy,
        "beam" => Strategy::Beam {
            num_beams: u("num_beams"),
            length_penalty: f("length_penalty"),
            early_stopping: early(&case["early_stopping"]),
        },
        "diverse_beam" => Strategy::DiverseBeam {
            num_beams: u("num_beams"),
            num_beam_groups: u("num_beam_groups"),
            diversity_penalty: f("diversity_penalty"),
            length_penalty: f("length_penalty"),
            early_stopping: early(&case["early_stopping"]),
        },
        s => panic!("strategy {s}"),
    };
    let no_eos = case["no_eos"].as_bool().unwrap_or(false);
    let opts = GenerateOptions {
        strategy,
        num_return_sequences: case["num_return_sequences"].as_u64().unwrap_or(1) as usize,
        max_new_tokens: doc["max_new_tokens"].as_u64().unwrap() as usize,
        stop_ids: if no_eos { vec![] } else { vec![eos] },
        pad_id: doc["pad_id"].as_u64().unwrap() as u32,
        ..GenerateOptions::default()
    };
    generate(m, prompts, &opts).unwrap()
}

/// Compares every fixture case of `strategies`; returns (sequences compared, prompts skipped for near-ties).
fn check_cases(strategies: &[&str]) -> (usize, usize) {
    let doc = fixture();
    let (mut compared, mut skipped) = (0, 0);
    for (name, mdoc) in doc["models"].as_object().unwrap() {
        let m = model(name);
        let prompts: Vec<Vec<u32>> = mdoc["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let eos = mdoc["eos"].as_u64().unwrap() as u32;
        for case in mdoc["cases"].as_array().unwrap() {
            if !strategies.contains(&case["strategy"].as_str().unwrap()) {
                continue;
            }
            let cname = case["name"].as_str().unwrap();
            let got = run_case(&m, &prompts, eos, case, &doc);
            let want = case["outputs"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (p, (g, w)) in got.iter().zip(want).enumerate() {
                let w = w.as_array().unwrap();
                assert_eq!(
                    g.len(),
                    w.len(),
                    "{name} {cname} prompt {p}: number of results"
                );
                let margins: Vec<f64> = case["margins"][p]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::INFINITY))
                    .collect();
                if case["strategy"] == "greedy" {
                    // Compare up to (and including) the last step before the first near-tie.
                    let want_ids = ids(&w[0]["ids"]);
                    let upto = margins
                        .iter()
                        .position(|&x| x < NEAR_TIE)
                        .unwrap_or(usize::MAX);
                    if upto < want_ids.len() {
                        skipped += 1;
                    }
                    let n = upto.min(want_ids.len());
                    assert_eq!(
                        &g[0].ids[..n.min(g[0].ids.len())],
                        &want_ids[..n],
                        "{name} {cname} prompt {p}"
                    );
                    if n == want_ids.len() {
                        assert_eq!(g[0].ids, want_ids, "{name} {cname} prompt {p}");
                    }
                    compared += 1;
                    continue;
                }
                if margins.iter().any(|&x| x < NEAR_TIE) {
                    skipped += 1;
                    continue;
                }
                for (j, (gj, wj)) in g.iter().zip(w).enumerate() {
                    let want_ids = ids(&wj["ids"]);
                    assert_eq!(gj.ids, want_ids, "{name} {cname} prompt {p} result {j}");
                    let ws = wj["score"].as_f64().unwrap();
                    assert!(
                        (gj.score - ws).abs() <= 1e-4 * ws.abs().max(1.0),
                        "{name} {cname} prompt {p} result {j}: score {} vs transformers {ws}",
                        gj.score
                    );
                    compared += 1;
                }
            }
        }
    }
    eprintln!("{strategies:?}: {compared} sequences compared, {skipped} prompts cut or skipped at a near-tie");
    (compared, skipped)
}

#[test]
fn greedy_matches_transformers() {
    let (compared, skipped) = check_cases(&["greedy"]);
    assert!(
        compared >= 18 && skipped <= 2,
        "compared {compared}, skipped {skipped}"
    );
}

#[test]
fn beam_search_matches_transformers() {
    let (compared, skipped) = check_cases(&["beam"]);
    assert!(compared >= 50, "compared {compared}, skipped {skipped}");
}

#[test]
fn diverse_beam_search_matches_transformers() {
    let doc = fixture();
    let versions: Vec<&str> = doc["transformers_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        versions.iter().any(|v| v.starts_with("4.45")),
        "{versions:?}"
    );
    let (compared, skipped) = check_cases(&["diverse_beam"]);
    assert!(compared >= 60, "compared {compared}, skipped {skipped}");
}

/// Logits at the last position of `seq` from a full forward (no cache).
fn full_logits(m: &CausalLm, seq: &[u32]) -> Vec<f32> {
    let input = Input::causal(&[seq.to_vec()], 0, &Device::Cpu).unwrap();
    let lg = m.logits(&input).unwrap();
    lg.get(0)
        .unwrap()
        .get(seq.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn argmax(xs: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[b] {
            b = i;
        }
    }
    b as u32
}

fn test_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 17, 42, 99, 7],
        vec![1, 250],
        vec![1, 5, 6, 7, 8, 9, 10, 11],
    ]
}

/// Greedy with the KV cache = greedy recomputing the whole sequence at every step (batched, left padded).
#[test]
fn kv_cached_greedy_equals_full_recompute() {
    for name in ["llama", "gpt2", "gpt_neox", "llama_tied", "gpt_neox_seq"] {
        let m = model(name);
        let prompts = test_prompts();
        let opts = GenerateOptions {
            max_new_tokens: 14,
            ..GenerateOptions::default()
        };
        let got = generate(&m, &prompts, &opts).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            let mut seq = p.clone();
            let mut new = Vec::new();
            for _ in 0..14 {
                let lg = full_logits(&m, &seq);
                let mut sorted = lg.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if ((sorted[0] - sorted[1]) as f64) < NEAR_TIE {
                    break;
                }
                let t = argmax(&lg);
                seq.push(t);
                new.push(t);
            }
            assert_eq!(&g[0].ids[..new.len()], &new[..], "{name}");
        }
    }
}

/// The decoder's logits after prefill, steps, beam-style reorders (duplicated rows) and dropped rows equal a full
/// forward of each row's sequence, for both cache layouts.
#[test]
fn kv_cache_logits_equal_full_forward_through_reorders() {
    for name in ["llama", "gpt2", "gpt_neox"] {
        let m = model(name);
        let prompts = test_prompts();
        for host in [true, false] {
            let (layers, kvh, hd) = m.kv_shape();
            let t = prompts.iter().map(Vec::len).max().unwrap();
            let starts: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
            let cache = if host {
                KvCache::new_host(layers, kvh, hd, starts)
            } else {
                KvCache::new_tensor(layers, starts)
            };
            let (mut dec, mut logits) =
                Decoder::prefill_with(&m, &prompts, 3, Some(cache)).unwrap();
            let mut seqs = prompts.clone();
            let plan: Vec<Vec<usize>> = vec![
                vec![0, 0, 1, 2, 2, 2],
                vec![5, 1, 0, 0, 3, 2],
                vec![0, 1, 2, 3, 4, 5],
                vec![4, 1],
                vec![1, 1, 0],
            ];
            for (s, sel) in plan.iter().enumerate() {
                let check = |logits: &rrhf::sample::Logits, seqs: &[Vec<u32>]| {
                    for (r, seq) in seqs.iter().enumerate() {
                        let want = full_logits(&m, seq);
                        let got = logits.row(r);
                        let err = want
                            .iter()
                            .zip(got)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            err < 1e-4,
                            "{name} host={host} step {s} row {r}: max |Δlogit| {err}"
                        );
                    }
                };
                check(&logits, &seqs);
                dec.select(sel).unwrap();
                seqs = sel.iter().map(|&i| seqs[i].clone()).collect();
                let tokens: Vec<u32> = (0..seqs.len())
                    .map(|r| ((s * 37 + r * 11) % 300 + 4) as u32)
                    .collect();
                for (seq, &tk) in seqs.iter_mut().zip(&tokens) {
                    seq.push(tk);
                }
                logits = dec.step(&tokens).unwrap();
                if s + 1 == plan.len() {
                    check(&logits, &seqs);
                }
            }
        }
    }
}

/// Stop ids and `stop_check` end sequences (the stopping token kept); log-prob sums are the model's.
#[test]
fn stop_ids_and_stop_check_end_sequences() {
    let m = model("llama");
    let prompts = test_prompts();
    let base = generate(
        &m,
        &prompts,
        &GenerateOptions {
            max_new_tokens: 10,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let first = base[0][0].ids.clone();
    assert_eq!(first.len(), 10);
    // Stop id: the 4th token of prompt 0's greedy output.
    let stop = first[3];
    let got = generate(
        &m,
        &prompts,
        &GenerateOptions {
            max_new_tokens: 10,
            stop_ids: vec![stop],
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let cut = first.iter().position(|&t| t == stop).unwrap();
    assert_eq!(got[0][0].ids, first[..=cut].to_vec());
    assert!(got[0][0].finished);
    // stop_check: end once 3 tokens are out.
    let check: rrhf::sample::StopCheck = Arc::new(|ids: &[u32]| ids.len() >= 3);
    let got = generate(
        &m,
        &prompts,
        &GenerateOptions {
            max_new_tokens: 10,
            stop_check: Some(check.clone()),
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    for (g, b) in got.iter().zip(&base) {
        assert_eq!(g[0].ids, b[0].ids[..3].to_vec());
        assert!(g[0].finished);
    }
    // Beam search with a stop_check: every result stops by it.
    let got = generate(
        &m,
        &prompts,
        &GenerateOptions {
            strategy: Strategy::Beam {
                num_beams: 3,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            },
            num_return_sequences: 3,
            max_new_tokens: 10,
            stop_check: Some(check),
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    for g in got.iter().flatten() {
        assert_eq!(g.ids.len(), 3);
        assert!(g.finished);
    }
    // The greedy log-prob sum is the model's.
    let seq: Vec<u32> = prompts[1].iter().chain(&base[1][0].ids).copied().collect();
    let mut want = 0f64;
    for i in 0..base[1][0].ids.len() {
        let lg = full_logits(&m, &seq[..prompts[1].len() + i]);
        let mx = lg.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + lg.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        want += lg[seq[prompts[1].len() + i] as usize] as f64 - lse;
    }
    assert!(
        (base[1][0].logprob_sum - want).abs() < 1e-3,
        "{} vs {want}",
        base[1][0].logprob_sum
    );
}

/// transformers' filters, written out independently: tokens allowed after top-k then top-p at temperature t.
fn allowed(logits: &[f32], t: f64, top_k: Option<usize>, top_p: f64) -> Vec<bool> {
    let mut s: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    if let Some(k) = top_k {
        let mut sorted = s.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for x in &mut s {
            if *x < kth {
                *x = f64::NEG_INFINITY;
            }
        }
    }
    let mut keep: Vec<bool> = s.iter().map(|x| x.is_finite()).collect();
    if top_p < 1.0 {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b])); // ascending
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
        let mut cum = 0.0;
        for (rank, &i) in idx.iter().enumerate() {
            cum += (s[i] - mx).exp() / z;
            // Small slack: the boundary token may fall either way within float rounding.
            if cum <= 1.0 - top_p - 1e-9 && rank + 1 < idx.len() {
                keep[i] = false;
            }
        }
    }
    keep
}

#[test]
fn sampling_never_leaves_the_top_k_top_p_set() {
    let m = model("llama");
    let prompts = vec![vec![1, 17, 42, 99], vec![1, 8]];
    for (t, k, p) in [
        (0.7, Some(5), 1.0),
        (1.0, None, 0.8),
        (1.3, Some(20), 0.6),
        (0.5, None, 0.3),
    ] {
        let opts = GenerateOptions {
            strategy: Strategy::Sample {
                temperature: t,
                top_k: k,
                top_p: p,
            },
            num_return_sequences: 24,
            max_new_tokens: 6,
            seed: 5,
            ..GenerateOptions::default()
        };
        let got = generate(&m, &prompts, &opts).unwrap();
        let mut distinct = std::collections::HashSet::new();
        for (prompt, outs) in prompts.iter().zip(&got) {
            assert_eq!(outs.len(), 24);
            for g in outs {
                assert_eq!(g.ids.len(), 6);
                let mut seq = prompt.clone();
                for &tok in &g.ids {
                    let lg = full_logits(&m, &seq);
                    let ok = allowed(&lg, t, k, p);
                    assert!(
                        ok[tok as usize],
                        "T={t} k={k:?} p={p}: token {tok} outside the allowed set"
                    );
                    distinct.insert(tok);
                    seq.push(tok);
                }
            }
        }
        assert!(
            distinct.len() > 3,
            "sampling looks deterministic: {distinct:?}"
        );
    }
}

#[test]
fn one_sampling_step_matches_softmax_at_temperature() {
    let m = model("gpt2");
    let prompt = vec![1u32, 40, 41, 42];
    let lg = full_logits(&m, &prompt);
    for t in [0.8, 1.5] {
        let n = 20_000;
        let opts = GenerateOptions {
            strategy: Strategy::Sample {
                temperature: t,
                top_k: None,
                top_p: 1.0,
            },
            num_return_sequences: n,
            max_new_tokens: 1,
            seed: 11,
            ..GenerateOptions::default()
        };
        let got = generate(&m, std::slice::from_ref(&prompt), &opts).unwrap();
        let mut counts = vec![0usize; lg.len()];
        for g in &got[0] {
            counts[g.ids[0] as usize] += 1;
        }
        let mx = lg.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = lg.iter().map(|&x| ((x as f64 - mx) / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut max_diff = 0f64;
        let mut chi2 = 0f64;
        for (c, wi) in counts.iter().zip(&w) {
            let p = wi / z;
            max_diff = max_diff.max((*c as f64 / n as f64 - p).abs());
            chi2 += (*c as f64 - n as f64 * p).powi(2) / (n as f64 * p);
        }
        // χ² with V − 1 = 319 degrees of freedom: mean 319, sd ≈ 25; 450 is > 5 sd.
        assert!(
            max_diff < 0.01 && chi2 < 450.0,
            "T={t}: max |freq − p| {max_diff}, χ² {chi2}"
        );
    }
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let m = model("gpt_neox");
    let prompts = test_prompts();
    let opts = |seed| GenerateOptions {
        strategy: Strategy::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: 0.95,
        },
        num_return_sequences: 3,
        max_new_tokens: 8,
        seed,
        ..GenerateOptions::default()
    };
    let a = generate(&m, &prompts, &opts(1)).unwrap();
    let b = generate(&m, &prompts, &opts(1)).unwrap();
    let c = generate(&m, &prompts, &opts(2)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // A prompt's samples do not depend on the rest of the batch.
    let alone = generate(&m, &prompts[..1], &opts(1)).unwrap();
    let ids = |g: &[Generated]| g.iter().map(|x| x.ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&alone[0]), ids(&a[0]));
}

#[test]
fn invalid_options_are_refused() {
    let m = model("llama");
    let p = test_prompts();
    let err = |opts: GenerateOptions, prompts: &[Vec<u32>]| {
        generate(&m, prompts, &opts).unwrap_err().to_string()
    };
    let e = err(
        GenerateOptions {
            strategy: Strategy::Sample {
                temperature: 0.0,
                top_k: None,
                top_p: 1.0,
            },
            ..GenerateOptions::default()
        },
        &p,
    );
    assert!(e.contains("greedy"), "{e}");
    let e = err(
        GenerateOptions {
            strategy: Strategy::Beam {
                num_beams: 2,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            },
            num_return_sequences: 3,
            ..GenerateOptions::default()
        },
        &p,
    );
    assert!(e.contains("num_beams"), "{e}");
    let e = err(
        GenerateOptions {
            strategy: Strategy::DiverseBeam {
                num_beams: 4,
                num_beam_groups: 3,
                diversity_penalty: 1.0,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            },
            ..GenerateOptions::default()
        },
        &p,
    );
    assert!(e.contains("divisible"), "{e}");
    let e = err(GenerateOptions::default(), &[vec![]]);
    assert!(e.contains("empty"), "{e}");
    let e = err(GenerateOptions::default(), &[vec![100_000]]);
    assert!(e.contains("vocabulary"), "{e}");
    let g2 = model("gpt2");
    let e = generate(
        &g2,
        &[vec![1; 60]],
        &GenerateOptions {
            max_new_tokens: 10,
            ..GenerateOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("positions"), "{e}");
}

/// Half-precision weights take the composed path (with the f32 host cache): generation runs.
#[test]
fn generation_runs_in_bf16() {
    for name in ["llama", "gpt_neox"] {
        let m16 = load(name, DType::BF16).model;
        let opts = GenerateOptions {
            strategy: Strategy::Beam {
                num_beams: 2,
                length_penalty: 1.0,
                early_stopping: EarlyStopping::False,
            },
            num_return_sequences: 2,
            max_new_tokens: 6,
            ..GenerateOptions::default()
        };
        let got = generate(&m16, &test_prompts(), &opts).unwrap();
        for g in got.iter().flatten() {
            assert_eq!(g.ids.len(), 6, "{name}");
            assert!(g.logprob_sum.is_finite() && g.logprob_sum < 0.0, "{name}");
        }
    }
}

/// `--decode-dtype bf16`: decoding with bf16 copies of the matrices gives exactly what f32 decoding gives on a model
/// whose matrices were rounded to bf16 (same products, same order), for greedy and beam search; prompts short enough
/// that prefill takes the host step too.
#[test]
fn bf16_decode_equals_f32_decode_of_the_rounded_matrices() {
    let src = fixtures().join("models/llama");
    let tmp = crate::common::temp_dir();
    let dir = tmp.join("rounded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_owned();
        if name != "model.safetensors" {
            std::fs::copy(&f, dir.join(name)).unwrap();
        }
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut rounded = 0;
    for (name, t) in tensors.iter_mut() {
        // The matrices bf16 decoding reads; the embedding rows and the norms stay f32 there.
        if name.ends_with("proj.weight") || name == "lm_head.weight" {
            *t = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            rounded += 1;
        }
    }
    assert_eq!(
        rounded,
        2 * 7 + 1,
        "the fixture's 2 blocks × 7 matrices + the untied head"
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();

    let mut fast = load("llama", DType::F32).model;
    fast.enable_bf16_decode().unwrap();
    let reference = rrhf::model::load_model(&dir, &Device::Cpu, DType::F32)
        .unwrap()
        .model;
    let plain = model("llama");
    let prompts = test_prompts();
    let mut differs_from_f32 = false;
    for strategy in [
        Strategy::Greedy,
        Strategy::Beam {
            num_beams: 3,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
        },
    ] {
        let opts = GenerateOptions {
            strategy,
            num_return_sequences: 1,
            max_new_tokens: 12,
            ..GenerateOptions::default()
        };
        let got = generate(&fast, &prompts, &opts).unwrap();
        assert_eq!(got, generate(&reference, &prompts, &opts).unwrap());
        differs_from_f32 |= got != generate(&plain, &prompts, &opts).unwrap();
    }
    // The copies are really used: the f32 model's scores differ.
    assert!(differs_from_f32, "bf16 decoding changed nothing");
    // Only f32 LLaMA models on the CPU.
    assert!(model("gpt2").enable_bf16_decode().is_err());
    assert!(load("llama", DType::BF16)
        .model
        .enable_bf16_decode()
        .is_err());
}
