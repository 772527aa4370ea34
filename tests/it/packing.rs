//! A prefix-shared packed row (query once, then k responses) gives the padded rows' log-probs and gradients.

use candle_core::{DType, Device, Tensor};
use rrhf::model::{CausalLm, Input, Labels};

use crate::common::{load, rel_err, MODELS};

const QUERY: &[u32] = &[1, 40, 41, 42, 43];
const RESPONSES: &[&[u32]] = &[&[50, 51, 52], &[60, 61, 62, 63], &[70, 2]];

/// Padded rows `[query, response_i]`; per response the sum of its token log-probs.
fn padded(model: &CausalLm) -> (Tensor, Vec<(usize, usize)>) {
    let rows: Vec<Vec<u32>> = RESPONSES.iter().map(|r| [QUERY, r].concat()).collect();
    let input = Input::causal(&rows, 3, &Device::Cpu).unwrap();
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut labels = Labels::default();
    let mut spans = Vec::new();
    for (b, r) in RESPONSES.iter().enumerate() {
        spans.push((labels.len(), r.len()));
        for (j, &tok) in r.iter().enumerate() {
            labels
                .flat_positions
                .push((b * t + QUERY.len() - 1 + j) as u32);
            labels.ids.push(tok);
        }
    }
    (model.label_logprobs(&input, &labels).unwrap(), spans)
}

/// One row `[query, r_1, …, r_k]`: positions restart after the query, each response sees the query and itself;
/// the first token of every response is predicted from the last query position.
fn packed(model: &CausalLm) -> Tensor {
    let q = QUERY.len();
    let mut ids = QUERY.to_vec();
    let mut pos: Vec<u32> = (0..q as u32).collect();
    let mut seg_start = Vec::new();
    for r in RESPONSES {
        seg_start.push(ids.len());
        ids.extend_from_slice(r);
        pos.extend((0..r.len()).map(|j| (q + j) as u32));
    }
    let t = ids.len();
    let mut mask = vec![0u8; t * t];
    for i in 0..t {
        let seg = seg_start.iter().rposition(|&s| s <= i);
        for k in 0..=i {
            let visible = k < q || seg.is_some_and(|s| k >= seg_start[s]);
            mask[i * t + k] = visible as u8;
        }
    }
    let input = Input::from_host(&[ids], &[pos], &mask, &Device::Cpu).unwrap();
    let mut labels = Labels::default();
    for (s, r) in seg_start.iter().zip(RESPONSES) {
        for (j, &tok) in r.iter().enumerate() {
            let from = if j == 0 { q - 1 } else { s + j - 1 };
            labels.flat_positions.push(from as u32);
            labels.ids.push(tok);
        }
    }
    model.label_logprobs(&input, &labels).unwrap()
}

#[test]
fn packed_row_equals_padded_rows() {
    for &name in MODELS {
        let m = load(name, DType::F32);
        let (trainable, vars) = m.model.trainable().unwrap();
        let (pad, spans) = padded(&trainable);
        let pack = packed(&trainable);
        let a = pad.to_vec1::<f32>().unwrap();
        let b = pack.to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5,
                "{name}: token {i}: padded {x} vs packed {y}"
            );
        }
        // Same gradients of a loss over per-response sums.
        let weights: Vec<f64> = vec![1.0, -0.5, 2.0];
        let loss = |lp: &Tensor| -> Tensor {
            let mut acc = Tensor::new(0f32, lp.device()).unwrap();
            for ((start, len), w) in spans.iter().zip(&weights) {
                let s = (lp.narrow(0, *start, *len).unwrap().sum_all().unwrap() * *w).unwrap();
                acc = (acc + s).unwrap();
            }
            acc
        };
        let ga = loss(&pad).backward().unwrap();
        let gb = loss(&pack).backward().unwrap();
        for (pname, v) in &vars {
            let e = rel_err(
                gb.get(v.as_tensor()).unwrap(),
                ga.get(v.as_tensor()).unwrap(),
            );
            assert!(
                e <= 1e-4,
                "{name}: gradient of {pname} differs by {e:.2e} between packed and padded"
            );
        }
    }
}
