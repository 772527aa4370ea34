//! `rrhf iterate` on the tiny fixture models: IP-2 end to end, a run stopped between stages and rerun, OP's
//! sampler reading the updated weights, and OP's KL against log-probs computed on their own by `rrhf score`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::common::{fixtures, temp_dir};

/// Runs the binary with extra environment variables: (success, stdout, stderr).
fn rrhf_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rrhf"));
    cmd.args(args).env_remove("RRHF_ITERATE_STOP_AFTER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running the rrhf binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = rrhf_env(args, &[]);
    assert!(success, "rrhf {args:?} failed:\n{stderr}");
    stdout + &stderr
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn llama() -> String {
    fixtures().join("models/llama").display().to_string()
}

fn tiny_prompts() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/tiny/prompts.jsonl")
        .display()
        .to_string()
}

/// The flags of a small IP-2 run into `out`.
fn ip2_args(out: &str) -> Vec<String> {
    [
        "iterate",
        "--setting",
        "IP",
        "--iterations",
        "2",
        "--model",
        &llama(),
        "--prompts",
        &tiny_prompts(),
        "--reward",
        "vader",
        "--output",
        out,
        "--strategy",
        "sample",
        "--num-responses",
        "3",
        "--max-new-tokens",
        "6",
        "--max-len",
        "128",
        "--lr",
        "1e-3",
        "--epochs",
        "1",
        "--batch-queries",
        "2",
        "--ppl-model",
        &fixtures().join("models/gpt2").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn ip2_end_to_end_writes_two_iterations_and_a_report() {
    let dir = temp_dir();
    let out = dir.join("ip");
    let o = out.display().to_string();
    ok(&strs(&ip2_args(&o)));
    for i in 0..=2 {
        let d = out.join(format!("iter-{i}"));
        let state = read_json(&d.join("state.json"));
        let stages: Vec<&str> = state["done"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        let want: &[&str] = if i == 0 {
            &["eval"]
        } else {
            &["sample", "score", "train", "eval"]
        };
        assert_eq!(stages, want, "iteration {i}");
        assert!(d.join("eval/report.md").exists());
        if i > 0 {
            for f in [
                "samples.jsonl",
                "scores.jsonl",
                "model/model.safetensors",
                "model/metrics.jsonl",
            ] {
                assert!(d.join(f).exists(), "iter-{i}/{f}");
            }
        }
    }
    // Iteration 2 sampled with iteration 1's model: `rrhf sample` with that model and seed 42 + 2 gives the same.
    let again = dir.join("again.jsonl");
    ok(&[
        "sample",
        "--model",
        &out.join("iter-1/model").display().to_string(),
        "--prompts",
        &tiny_prompts(),
        "--output",
        &again.display().to_string(),
        "--setting",
        "DP",
        "--strategy",
        "sample",
        "--num-responses",
        "3",
        "--max-new-tokens",
        "6",
        "--seed",
        "44",
    ]);
    let ours = read_jsonl(&out.join("iter-2/samples.jsonl"));
    let theirs = read_jsonl(&again);
    assert_eq!(ours.len(), 4);
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a["responses"], b["responses"]);
    }

    // The report: rows 0..=2, each row's numbers those of the files the stages wrote.
    let report = read_json(&out.join("report.json"));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["iteration"], i);
        let ev = read_json(&out.join(format!("iter-{i}/eval/report.json")));
        assert_eq!(row["eval"]["reward_mean"], ev["models"][0]["reward_mean"]);
        assert_eq!(row["eval"]["ppl"], ev["models"][0]["ppl"]);
        if i == 0 {
            assert!(row["samples"].is_null());
            continue;
        }
        // Mean of every score of the iteration's scored samples, computed here.
        let scores: Vec<f64> = read_jsonl(&out.join(format!("iter-{i}/scores.jsonl")))
            .iter()
            .flat_map(|r| {
                r["scores"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        assert!((row["samples"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        let metrics = read_jsonl(&out.join(format!("iter-{i}/model/metrics.jsonl")));
        let last = metrics
            .iter()
            .rev()
            .find(|m| m.get("loss").is_some())
            .unwrap();
        assert_eq!(row["train_loss"], last["loss"]);
        assert_eq!(row["train_steps"], 2);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("# rrhf iterate: IP-2"), "{md}");
    for r in ["| 0 |", "| 1 | `iter-1/model`", "| 2 | `iter-2/model`"] {
        assert!(md.contains(r), "{r} missing:\n{md}");
    }
    assert!(out.join("report.png").exists());
}

/// Modification times of the files under `dir` (recursively), by path.
fn mtimes(dir: &Path) -> Vec<(PathBuf, SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.clone(),
                    std::fs::metadata(&p).unwrap().modified().unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn ip_rerun_after_kill_between_stages_redoes_nothing() {
    let dir = temp_dir();
    let whole = dir.join("whole").display().to_string();
    ok(&strs(&ip2_args(&whole)));

    let out = dir.join("stopped");
    let o = out.display().to_string();
    let args = ip2_args(&o);
    // Killed after iteration 1's score stage: samples and scores are done, training is not.
    let (success, _, stderr) =
        rrhf_env(&strs(&args), &[("RRHF_ITERATE_STOP_AFTER", "iter-1/score")]);
    assert!(
        !success && stderr.contains("stopped after iter-1/score"),
        "{stderr}"
    );
    assert!(!out.join("iter-1/model").exists());
    let done_before = [mtimes(&out.join("iter-0")), mtimes(&out.join("iter-1"))].concat();
    let samples = std::fs::read(out.join("iter-1/samples.jsonl")).unwrap();

    // Rerun, killed again after iteration 2's training.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (success, _, stderr) =
        rrhf_env(&strs(&args), &[("RRHF_ITERATE_STOP_AFTER", "iter-2/train")]);
    assert!(
        !success && stderr.contains("stopped after iter-2/train"),
        "{stderr}"
    );
    for s in ["iter-0/eval", "iter-1/sample", "iter-1/score"] {
        assert!(
            stderr.contains(&format!("{s} finished in an earlier run; not redone")),
            "{s}:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("rrhf iterate: iter-1/sample\n"),
        "{stderr}"
    );
    for (p, t) in &done_before {
        if p.ends_with("iter-1/state.json") {
            continue; // it gains the stages run now
        }
        assert_eq!(
            std::fs::metadata(p).unwrap().modified().unwrap(),
            *t,
            "{} was rewritten",
            p.display()
        );
    }
    assert_eq!(
        std::fs::read(out.join("iter-1/samples.jsonl")).unwrap(),
        samples
    );
    let model2 = mtimes(&out.join("iter-2/model"));

    // The last rerun only evaluates iteration 2 and writes the report.
    let stderr = ok(&strs(&args));
    assert!(stderr.contains("rrhf iterate: iter-2/eval"), "{stderr}");
    assert!(
        stderr.contains("iter-2/train finished in an earlier run"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("rrhf train:"),
        "training was redone:\n{stderr}"
    );
    assert_eq!(mtimes(&out.join("iter-2/model")), model2);
    assert!(
        stderr.contains("IP-2: 1 stages run, 8 already done"),
        "{stderr}"
    );

    // The same report as the run that was never stopped.
    let a = std::fs::read_to_string(dir.join("whole/report.md")).unwrap();
    let b = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        read_json(&dir.join("whole/report.json")),
        read_json(&out.join("report.json"))
    );

    // Continuing with another flag is refused, naming it; --iterations may grow.
    let mut other = args.clone();
    other.extend(["--lr".to_string(), "2e-3".to_string()]);
    let (success, _, stderr) = rrhf_env(&strs(&other), &[]);
    assert!(
        !success && stderr.contains("--lr 0.001") && stderr.contains("0.002"),
        "{stderr}"
    );
}

/// A prompt with one dataset response that VADER likes (reward ≈ 0.92), which the greedy generation of the random
/// model is not: RRHF fine-tunes on it and the model's greedy continuation moves towards it.
fn one_prompt(dir: &Path) -> String {
    let p = dir.join("one.jsonl");
    std::fs::write(
        &p,
        "{\"query\": \"Tell me a story.\", \"responses\": [\" great great great\"]}\n",
    )
    .unwrap();
    p.display().to_string()
}

fn responses(path: &Path) -> Vec<Value> {
    read_jsonl(path)
        .iter()
        .map(|r| r["responses"].clone())
        .collect()
}

#[test]
fn op_sampler_uses_updated_weights() {
    let dir = temp_dir();
    let prompts = one_prompt(&dir);
    let out = dir.join("op");
    let o = out.display().to_string();
    ok(&[
        "iterate",
        "--setting",
        "OP",
        "--resample-every",
        "1",
        "--model",
        &llama(),
        "--prompts",
        &prompts,
        "--reward",
        "vader",
        "--output",
        &o,
        "--strategy",
        "greedy",
        "--max-new-tokens",
        "4",
        "--max-len",
        "128",
        "--lr",
        "0.01",
        "--warmup-ratio",
        "0",
        "--schedule",
        "constant",
        "--max-steps",
        "4",
        "--batch-queries",
        "1",
        "--save-every",
        "1",
    ]);
    // Round r samples with the weights after r − 1 updates: `rrhf sample` from checkpoint-(r − 1) gives exactly
    // its samples, and the initial model does not.
    let sample = |model: &str, seed: u64, name: &str| -> Vec<Value> {
        let path = dir.join(name);
        ok(&[
            "sample",
            "--model",
            model,
            "--prompts",
            &prompts,
            "--output",
            &path.display().to_string(),
            "--setting",
            "DP",
            "--strategy",
            "greedy",
            "--max-new-tokens",
            "4",
            "--seed",
            &seed.to_string(),
        ]);
        responses(&path)
    };
    let initial = sample(&llama(), 42 + 2, "initial.jsonl");
    assert_eq!(responses(&out.join("rounds/round-1.jsonl")), initial);
    for r in 2..=4u64 {
        let ck = out
            .join(format!("checkpoint-{}", r - 1))
            .display()
            .to_string();
        let ours = responses(&out.join(format!("rounds/round-{r}.jsonl")));
        assert_eq!(
            ours,
            sample(&ck, 42 + r, &format!("ck{r}.jsonl")),
            "round {r}"
        );
        assert_ne!(ours, initial, "round {r} sampled like the initial model");
    }
    // Three updates towards the rewarded response made it the greedy continuation.
    let first = |r: u64| -> String {
        responses(&out.join(format!("rounds/round-{r}.jsonl")))[0][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(!first(1).starts_with(" great"), "{}", first(1));
    assert!(first(4).starts_with(" great"), "{}", first(4));
}

#[test]
fn op_kl_is_zero_at_round_one_and_matches_logprob_difference() {
    let dir = temp_dir();
    let out = dir.join("op");
    let o = out.display().to_string();
    let beta = 0.5;
    ok(&[
        "iterate",
        "--setting",
        "OP",
        "--resample-every",
        "1",
        "--kl-coef",
        "0.5",
        "--model",
        &llama(),
        "--prompts",
        &tiny_prompts(),
        "--reward",
        "vader",
        "--output",
        &o,
        "--strategy",
        "sample",
        "--num-responses",
        "2",
        "--max-new-tokens",
        "5",
        "--max-len",
        "128",
        "--lr",
        "0.01",
        "--warmup-ratio",
        "0",
        "--max-steps",
        "3",
        "--batch-queries",
        "2",
        "--save-every",
        "1",
    ]);
    let rounds: Vec<Value> = read_jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|m| m.get("reward_mean").is_some())
        .collect();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[0]["kl_mean"].as_f64(), Some(0.0));
    for r in 2..=3usize {
        // log π − log ρ per response, by `rrhf score --reward policy:` (p_i with length penalty 0 = the sum of
        // the response's token log-probs, EOS included) under checkpoint-(r − 1) and the initial model.
        let round = out.join(format!("rounds/round-{r}.jsonl"));
        let logp = |model: &str, name: &str| -> Vec<f64> {
            let path = dir.join(name);
            ok(&[
                "score",
                "--data",
                &round.display().to_string(),
                "--output",
                &path.display().to_string(),
                "--reward",
                &format!("policy:{model}"),
                "--length-penalty",
                "0",
                "--max-len",
                "128",
            ]);
            read_jsonl(&path)
                .iter()
                .flat_map(|r| {
                    r["scores"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let ck = out
            .join(format!("checkpoint-{}", r - 1))
            .display()
            .to_string();
        let pi = logp(&ck, &format!("pi{r}.jsonl"));
        let rho = logp(&llama(), &format!("rho{r}.jsonl"));
        let lines = read_jsonl(&round);
        let logged: Vec<f64> = lines
            .iter()
            .flat_map(|l| {
                l["kl"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(logged.len(), pi.len());
        let mut sum = 0.0;
        for (i, k) in logged.iter().enumerate() {
            let d = pi[i] - rho[i];
            assert!(
                (k - d).abs() < 1e-4 * d.abs().max(1.0),
                "round {r} response {i}: logged {k}, recomputed {d}"
            );
            sum += d;
        }
        let mean = sum / pi.len() as f64;
        let kl_mean = rounds[r - 1]["kl_mean"].as_f64().unwrap();
        assert!(kl_mean.abs() > 1e-3, "round {r}: the policy has not moved");
        assert!(
            (kl_mean - mean).abs() < 1e-4 * mean.abs().max(1.0),
            "round {r}: {kl_mean} vs {mean}"
        );
        // What was trained on: R̃ = R − β·KL.
        for l in &lines {
            let s = l["scores"].as_array().unwrap();
            for (j, x) in s.iter().enumerate() {
                let want = l["reward"][j].as_f64().unwrap() - beta * l["kl"][j].as_f64().unwrap();
                assert!((x.as_f64().unwrap() - want).abs() < 1e-12);
            }
        }
    }
    assert!(out.join("op.png").exists() && out.join("model.safetensors").exists());
}

/// Runs `rrhf iterate` expecting one error line before any model work.
fn fails_early(setting: &[&str], extra: &[&str], dir: &Path) -> String {
    let out = dir.join("out").display().to_string();
    let l = llama();
    let tp = tiny_prompts();
    let mut args = vec![
        "iterate",
        "--model",
        &l,
        "--prompts",
        &tp,
        "--reward",
        "vader",
        "--output",
        &out,
        "--max-len",
        "128",
    ];
    args.extend_from_slice(setting);
    args.extend_from_slice(extra);
    let (success, _, stderr) = rrhf_env(&args, &[]);
    assert!(!success, "rrhf {args:?} succeeded");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "model work began:\n{stderr}");
    stderr
}

#[test]
fn iterate_bad_input_fails_before_any_model_work() {
    let dir = temp_dir();
    let missing = format!("model:{}", dir.join("no-such-rm").display());
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "\n{not json}\n").unwrap();
    let blank = dir.join("blank.jsonl");
    std::fs::write(&blank, "\n\n").unwrap();
    let (b, bl) = (bad.display().to_string(), blank.display().to_string());
    for setting in [
        &["--setting", "IP"][..],
        &["--setting", "OP", "--resample-every", "2"][..],
    ] {
        let e = fails_early(setting, &["--reward", &missing], &dir);
        assert!(
            e.contains("--reward model:") && e.contains("no-such-rm"),
            "{e}"
        );
        let e = fails_early(setting, &["--prompts", &b], &dir);
        assert!(e.contains("bad.jsonl:2"), "{e}");
        let e = fails_early(setting, &["--prompts", &bl], &dir);
        assert!(e.contains("blank.jsonl") && e.contains("no records"), "{e}");
        let e = fails_early(setting, &["--reward", "labels"], &dir);
        assert!(e.contains("labels"), "{e}");
        assert!(!dir.join("out/iter-0").exists() && !dir.join("out/metrics.jsonl").exists());
    }
    let e = fails_early(&["--setting", "OP"], &[], &dir);
    assert!(e.contains("--resample-every"), "{e}");
    let e = fails_early(
        &["--setting", "OP", "--resample-every", "2"],
        &["--save-every", "3"],
        &dir,
    );
    assert!(e.contains("multiple of --resample-every"), "{e}");
    let e = fails_early(
        &["--setting", "OP", "--resample-every", "2"],
        &["--iterations", "2"],
        &dir,
    );
    assert!(e.contains("--iterations counts IP iterations"), "{e}");
}

/// `metrics.jsonl` without the wall times, which differ between runs.
fn metrics_without_times(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .map(|mut m| {
            let o = m.as_object_mut().unwrap();
            o.retain(|k, _| !k.ends_with("_s"));
            m
        })
        .collect()
}

#[test]
fn op_resume_equals_uninterrupted() {
    let dir = temp_dir();
    let args = |out: &str| -> Vec<String> {
        [
            "iterate",
            "--setting",
            "OP",
            "--resample-every",
            "1",
            "--kl-coef",
            "0.1",
            "--model",
            &llama(),
            "--prompts",
            &tiny_prompts(),
            "--reward",
            "vader",
            "--output",
            out,
            "--strategy",
            "sample",
            "--num-responses",
            "2",
            "--max-new-tokens",
            "5",
            "--max-len",
            "128",
            "--lr",
            "0.01",
            "--max-steps",
            "4",
            "--batch-queries",
            "2",
            "--save-every",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.join("whole");
    ok(&strs(&args(&whole.display().to_string())));

    let out = dir.join("stopped");
    let o = out.display().to_string();
    let (success, _, stderr) =
        rrhf_env(&strs(&args(&o)), &[("RRHF_ITERATE_STOP_AFTER", "round-3")]);
    assert!(
        !success && stderr.contains("stopped after round-3"),
        "{stderr}"
    );
    // Without --resume the output is refused, untouched.
    let (success, _, stderr) = rrhf_env(&strs(&args(&o)), &[]);
    assert!(!success && stderr.contains("--resume"), "{stderr}");
    let mut resumed = args(&o);
    resumed.extend([
        "--resume".to_string(),
        out.join("checkpoint-2").display().to_string(),
    ]);
    ok(&strs(&resumed));

    assert_eq!(metrics_without_times(&whole), metrics_without_times(&out));
    for r in 1..=4 {
        let f = format!("rounds/round-{r}.jsonl");
        assert_eq!(
            read_jsonl(&whole.join(&f)),
            read_jsonl(&out.join(&f)),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
}

#[test]
fn op_nonfinite_loss_stops_the_run_as_train_does() {
    let dir = temp_dir();
    let out = dir.join("op");
    let o = out.display().to_string();
    let l = llama();
    let tp = tiny_prompts();
    let args = [
        "iterate",
        "--setting",
        "OP",
        "--resample-every",
        "1",
        "--model",
        &l,
        "--prompts",
        &tp,
        "--reward",
        "vader",
        "--output",
        &o,
        "--strategy",
        "greedy",
        "--max-new-tokens",
        "4",
        "--max-len",
        "128",
        "--max-steps",
        "3",
        "--batch-queries",
        "2",
        "--save-every",
        "1",
    ];
    let (success, _, stderr) = rrhf_env(&args, &[("RRHF_FAULT_NAN_AT_STEP", "2")]);
    assert!(!success, "{stderr}");
    // rrhf train's error: the step, the records (here lines of the round's file) and the last good checkpoint.
    assert!(stderr.contains("step 2: the loss is NaN"), "{stderr}");
    assert!(stderr.contains("round-2.jsonl:1"), "{stderr}");
    assert!(stderr.contains("checkpoint-1"), "{stderr}");
    assert!(!out.join("checkpoint-2").exists());
    let last = read_jsonl(&out.join("metrics.jsonl")).pop().unwrap();
    assert_eq!(last["stopped"], true);
    // With --skip-nonfinite 1 the step is skipped and the run finishes.
    let o2 = dir.join("skip").display().to_string();
    let mut skip: Vec<&str> = args.to_vec();
    skip[12] = &o2;
    skip.extend(["--skip-nonfinite", "1"]);
    let (success, _, stderr) = rrhf_env(&skip, &[("RRHF_FAULT_NAN_AT_STEP", "2")]);
    assert!(success, "{stderr}");
    assert!(dir.join("skip/model.safetensors").exists());
}
