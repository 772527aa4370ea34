//! Learning-rate schedules with linear warm-up, exactly as transformers' `get_*_schedule_with_warmup`
//! (`LambdaLR` factors in f64) and the HF Trainer's warm-up step count.

use std::fmt;
use std::str::FromStr;

use crate::model::error::ModelError;

/// The decay after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// `get_linear_schedule_with_warmup`: linear decay to 0 at `total_steps` (the paper's schedule).
    Linear,
    /// `get_cosine_schedule_with_warmup` (half a cosine, `num_cycles = 0.5`; the original scripts' schedule).
    Cosine,
    /// `get_constant_schedule_with_warmup`.
    Constant,
}

impl ScheduleKind {
    /// The canonical name (`linear`, `cosine`, `constant`).
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = ModelError;

    /// `linear`, `cosine`, `constant` (also HF's `constant_with_warmup`), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            other => Err(ModelError::Input(format!(
                "unknown learning-rate schedule {other:?} (expected linear, cosine or constant)"
            ))),
        }
    }
}

/// Learning rate at optimizer step `step` (0-based: the lr used for the (step+1)-th update), exactly as
/// transformers' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` /
/// `get_constant_schedule_with_warmup` compute it (`base_lr · factor(step)`).
///
/// As in transformers, the first warm-up step uses lr 0, and the cosine factor is not clamped past
/// `total_steps` (it rises again there); the linear one stays at 0.
pub fn lr_at(
    kind: ScheduleKind,
    base_lr: f64,
    step: u64,
    warmup_steps: u64,
    total_steps: u64,
) -> f64 {
    base_lr * factor(kind, step, warmup_steps, total_steps)
}

/// The `LambdaLR` multiplier of [`lr_at`].
fn factor(kind: ScheduleKind, step: u64, warmup: u64, total: u64) -> f64 {
    // Python ints: differences may be negative.
    let (step_i, warmup_i, total_i) = (step as i128, warmup as i128, total as i128);
    if step < warmup {
        return match kind {
            // float(current_step) / float(max(1.0, num_warmup_steps))
            ScheduleKind::Constant => step as f64 / f64::max(1.0, warmup as f64),
            // float(current_step) / float(max(1, num_warmup_steps))
            _ => step as f64 / warmup.max(1) as f64,
        };
    }
    let decay_len = (total_i - warmup_i).max(1) as f64;
    match kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => f64::max(0.0, (total_i - step_i) as f64 / decay_len),
        ScheduleKind::Cosine => {
            let num_cycles = 0.5f64;
            let progress = (step_i - warmup_i) as f64 / decay_len;
            f64::max(
                0.0,
                0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()),
            )
        }
    }
}

/// `ceil(ratio · total)`, as the HF Trainer computes the warm-up steps from `warmup_ratio`
/// (`math.ceil(num_training_steps * warmup_ratio)`); a negative or NaN ratio gives 0.
pub fn warmup_steps(ratio: f64, total_steps: u64) -> u64 {
    let w = (total_steps as f64 * ratio).ceil();
    if w.is_nan() || w <= 0.0 {
        0
    } else {
        w as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim/adamw.json"
        );
        let text = std::fs::read_to_string(path).expect("tests/fixtures/optim/adamw.json");
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn schedules_match_transformers() {
        let fx = fixture();
        let s = &fx["schedule"];
        let base = s["base_lr"].as_f64().unwrap();
        let warmup = s["warmup"].as_u64().unwrap();
        let total = s["total"].as_u64().unwrap();
        for kind in [
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Constant,
        ] {
            let expected = s[kind.name()].as_array().unwrap();
            assert!(expected.len() > total as usize);
            for (step, e) in expected.iter().enumerate() {
                let e = e.as_f64().unwrap();
                let got = lr_at(kind, base, step as u64, warmup, total);
                assert!(
                    (got - e).abs() <= 1e-15 * base,
                    "{kind} step {step}: got {got}, transformers {e}"
                );
            }
        }
        // the first warm-up step has lr 0, the peak is reached at step = warmup
        assert_eq!(lr_at(ScheduleKind::Linear, base, 0, warmup, total), 0.0);
        assert_eq!(
            lr_at(ScheduleKind::Cosine, base, warmup, warmup, total),
            base
        );
    }

    #[test]
    fn schedule_edge_cases() {
        // no warm-up: full lr at step 0
        assert_eq!(lr_at(ScheduleKind::Linear, 1.0, 0, 0, 4), 1.0);
        assert_eq!(lr_at(ScheduleKind::Linear, 1.0, 4, 0, 4), 0.0);
        assert_eq!(lr_at(ScheduleKind::Linear, 1.0, 9, 0, 4), 0.0);
        assert_eq!(lr_at(ScheduleKind::Constant, 1.0, 0, 0, 4), 1.0);
        // warm-up longer than training (HF: max(1, total - warmup) in the denominator)
        assert_eq!(lr_at(ScheduleKind::Linear, 1.0, 5, 5, 3), 0.0);
        assert!((lr_at(ScheduleKind::Cosine, 1.0, 2, 5, 3) - 0.4).abs() < 1e-15);
        assert_eq!(lr_at(ScheduleKind::Cosine, 1.0, 0, 0, 0), 1.0);
    }

    #[test]
    fn warmup_steps_match_trainer() {
        let fx = fixture();
        for case in fx["warmup_steps"].as_array().unwrap() {
            let ratio = case["ratio"].as_f64().unwrap();
            let total = case["total"].as_u64().unwrap();
            let steps = case["steps"].as_u64().unwrap();
            assert_eq!(
                warmup_steps(ratio, total),
                steps,
                "ratio {ratio} total {total}"
            );
        }
        assert_eq!(warmup_steps(-0.1, 100), 0);
        assert_eq!(warmup_steps(f64::NAN, 100), 0);
    }

    #[test]
    fn schedule_kind_parse_display() {
        for kind in [
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Constant,
        ] {
            assert_eq!(kind.to_string().parse::<ScheduleKind>().unwrap(), kind);
        }
        assert_eq!(
            "Constant_With_Warmup".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Constant
        );
        let err = "cosine_with_restarts".parse::<ScheduleKind>().unwrap_err();
        assert!(err.to_string().contains("cosine_with_restarts"), "{err}");
    }
}
