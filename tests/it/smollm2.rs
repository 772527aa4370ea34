//! The real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (tests/fixtures/smollm2_reference.json).
//! Runs only when `RRHF_SMOLLM2_GGUF` points at the file (tools/demo.sh downloads it).

use candle_core::{DType, Device};
use rrhf::model::{load_model, Input, Labels};

use crate::common::fixtures;

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_logprobs_match_transformers() {
    let Ok(path) = std::env::var("RRHF_SMOLLM2_GGUF") else {
        eprintln!("skipped: set RRHF_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf to run");
        return;
    };
    let m = load_model(std::path::Path::new(&path), &Device::Cpu, DType::F32).unwrap();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let text = r["text"].as_str().unwrap();
    // The file says add_bos_token = false; transformers 4.57 adds BOS anyway, so both id lists are checked.
    assert_eq!(
        m.tokenizer.encode(text, true).unwrap(),
        ids_of(&r["ids_no_special"])
    );
    for (ids_key, lp_key) in [
        ("ids", "logprobs"),
        ("ids_no_special", "logprobs_no_special"),
    ] {
        let ids = ids_of(&r[ids_key]);
        let input =
            Input::causal(std::slice::from_ref(&ids), m.tokenizer.pad_id, &Device::Cpu).unwrap();
        let labels = Labels {
            flat_positions: (0..ids.len() as u32 - 1).collect(),
            ids: ids[1..].to_vec(),
        };
        let got = m
            .model
            .label_logprobs(&input, &labels)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f64> = r[lp_key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-3,
                "{ids_key}: token {t}: {g} vs transformers {w}"
            );
        }
    }
}
