//! The forward and its gradients against transformers (fixtures from tools/make_fixtures.py).

use candle_core::{DType, Tensor};
use rrhf::model::{CausalLm, Input};

use crate::common::{load, rel_err, Cases, MODELS};

/// Flat indices `b * T + t` of the real (unpadded) positions.
fn real_rows(real: &[Vec<u8>]) -> Vec<u32> {
    let t = real[0].len();
    let mut out = Vec::new();
    for (b, row) in real.iter().enumerate() {
        for (i, &r) in row.iter().enumerate() {
            if r == 1 {
                out.push((b * t + i) as u32);
            }
        }
    }
    out
}

/// The fixture loss: mean label NLL + 0.01 · mean squared logit over real positions.
fn fixture_loss(model: &CausalLm, input: &Input, labels: &[Vec<i64>], real: &[Vec<u8>]) -> Tensor {
    let lp = model.label_logprob_table(input, labels).unwrap();
    let n = labels.iter().flatten().filter(|&&l| l >= 0).count() as f64;
    let nll = (lp.sum_all().unwrap().neg().unwrap() / n).unwrap();
    let logits = model.logits(input).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    let rows = Tensor::new(real_rows(real).as_slice(), logits.device()).unwrap();
    let sq = logits
        .reshape((b * t, v))
        .unwrap()
        .index_select(&rows, 0)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    (nll + (sq * 0.01).unwrap()).unwrap()
}

#[test]
fn logits_and_label_logprobs_match_transformers() {
    for &name in MODELS {
        let m = load(name, DType::F32);
        let cases = Cases::load(name);
        for case in &cases.names {
            let input = cases.input(case);
            let real = cases.real(case);
            let got = m.model.logits(&input).unwrap().to_vec3::<f32>().unwrap();
            let want = cases.get(case, "logits").to_vec3::<f32>().unwrap();
            let mut max_diff = 0f32;
            for (b, row) in real.iter().enumerate() {
                for (t, &r) in row.iter().enumerate() {
                    if r == 0 {
                        continue;
                    }
                    for (g, w) in got[b][t].iter().zip(&want[b][t]) {
                        max_diff = max_diff.max((g - w).abs());
                    }
                }
            }
            assert!(
                max_diff <= 1e-4,
                "{name}/{case}: logits differ by {max_diff}"
            );

            let labels = cases.labels(case);
            let lp = m
                .model
                .label_logprob_table(&input, &labels)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let want = cases.get(case, "label_logprobs").to_vec2::<f32>().unwrap();
            for (b, row) in labels.iter().enumerate() {
                for (t, &l) in row.iter().enumerate() {
                    if l >= 0 {
                        let d = (lp[b][t] - want[b][t]).abs();
                        assert!(
                            d <= 1e-4,
                            "{name}/{case}: label log-prob at [{b},{t}] differs by {d}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gradients_match_transformers() {
    for &name in MODELS {
        let m = load(name, DType::F32);
        let cases = Cases::load(name);
        let (trainable, vars) = m.model.trainable().unwrap();
        for case in &cases.grad_cases {
            let input = cases.input(case);
            let loss = fixture_loss(&trainable, &input, &cases.labels(case), &cases.real(case));
            let want_loss = cases
                .get(case, "loss")
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let got_loss = loss.to_scalar::<f32>().unwrap();
            assert!(
                (got_loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
                "{name}/{case}: loss {got_loss} vs {want_loss}"
            );
            let grads = loss.backward().unwrap();
            let prefix = format!("{case}.grad.");
            let mut checked = 0;
            for (key, want) in cases.tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
                let pname = &key[prefix.len()..];
                let (_, var) = vars.iter().find(|(n, _)| n == pname).unwrap_or_else(|| {
                    panic!("{name}: transformers has parameter {pname}, rrhf does not")
                });
                let got = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
                let e = rel_err(got, want);
                assert!(
                    e <= 1e-3,
                    "{name}/{case}: gradient of {pname} has relative error {e:.2e}"
                );
                checked += 1;
            }
            assert!(
                checked >= 3,
                "{name}/{case}: only {checked} reference gradients"
            );
        }
    }
}
