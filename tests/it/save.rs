//! Saved models carry transformers' tensor names and reload to the same outputs.

use std::collections::BTreeSet;

use candle_core::{DType, Device};
use rrhf::model::load_model;
use rrhf::model::save::save_pretrained;
use rrhf::model::weights::read_safetensors;

use crate::common::{fixtures, load, Cases, MODELS};

#[test]
fn save_round_trips_with_transformers_names() {
    for &name in MODELS {
        let m = load(name, DType::F32);
        let out = std::env::temp_dir().join(format!("rrhf-it-save-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        save_pretrained(&out, m.model.weights(), &m.tokenizer, &m.side, None).unwrap();
        // The names transformers itself wrote for this model are exactly the names we write.
        let theirs: BTreeSet<String> = read_safetensors(
            &fixtures()
                .join("models")
                .join(name)
                .join("model.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .into_keys()
        .collect();
        let ours: BTreeSet<String> =
            read_safetensors(&out.join("model.safetensors"), DType::F32, &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        assert_eq!(
            ours, theirs,
            "{name}: saved tensor names differ from transformers'"
        );
        let raw = std::fs::read(out.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        for f in [
            "config.json",
            "tokenizer.json",
            "generation_config.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).exists(), "{name}: {f} not written");
        }
        let back = load_model(&out, &Device::Cpu, DType::F32).unwrap();
        let input = Cases::load(name).input("plain");
        let a = m.model.logits(&input).unwrap();
        let b = back.model.logits(&input).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}: reloaded model differs");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
