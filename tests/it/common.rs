//! Fixture access shared by the integration tests.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rrhf::model::{load_model, Input, LoadedModel};

/// `tests/fixtures` in the source tree.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny reference models written by tools/make_fixtures.py.
pub const MODELS: &[&str] = &["llama", "llama_tied", "gpt2", "gpt_neox", "gpt_neox_seq"];

/// Loads a fixture model in `dtype` on the CPU.
pub fn load(name: &str, dtype: DType) -> LoadedModel {
    load_model(&fixtures().join("models").join(name), &Device::Cpu, dtype)
        .unwrap_or_else(|e| panic!("loading fixture model {name}: {e}"))
}

/// The reference tensors of one fixture model, by `case.field` name.
pub struct Cases {
    pub tensors: HashMap<String, Tensor>,
    pub names: Vec<String>,
    pub grad_cases: Vec<String>,
}

impl Cases {
    pub fn load(model: &str) -> Self {
        let dir = fixtures().join("models").join(model);
        let tensors = candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu)
            .expect("reading cases.safetensors");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"),
        )
        .expect("cases.json is JSON");
        let list = |k: &str| -> Vec<String> {
            meta[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            tensors,
            names: list("cases"),
            grad_cases: list("grad_cases"),
        }
    }

    pub fn get(&self, case: &str, field: &str) -> &Tensor {
        let key = format!("{case}.{field}");
        self.tensors
            .get(&key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
    }

    pub fn input(&self, case: &str) -> Input {
        Input::new(
            self.get(case, "input_ids").clone(),
            self.get(case, "position_ids").clone(),
            self.get(case, "mask").clone(),
        )
        .expect("fixture input")
    }

    pub fn labels(&self, case: &str) -> Vec<Vec<i64>> {
        self.get(case, "labels")
            .to_vec2::<i64>()
            .expect("labels i64")
    }

    pub fn real(&self, case: &str) -> Vec<Vec<u8>> {
        self.get(case, "real").to_vec2::<u8>().expect("real u8")
    }
}

/// ‖a − b‖ / ‖b‖ over all entries.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "shapes differ");
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// A fresh, empty directory for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new temporary directory, unique within this test process.
pub fn temp_dir() -> TempDir {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rrhf-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
