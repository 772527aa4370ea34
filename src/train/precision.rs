//! Mixed-precision training: the forward and backward run in bf16 or f16, while the optimizer keeps **f32 master
//! weights** (and its f32 moments) and applies every update in f32; the low-precision weights the model computes
//! with are cast from the masters after each update.
//!
//! Why: at lr 2e-5 almost every AdamW update of a weight of magnitude ~0.02 is below half a bf16 ulp of it
//! (2^-9 relative), so updating bf16 weights in place rounds the update away and the model does not learn. The
//! masters accumulate those small updates; the cast only decides what the next forward sees.
//!
//! f16 has 5 exponent bits: small gradients underflow to zero. [`LossScaler`] multiplies the loss by a scale
//! (2^16 at first) before the backward pass and divides the gradients by it in f32 afterwards; when the scaled
//! gradients overflow (a non-finite gradient norm) the step is skipped and the scale halved, and after
//! `growth_interval` good steps in a row it is doubled (torch.cuda.amp.GradScaler's policy).
//!
//! With `--dtype f32` there is one set of weights: the masters are the model's own variables and nothing is copied.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::model::error::{ModelError, Result};
use crate::model::{CausalLm, Weights};

/// Dynamic loss scaling for f16 (torch's GradScaler defaults: init 2^16, ×2 growth, ×½ back-off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    /// The factor the loss is multiplied by before backward.
    pub scale: f64,
    /// Good (finite) steps since the last change of the scale.
    pub good_steps: u64,
    /// Good steps in a row after which the scale doubles.
    pub growth_interval: u64,
}

/// What the scaler decided about one step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleOutcome {
    /// Finite gradients: take the step.
    Step,
    /// The scaled gradients overflowed: skip the step; the scale was halved.
    Overflow,
    /// Non-finite gradients although the scale is already at its floor (1): not an overflow of the scaling, so
    /// the trainer treats it as any other non-finite gradient (`--skip-nonfinite`).
    NonFinite,
}

impl LossScaler {
    /// The smallest scale: below 1 the "scaling" would shrink gradients, and an overflow at 1 is a real one.
    pub const MIN_SCALE: f64 = 1.0;

    pub fn new(init: f64, growth_interval: u64) -> Result<Self> {
        if !(init.is_finite() && init >= Self::MIN_SCALE) || growth_interval == 0 {
            return Err(ModelError::Input(format!(
                "loss scaling: the initial scale must be a finite number >= 1 (got {init}) and the growth \
                 interval at least 1 (got {growth_interval})"
            )));
        }
        Ok(Self {
            scale: init,
            good_steps: 0,
            growth_interval,
        })
    }

    /// Updates the scale after a step whose unscaled gradient norm is `grad_norm`.
    pub fn update(&mut self, grad_norm: f64) -> ScaleOutcome {
        if grad_norm.is_finite() {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                // f16's largest finite value is 65504; a scale past 2^24 only ever overflows.
                self.scale = (self.scale * 2.0).min(16_777_216.0);
                self.good_steps = 0;
            }
            ScaleOutcome::Step
        } else if self.scale > Self::MIN_SCALE {
            self.scale = (self.scale / 2.0).max(Self::MIN_SCALE);
            self.good_steps = 0;
            ScaleOutcome::Overflow
        } else {
            self.good_steps = 0;
            ScaleOutcome::NonFinite
        }
    }
}

/// The compute model's variables and the f32 masters the optimizer updates.
pub struct Precision {
    compute: DType,
    /// The model's variables (compute dtype), sorted by name.
    compute_vars: Vec<(String, Var)>,
    /// f32 masters in the same order; the same `Var`s as `compute_vars` when computing in f32.
    masters: Vec<(String, Var)>,
    /// Loss scaling (f16 only).
    pub scaler: Option<LossScaler>,
}

impl Precision {
    /// Builds the model to train in `compute` dtype from `model` (whose weights become the masters, in f32), and
    /// returns it with the precision state. `scaler` is used only when `compute` is f16.
    pub fn new(
        model: &CausalLm,
        compute: DType,
        scaler: Option<LossScaler>,
    ) -> Result<(CausalLm, Self)> {
        if !matches!(compute, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::Input(format!(
                "training dtype {compute:?}: use f32, bf16 or f16"
            )));
        }
        let (master_weights, masters) = model.weights().to_dtype(DType::F32)?.to_vars()?;
        if compute == DType::F32 {
            let train = CausalLm::new(model.config().clone(), master_weights)?;
            return Ok((
                train,
                Self {
                    compute,
                    compute_vars: masters.clone(),
                    masters,
                    scaler: None,
                },
            ));
        }
        // The compute copy is cast from the masters, so the first forward already sees exactly what every later
        // one will: round(master).
        let (weights, compute_vars) = master_weights.to_dtype(compute)?.to_vars()?;
        let train = CausalLm::new(model.config().clone(), weights)?;
        debug_assert!(compute_vars
            .iter()
            .zip(&masters)
            .all(|((a, _), (b, _))| a == b));
        Ok((
            train,
            Self {
                compute,
                compute_vars,
                masters,
                scaler: if compute == DType::F16 { scaler } else { None },
            },
        ))
    }

    /// Whether the forward runs in a dtype other than the masters'.
    pub fn is_mixed(&self) -> bool {
        self.compute != DType::F32
    }

    /// The model's variables, whose gradients the backward pass produces.
    pub fn compute_vars(&self) -> Vec<Var> {
        self.compute_vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// The f32 masters by name (what the optimizer updates).
    pub fn masters(&self) -> &[(String, Var)] {
        &self.masters
    }

    /// The factor to multiply the loss by before backward (1 without loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Gradients of the compute variables → f32 gradients of the masters, divided by the loss scale (a power of
    /// two, so the division is exact).
    pub fn master_grads(&self, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let inv = 1.0 / self.loss_scale();
        grads
            .into_iter()
            .map(|g| {
                let g = g.to_dtype(DType::F32)?;
                Ok(if inv == 1.0 { g } else { g.affine(inv, 0.0)? })
            })
            .collect()
    }

    /// Casts the masters into the compute variables after an optimizer step (nothing to do in f32).
    pub fn sync(&self) -> Result<()> {
        if !self.is_mixed() {
            return Ok(());
        }
        for ((name, c), (_, m)) in self.compute_vars.iter().zip(&self.masters) {
            c.set(&m.as_tensor().to_dtype(self.compute)?).map_err(|e| {
                ModelError::Candle(e.context(format!("casting master weight `{name}`")))
            })?;
        }
        Ok(())
    }

    /// The weights to save in a checkpoint: `weights` (the compute model's) with every variable replaced by its
    /// f32 master, so that a resumed run starts from the exact masters.
    pub fn master_weights(&self, weights: &Weights) -> Weights {
        if !self.is_mixed() {
            return weights.clone();
        }
        let mut tensors: HashMap<String, Tensor> = weights.tensors().clone();
        for (name, m) in &self.masters {
            tensors.insert(name.clone(), m.as_tensor().clone());
        }
        Weights::new(tensors, weights.source())
    }
}

/// The floating-point dtype a Hugging Face model directory stores its weights in (read from the header of
/// `model.safetensors`, or of the first shard), or `None` when it cannot tell (a GGUF file, no float tensor).
pub fn stored_dtype(model: &Path) -> Option<DType> {
    let file = if model.join("model.safetensors").is_file() {
        model.join("model.safetensors")
    } else {
        let index = std::fs::read_to_string(model.join("model.safetensors.index.json")).ok()?;
        let index: serde_json::Value = serde_json::from_str(&index).ok()?;
        let first = index
            .get("weight_map")?
            .as_object()?
            .values()
            .next()?
            .as_str()?;
        model.join(first)
    };
    let mut f = std::fs::File::open(file).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // A header is JSON of a few bytes per tensor; refuse to read something absurd.
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    header.as_object()?.iter().find_map(|(k, v)| {
        if k == "__metadata__" {
            return None;
        }
        match v.get("dtype")?.as_str()? {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F64" => Some(DType::F64),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_halves_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler::new(65536.0, 3).unwrap();
        assert_eq!(s.update(f64::INFINITY), ScaleOutcome::Overflow);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.update(1.0), ScaleOutcome::Step);
        assert_eq!(s.update(f64::NAN), ScaleOutcome::Overflow);
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..3 {
            assert_eq!(s.update(0.5), ScaleOutcome::Step);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        // At the floor an overflow is a real non-finite gradient.
        let mut s = LossScaler::new(2.0, 10).unwrap();
        assert_eq!(s.update(f64::NAN), ScaleOutcome::Overflow);
        assert_eq!(s.scale, 1.0);
        assert_eq!(s.update(f64::NAN), ScaleOutcome::NonFinite);
        assert_eq!(s.scale, 1.0);
        assert!(LossScaler::new(0.5, 1).is_err());
        assert!(LossScaler::new(8.0, 0).is_err());
    }

    #[test]
    fn stored_dtype_reads_the_safetensors_header() {
        let dir = std::env::temp_dir().join(format!("rrhf-stored-dtype-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(stored_dtype(&dir), None, "no weights: unknown");
        let dev = candle_core::Device::Cpu;
        let t = Tensor::zeros((2, 3), DType::BF16, &dev).unwrap();
        let ids = Tensor::zeros(4, DType::U32, &dev).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("a.ids".to_string(), ids), ("b.weight".to_string(), t)]),
            dir.join("model.safetensors"),
        )
        .unwrap();
        assert_eq!(stored_dtype(&dir), Some(DType::BF16));
        std::fs::remove_dir_all(&dir).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        assert_eq!(stored_dtype(&fixture), Some(DType::F32));
    }
}
