//! `rrhf train` and `rrhf rank` end to end on the tiny fixture LLaMA and the example data.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::fixtures;

pub(crate) fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rrhf"))
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrhf-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "command failed: {stderr}");
    stderr + &String::from_utf8_lossy(&out.stdout)
}

/// Train on the tiny example set with the fixture model; extra flags appended.
pub(crate) fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["train", "--model"])
        .arg(fixtures().join("models/llama"))
        .arg("--data")
        .arg(root().join("examples/tiny/train.jsonl"))
        .arg("--output")
        .arg(out)
        .args([
            "--lr",
            "3e-3",
            "--batch-queries",
            "4",
            "--grad-accum",
            "2",
            "--max-len",
            "64",
            "--seed",
            "3",
        ])
        .args(extra);
    c
}

pub(crate) fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub(crate) fn train_losses(out: &Path) -> Vec<f64> {
    metrics(out)
        .iter()
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

/// Accuracy of p on the ordered pairs that do not involve the best response, from `rrhf rank` output.
fn accuracy_without_best(model: &Path, data: &Path, tmp: &Path) -> f64 {
    let out = tmp.join("rank.jsonl");
    run_ok(
        bin()
            .args(["rank", "--model"])
            .arg(model)
            .arg("--data")
            .arg(data)
            .arg("--output")
            .arg(&out)
            .args(["--max-len", "64"]),
    );
    let ranked: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let records: Vec<Value> = std::fs::read_to_string(data)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ranked.len(), records.len(), "one output line per record");
    let (mut right, mut pairs) = (0, 0);
    for (r, rec) in ranked.iter().zip(&records) {
        let p: Vec<f64> = r["p"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let s: Vec<f64> = rec["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let best = s.iter().cloned().fold(f64::MIN, f64::max);
        for i in 0..s.len() {
            for j in 0..s.len() {
                if s[i] < s[j] && s[j] < best {
                    pairs += 1;
                    right += usize::from(p[i] < p[j]);
                }
            }
        }
    }
    right as f64 / pairs as f64
}

#[test]
fn ranking_loss_orders_responses_that_sft_alone_does_not() {
    let tmp = scratch("ablation");
    let eval = root().join("examples/tiny/eval.jsonl");
    let rrhf = tmp.join("rrhf");
    run_ok(&mut train_cmd(&rrhf, &["--max-steps", "240"]));
    let sft = tmp.join("sft");
    run_ok(&mut train_cmd(
        &sft,
        &["--max-steps", "240", "--rank-weight", "0"],
    ));
    let losses = train_losses(&rrhf);
    let head: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let tail: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(
        tail < head * 0.5,
        "loss did not fall: first steps {head:.3}, last steps {tail:.3}"
    );
    let acc_rrhf = accuracy_without_best(&rrhf, &eval, &tmp);
    let acc_sft = accuracy_without_best(&sft, &eval, &tmp);
    assert!(
        acc_rrhf >= 0.95,
        "RRHF ranking accuracy without the best response: {acc_rrhf}"
    );
    assert!(
        acc_sft <= acc_rrhf - 0.3,
        "SFT-only accuracy {acc_sft} is not clearly below RRHF's {acc_rrhf}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn outputs_are_complete_and_loadable() {
    let tmp = scratch("outputs");
    let out = tmp.join("run");
    let eval = root().join("examples/tiny/eval.jsonl");
    run_ok(
        train_cmd(
            &out,
            &[
                "--max-steps",
                "5",
                "--save-every",
                "2",
                "--save-total-limit",
                "2",
            ],
        )
        .arg("--eval-data")
        .arg(&eval)
        .args(["--eval-every", "2"]),
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "metrics.jsonl",
        "args.json",
        "loss.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Checkpoints at 2, 4 and the end (5); the limit keeps the last two.
    let mut cks: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    cks.sort();
    assert_eq!(cks, vec!["checkpoint-4", "checkpoint-5"]);
    for f in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            out.join("checkpoint-4").join(f).exists(),
            "checkpoint-4/{f} missing"
        );
    }
    let m = metrics(&out);
    let step_lines: Vec<&Value> = m.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(step_lines.len(), 5);
    for key in [
        "step",
        "epoch",
        "loss",
        "rank_loss",
        "sft_loss",
        "rank_acc",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ] {
        assert!(step_lines[0].get(key).is_some(), "metrics lack {key}");
    }
    assert_eq!(
        m.iter().filter(|v| v.get("eval_loss").is_some()).count(),
        3,
        "eval at 2, 4 and the end"
    );
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["max_len"], 64);
    assert_eq!(args["schedule"], "linear");
    // The saved model loads and scores.
    let line = run_ok(
        bin()
            .args(["logprobs", "--model"])
            .arg(&out)
            .args(["--text", "Hello", "--json"]),
    );
    assert!(line.contains("\"total\""), "{line}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let tmp = scratch("determinism");
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    run_ok(&mut train_cmd(&a, &["--max-steps", "4"]));
    run_ok(&mut train_cmd(&b, &["--max-steps", "4"]));
    assert_eq!(train_losses(&a), train_losses(&b));
    let other = tmp.join("c");
    run_ok(&mut train_cmd(&other, &["--max-steps", "4", "--seed", "4"]));
    assert_ne!(
        train_losses(&a),
        train_losses(&other),
        "the seed must change the data order"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn killed_during_save_then_resumed_equals_uninterrupted() {
    let tmp = scratch("resume");
    let full = tmp.join("full");
    run_ok(&mut train_cmd(
        &full,
        &["--max-steps", "8", "--save-every", "3"],
    ));

    let cut = tmp.join("cut");
    let status = train_cmd(&cut, &["--max-steps", "8", "--save-every", "3"])
        .env("RRHF_FAULT_ABORT_IN_SAVE", "6")
        .output()
        .unwrap()
        .status;
    assert!(
        !status.success(),
        "the run should have been killed while saving step 6"
    );
    assert!(
        !cut.join("checkpoint-6").exists(),
        "a half-written checkpoint must not appear under its final name"
    );
    let ck3 = cut.join("checkpoint-3");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "config.json",
    ] {
        assert!(
            ck3.join(f).exists(),
            "checkpoint-3/{f} must survive the kill"
        );
    }
    run_ok(train_cmd(&cut, &["--max-steps", "8", "--save-every", "3", "--resume"]).arg(&ck3));
    assert_eq!(
        train_losses(&cut),
        train_losses(&full),
        "resumed losses differ from the uninterrupted run"
    );
    let wa = std::fs::read(full.join("model.safetensors")).unwrap();
    let wb = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn config_file_sets_flags_and_the_command_line_overrides_it() {
    let tmp = scratch("config");
    let cfg = tmp.join("train.toml");
    std::fs::write(
        &cfg,
        "max_steps = 2\nrank_weight = 0.5\nlayout = \"padded\"\nskip_invalid = true\n",
    )
    .unwrap();
    let out = tmp.join("run");
    run_ok(
        train_cmd(&out, &["--rank-weight", "2"])
            .arg("--config")
            .arg(&cfg),
    );
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["max_steps"], 2);
    assert_eq!(args["layout"], "padded");
    assert_eq!(args["skip_invalid"], true);
    assert_eq!(
        args["rank_weight"], 2.0,
        "the command line overrides the file"
    );
    assert_eq!(train_losses(&out).len(), 2);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn unscored_data_is_refused_with_file_and_line_and_nothing_is_written() {
    let tmp = scratch("unscored");
    let data = tmp.join("d.jsonl");
    std::fs::write(&data, "{\"query\": \"q\", \"responses\": [\"a\"], \"scores\": [1.0]}\n{\"query\": \"q\", \"responses\": [\"a\", \"b\"], \"scores\": null}\n").unwrap();
    let out = tmp.join("run");
    let res = bin()
        .args(["train", "--model"])
        .arg(fixtures().join("models/llama"))
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("d.jsonl:2") && err.contains("rrhf score"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written on bad input");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn grad_checkpoint_trains_like_one_graph() {
    let tmp = scratch("grad-checkpoint");
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    run_ok(&mut train_cmd(&a, &["--max-steps", "5"]));
    run_ok(&mut train_cmd(
        &b,
        &["--max-steps", "5", "--grad-checkpoint"],
    ));
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-6),
                "{key}: {x} without, {y} with --grad-checkpoint"
            );
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn cached_allocator_changes_no_result() {
    // Every block of a page or more through the cache, reused across steps of different shapes, against the
    // cache turned off: the same losses and the same final weights, bit for bit.
    let tmp = scratch("allocator");
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    run_ok(train_cmd(&a, &["--max-steps", "6"]).env("RRHF_ALLOC_BIG", "4096"));
    run_ok(train_cmd(&b, &["--max-steps", "6"]).env("RRHF_ALLOC_CACHE_MB", "0"));
    assert_eq!(train_losses(&a), train_losses(&b));
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
