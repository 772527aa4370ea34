//! The RRHF loss on a tiny LLaMA against an independent PyTorch implementation (tests/fixtures/loss, written by
//! tools/make_loss_fixtures.py): tokenisation, p_i, both loss terms, dL/dp and parameter gradients, in both the
//! packed and the padded layout, and with packed rows split over several rows per query.

use candle_core::{DType, Device, Var};
use rrhf::data::batch::{build_batch_limited, Layout, MAX_PACKED_ROW};
use rrhf::data::tokenize::{tokenize_record, TokenizeOptions};
use rrhf::data::Record;
use rrhf::train::loss::{rrhf_loss, LossConfig};
use serde_json::Value;

use crate::common::{fixtures, load, rel_err};

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
        "{what}: {a} vs reference {b}"
    );
}

#[test]
fn loss_matches_pytorch_reference() {
    let m = load("llama", DType::F32);
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("loss/cases.json")).unwrap())
            .unwrap();
    let grads_case = fx["grads_case"].as_str().unwrap();
    let ref_grads = candle_core::safetensors::load(
        fixtures().join(format!("loss/grads_{grads_case}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let p = &case["params"];
        let e = &case["expected"];
        let opts = TokenizeOptions::new(
            p["max_len"].as_u64().unwrap() as usize,
            Some(p["max_query_len"].as_u64().unwrap() as usize),
        )
        .unwrap();
        let cfg = LossConfig {
            rank_weight: p["rank_weight"].as_f64().unwrap(),
            length_penalty: p["length_penalty"].as_f64().unwrap(),
            margin: p["margin"].as_f64().unwrap(),
            sft_reduction: p["sft_reduction"].as_str().unwrap().parse().unwrap(),
        };
        let records: Vec<Record> = serde_json::from_value(case["records"].clone()).unwrap();
        let toks: Vec<_> = records
            .iter()
            .map(|r| tokenize_record(&m.tokenizer, r, &opts).unwrap())
            .collect();
        let truncated = toks.iter().filter(|t| t.query_truncated).count();
        assert_eq!(
            truncated as u64,
            e["truncated_queries"].as_u64().unwrap(),
            "{name}: truncated queries"
        );
        for (i, t) in toks.iter().enumerate() {
            let want_q: Vec<u32> = serde_json::from_value(e["query_ids"][i].clone()).unwrap();
            let want_r: Vec<Vec<u32>> =
                serde_json::from_value(e["response_ids"][i].clone()).unwrap();
            assert_eq!(t.query, want_q, "{name}: query ids of record {i}");
            assert_eq!(t.responses, want_r, "{name}: response ids of record {i}");
        }
        let refs: Vec<_> = toks.iter().collect();
        let scores: Vec<Vec<f64>> = toks.iter().map(|t| t.scores.clone()).collect();
        // Packed rows also split over several rows per query: one response per row, and rows that hold the
        // first two responses of the longest such pair (later ones spill over).
        let two = toks
            .iter()
            .map(|t| t.query.len() + t.responses.iter().take(2).map(Vec::len).sum::<usize>())
            .max()
            .unwrap();
        let layouts = [
            (Layout::Packed, MAX_PACKED_ROW),
            (Layout::Padded, MAX_PACKED_ROW),
            (Layout::Packed, 1),
            (Layout::Packed, two),
        ];
        for (layout, max_row) in layouts {
            let batch =
                build_batch_limited(&refs, layout, m.tokenizer.pad_id, max_row, &Device::Cpu)
                    .unwrap();
            if layout == Layout::Packed && max_row == 1 {
                assert_eq!(
                    batch.input.dims().0,
                    batch.n_responses(),
                    "{name}: one row each"
                );
            }
            let (trainable, vars) = m.model.trainable().unwrap();
            let lp = trainable
                .label_logprobs(&batch.input, &batch.labels)
                .unwrap();
            let out = rrhf_loss(
                &lp,
                &batch.response_of_label,
                &batch.n_tokens,
                &scores,
                &cfg,
            )
            .unwrap();
            let what = format!("{name}/{layout}, rows of at most {max_row} tokens");
            close(
                out.loss.to_scalar::<f32>().unwrap() as f64,
                e["loss"].as_f64().unwrap(),
                &format!("{what}: loss"),
            );
            for (q, st) in out.queries.iter().enumerate() {
                for (i, (&a, b)) in st.p.iter().zip(f64s(&e["p"][q])).enumerate() {
                    close(a, b, &format!("{what}: p[{q}][{i}]"));
                }
                for (i, (&a, b)) in st.logp.iter().zip(f64s(&e["logp"][q])).enumerate() {
                    close(a, b, &format!("{what}: logp[{q}][{i}]"));
                }
                close(
                    st.rank_loss,
                    e["rank_loss"][q].as_f64().unwrap(),
                    &format!("{what}: rank_loss[{q}]"),
                );
                close(
                    st.sft_loss,
                    e["sft_loss"][q].as_f64().unwrap(),
                    &format!("{what}: sft_loss[{q}]"),
                );
                close(
                    st.p_best,
                    e["p_best"][q].as_f64().unwrap(),
                    &format!("{what}: p_best[{q}]"),
                );
                close(
                    st.p_worst,
                    e["p_worst"][q].as_f64().unwrap(),
                    &format!("{what}: p_worst[{q}]"),
                );
                assert_eq!(
                    st.rank_acc,
                    e["rank_acc"][q].as_f64(),
                    "{what}: rank_acc[{q}]"
                );
            }
            // dL/dp through the token log-probs: dL/dlp_t = dL/dp_i / |y_i|^length_penalty.
            let leaf = Var::from_tensor(&lp.detach()).unwrap();
            let out2 = rrhf_loss(
                leaf.as_tensor(),
                &batch.response_of_label,
                &batch.n_tokens,
                &scores,
                &cfg,
            )
            .unwrap();
            let g = out2
                .loss
                .backward()
                .unwrap()
                .get(leaf.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut flat_n = Vec::new();
            let mut flat_want = Vec::new();
            for (q, ns) in batch.n_tokens.iter().enumerate() {
                let d = f64s(&e["dloss_dp"][q]);
                for (i, &n) in ns.iter().enumerate() {
                    flat_n.push(n);
                    flat_want.push(d[i]);
                }
            }
            for (t, &r) in batch.response_of_label.iter().enumerate() {
                let r = r as usize;
                let want = flat_want[r] / (flat_n[r] as f64).powf(cfg.length_penalty);
                close(
                    g[t] as f64,
                    want,
                    &format!("{what}: dL/dlogprob of token {t}"),
                );
            }
            if name == grads_case {
                let grads = out.loss.backward().unwrap();
                for (pname, var) in &vars {
                    if let Some(want) = ref_grads.get(pname) {
                        let err = rel_err(grads.get(var.as_tensor()).unwrap(), want);
                        assert!(
                            err <= 1e-3,
                            "{what}: gradient of {pname}: relative error {err:.2e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn no_response_eos_leaves_responses_as_generated() {
    let m = load("llama", DType::F32);
    let rec = Record {
        query: "Hello".into(),
        responses: vec![" world".into(), " there, friend".into(), "".into()],
        scores: Some(vec![1.0, 0.0, 0.5]),
        sources: None,
        finish_reasons: None,
    };
    let mut opts = TokenizeOptions::new(64, None).unwrap();
    let with = tokenize_record(&m.tokenizer, &rec, &opts).unwrap();
    opts.response_eos = false;
    let without = tokenize_record(&m.tokenizer, &rec, &opts).unwrap();
    assert_eq!(with.query, without.query);
    // The empty response keeps its EOS: the model stopping at once, and a token for p_i.
    assert_eq!(without.responses[2], vec![m.tokenizer.eos_id]);
    for (w, o) in with.responses.iter().zip(&without.responses).take(2) {
        assert_eq!(w.last(), Some(&m.tokenizer.eos_id));
        assert_eq!(&w[..w.len() - 1], &o[..]);
        assert_ne!(o.last(), Some(&m.tokenizer.eos_id));
    }
}
