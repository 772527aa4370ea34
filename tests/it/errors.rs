//! Bad model directories give one clear error naming the file and the tensor, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rrhf::model::load_model;
use rrhf::model::save::safetensors_bytes;
use rrhf::model::weights::read_safetensors;

use crate::common::fixtures;

/// A scratch copy of the llama fixture directory.
fn scratch_copy(tag: &str) -> PathBuf {
    let src = fixtures().join("models/llama");
    let dst = std::env::temp_dir().join(format!("rrhf-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = read_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    edit(&mut t);
    std::fs::write(&path, safetensors_bytes(&t, None).unwrap()).unwrap();
}

#[test]
fn missing_config_names_the_file() {
    let dir = scratch_copy("noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = scratch_copy("arch");
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(&p, text).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("FalconForCausalLM") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = scratch_copy("missing");
    rewrite_weights(&dir, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let dir = scratch_copy("shape");
    rewrite_weights(&dir, |t| {
        t.insert(
            "model.layers.0.self_attn.q_proj.weight".into(),
            Tensor::zeros((7, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("[7, 3]"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_header_names_the_file() {
    let dir = scratch_copy("corrupt");
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&p, &bytes).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );

    std::fs::write(&p, b"\x05").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tokenizer_names_the_file() {
    let dir = scratch_copy("notok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
}
