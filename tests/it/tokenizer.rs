//! Tokenizer ids equal Python `tokenizers`' ids for the same tokenizer.json.

use rrhf::model::tokenizer::{SideFiles, TextTokenizer};
use serde_json::json;

use crate::common::fixtures;

#[test]
fn ids_equal_python_tokenizers() {
    let side = SideFiles {
        config: json!({"eos_token_id": 2, "bos_token_id": 1}),
        ..SideFiles::default()
    };
    let tok = TextTokenizer::from_file(&fixtures().join("tokenizer.json"), &side).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).unwrap(),
    )
    .unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let special = c["add_special_tokens"].as_bool().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(text, special).unwrap(),
            want,
            "text {text:?}, add_special_tokens {special}"
        );
    }
}

#[test]
fn special_ids_come_from_the_tokenizer_config() {
    let m = crate::common::load("llama", candle_core::DType::F32);
    assert_eq!(m.tokenizer.bos_id, Some(1));
    assert_eq!(m.tokenizer.eos_id, 2);
    assert_eq!(m.tokenizer.pad_id, 3);
    assert_eq!(
        m.tokenizer.encode("Hi", true).unwrap()[0],
        1,
        "BOS is added by the post-processor"
    );
}
