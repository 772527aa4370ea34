//! Mixed-precision training (`rrhf train --dtype bf16|f16`): f32 masters, f32 AdamW, f16 loss scaling, exact
//! resume. On the tiny fixture LLaMA at the paper's lr (2e-5), 30 steps.
//!
//! The bound on the master weights ("within bf16 rounding of the f32 run's"), per tensor:
//!   ‖m_mixed − m_f32‖₂ ≤ 2⁻⁸ · ‖m_f32‖₂
//! Rounding a value to bf16 (8 significant bits) moves it by at most half an ulp, 2⁻⁹ of its magnitude; 2⁻⁸ is
//! one ulp, i.e. the mixed run's masters are as close to the f32 run's as one bf16 rounding step. On its own this
//! would also pass a run that never learns (30 steps at lr 2e-5 move the weights by about 1 %), so each tensor must
//! also have moved like the f32 run: ‖m_mixed − m_f32‖₂ ≤ 0.1 · ‖m_f32 − m_init‖₂ (a run whose updates vanish has
//! the difference equal to the whole movement).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::common::fixtures;
use crate::train::{bin, metrics, root, run_ok, scratch, train_losses};

fn mp_cmd(out: &Path, dtype: &str, extra: &[&str]) -> std::process::Command {
    let mut c = bin();
    c.args(["train", "--model"])
        .arg(fixtures().join("models/llama"))
        .arg("--data")
        .arg(root().join("examples/tiny/train.jsonl"))
        .arg("--output")
        .arg(out)
        .args([
            "--lr",
            "2e-5",
            "--batch-queries",
            "4",
            "--grad-accum",
            "2",
            "--max-len",
            "64",
            "--seed",
            "3",
            "--max-steps",
            "30",
            "--dtype",
            dtype,
        ])
        .args(extra);
    c
}

fn load_f32(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// Checks the final loss and the masters of a mixed run against the f32 run; returns (final loss relative
/// difference, worst ‖Δ‖/‖m‖, worst ‖Δ‖/‖movement‖) for the report.
fn assert_tracks_f32(dtype: &str) -> (f64, f64, f64) {
    let tmp = scratch(&format!("mp-{dtype}"));
    let (f32_run, mixed) = (tmp.join("f32"), tmp.join(dtype));
    run_ok(&mut mp_cmd(&f32_run, "f32", &[]));
    run_ok(&mut mp_cmd(&mixed, dtype, &[]));
    let (lf, lm) = (train_losses(&f32_run), train_losses(&mixed));
    assert_eq!(lf.len(), 30);
    assert_eq!(
        lm.len(),
        30,
        "{dtype}: every step taken (no overflow at the default scale)"
    );
    let (f0, f1, m1) = (lf[0], lf[29], lm[29]);
    assert!(f1 < f0 - 0.05, "the f32 run learns: {f0} → {f1}");
    let rel_loss = (m1 - f1).abs() / f1;
    assert!(
        rel_loss <= 0.02,
        "{dtype}: final loss {m1} vs f32 {f1} ({:.2} %)",
        100.0 * rel_loss
    );
    assert!(m1 < lm[0] - 0.05, "{dtype} learns: {} → {m1}", lm[0]);

    // Checkpoints hold the f32 masters.
    let init = load_f32(&fixtures().join("models/llama/model.safetensors"));
    let wf = load_f32(&f32_run.join("checkpoint-30/model.safetensors"));
    let wm = load_f32(&mixed.join("checkpoint-30/model.safetensors"));
    assert_eq!(wf.len(), wm.len());
    let (mut worst_rel, mut worst_move) = (0f64, 0f64);
    for (name, f) in &wf {
        let m = &wm[name];
        assert_eq!(
            m.dtype(),
            DType::F32,
            "{dtype}: checkpoint master `{name}` is f32"
        );
        let diff = norm(&(m - f).unwrap());
        let moved = norm(&(f - &init[name].to_dtype(DType::F32).unwrap()).unwrap());
        let (rel, mv) = (diff / norm(f), diff / moved);
        assert!(
            rel <= 2f64.powi(-8),
            "{dtype}: master `{name}` is {rel:.3e} (relative) from the f32 run's, more than one bf16 ulp (2^-8)"
        );
        assert!(
            mv <= 0.1,
            "{dtype}: master `{name}` differs from the f32 run's by {mv:.3} of the f32 run's movement"
        );
        worst_rel = worst_rel.max(rel);
        worst_move = worst_move.max(mv);
    }
    eprintln!(
        "{dtype}: loss {} → {m1:.6} (f32 {f0} → {f1:.6}, {:.3} %); masters: worst ‖Δ‖/‖m‖ {worst_rel:.3e}, worst ‖Δ‖/‖moved‖ {worst_move:.3}",
        lm[0],
        100.0 * rel_loss
    );
    std::fs::remove_dir_all(&tmp).unwrap();
    (rel_loss, worst_rel, worst_move)
}

#[test]
fn bf16_training_tracks_f32() {
    assert_tracks_f32("bf16");
}

#[test]
fn f16_training_with_loss_scaling_tracks_f32() {
    assert_tracks_f32("f16");
}

#[test]
fn f16_overflow_halves_the_scale_skips_the_step_and_is_no_error() {
    // 2^24 makes the scaled f16 gradients overflow at first: each overflow skips its step and halves the scale,
    // without --skip-nonfinite and without counting as a non-finite step; after 5 good steps the scale doubles.
    let tmp = scratch("mp-f16-overflow");
    let out = tmp.join("run");
    run_ok(&mut mp_cmd(
        &out,
        "f16",
        &["--loss-scale", "16777216", "--loss-scale-window", "5"],
    ));
    let lines = metrics(&out);
    let overflows: Vec<&Value> = lines.iter().filter(|l| l["overflow"] == true).collect();
    assert!(!overflows.is_empty(), "expected overflows at scale 2^24");
    let first = overflows[0];
    assert_eq!(first["loss_scale"], 8388608.0, "halved once: {first}");
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(
        steps.len() + overflows.len(),
        30,
        "every step is one or the other"
    );
    let last = steps.last().unwrap();
    assert_eq!(
        last["skipped_nonfinite"], 0,
        "overflows are not non-finite steps"
    );
    assert_eq!(last["overflow_skips"], overflows.len() as u64);
    // The scale grew again somewhere after a run of 5 good steps.
    let scales: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["loss_scale"].as_f64())
        .collect();
    assert!(
        scales.windows(2).any(|w| w[1] == 2.0 * w[0]),
        "the scale never grew: {scales:?}"
    );
    let losses = train_losses(&out);
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.05),
        "still learns: {losses:?}"
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-30/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["loss_scaler"]["overflow_skips"],
        overflows.len() as u64
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bf16_resume_is_exact() {
    let tmp = scratch("mp-resume");
    let (full, cut) = (tmp.join("full"), tmp.join("cut"));
    run_ok(&mut mp_cmd(&full, "bf16", &["--save-every", "10"]));
    // The same run killed while saving step 20, then resumed from its checkpoint-10.
    let status = mp_cmd(&cut, "bf16", &["--save-every", "10"])
        .env("RRHF_FAULT_ABORT_IN_SAVE", "20")
        .output()
        .unwrap()
        .status;
    assert!(
        !status.success(),
        "the run should have been killed while saving step 20"
    );
    let ck = cut.join("checkpoint-10");
    run_ok(mp_cmd(&cut, "bf16", &["--save-every", "10", "--resume"]).arg(&ck));
    assert_eq!(
        train_losses(&cut),
        train_losses(&full),
        "resumed bf16 losses differ from the uninterrupted run"
    );
    for f in [
        "checkpoint-30/model.safetensors",
        "checkpoint-30/optimizer.safetensors",
    ] {
        let a = std::fs::read(full.join(f)).unwrap();
        let b = std::fs::read(cut.join(f)).unwrap();
        assert!(a == b, "{f}: masters / moments not bit-identical");
    }
    // The final model is saved in the input model's dtype by default (the fixture's f32), not the training dtype.
    let w = load_f32(&full.join("model.safetensors"));
    assert!(w.values().all(|t| t.dtype() == DType::F32));
    std::fs::remove_dir_all(&tmp).unwrap();
}
