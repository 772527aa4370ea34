//! `rrhf eval`: perplexity against transformers (tests/fixtures/eval, tools/make_eval_fixtures.py), and the
//! binary on the tiny fixture models against `rrhf sample`, `rrhf score` and `rrhf rank` run on their own.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use rrhf::data::readers::{read_records, write_records, InputFormat, ReadOptions};
use rrhf::data::Record;
use rrhf::eval::perplexity::{response_nlls, summarize, tokenize_pair, PplContext};

use crate::common::{fixtures, load, temp_dir};

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn perplexity_matches_transformers_for_both_contexts() {
    let text = std::fs::read_to_string(fixtures().join("eval/perplexity.json")).unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["model"].as_str().unwrap();
        let ctx_name = case["context"].as_str().unwrap();
        let mut m = load(name, DType::F32);
        let context = match ctx_name {
            "query" => PplContext::Query,
            "none" => PplContext::None,
            "none_nobos" => {
                // An evaluator whose tokenizer has no BOS: nothing to condition on.
                m.tokenizer.bos_id = None;
                PplContext::None
            }
            other => panic!("unknown context {other}"),
        };
        let rows = case["pairs"].as_array().unwrap();
        let pairs: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| {
                (
                    r["query"].as_str().unwrap(),
                    r["response"].as_str().unwrap(),
                )
            })
            .collect();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        for (r, (q, a)) in rows.iter().zip(&pairs) {
            let (c, y, cut) = tokenize_pair(&m, q, a, context).unwrap();
            let at = format!("{name}/{ctx_name}: {a:?}");
            assert_eq!(c, ids(&r["ctx_ids"]), "{at}: context ids");
            assert_eq!(y, ids(&r["resp_ids"]), "{at}: response ids");
            assert_eq!(cut, r["truncated"].as_bool().unwrap(), "{at}: truncated");
        }
        // Three rows per forward: rows of different lengths share a padded batch.
        let got = response_nlls(&m, &Device::Cpu, &pairs, context, 3).unwrap();
        for (r, g) in rows.iter().zip(&got) {
            let at = format!("{name}/{ctx_name}: {:?}", r["response"]);
            assert_eq!(g.n_tokens as u64, r["n_tokens"].as_u64().unwrap(), "{at}");
            match r["nll"].as_f64() {
                None => assert_eq!(g.nll, None, "{at}"),
                Some(want) => {
                    let nll = g.nll.unwrap_or_else(|| panic!("{at}: no nll"));
                    assert!(rel(nll, want) <= 1e-4, "{at}: nll {nll} vs {want}");
                    let ppl = g.perplexity().unwrap();
                    let want_ppl = r["ppl"].as_f64().unwrap();
                    assert!(rel(ppl, want_ppl) <= 1e-4, "{at}: ppl {ppl} vs {want_ppl}");
                }
            }
        }
        let s = summarize(&got);
        let want = case["mean_perplexity"].as_f64().unwrap();
        let mean = s.mean_perplexity.unwrap();
        assert!(
            rel(mean, want) <= 1e-4,
            "{name}/{ctx_name}: mean perplexity {mean} vs transformers {want}"
        );
        assert_eq!(s.excluded as u64, case["excluded"].as_u64().unwrap());
        assert_eq!(s.n + s.excluded, rows.len());
    }
}

/// The HH-style prompts of examples/tiny (pairwise rows with chosen/rejected).
fn hh_prompts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/tiny/prompts.jsonl")
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn reward_model() -> String {
    format!(
        "model:{}",
        fixtures().join("score/models/llama_rm").display()
    )
}

/// Runs the binary: (success, stdout, stderr).
fn rrhf(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rrhf"))
        .args(args)
        .output()
        .expect("running the rrhf binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = rrhf(args);
    assert!(success, "rrhf {args:?} failed:\n{stderr}");
    stdout
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn records(path: &Path) -> Vec<Record> {
    read_records(
        path,
        &ReadOptions {
            format: InputFormat::Rrhf,
            require_scores: false,
            ..ReadOptions::default()
        },
    )
    .unwrap()
    .records
}

#[test]
fn eval_agrees_with_sample_score_and_rank() {
    let dir = temp_dir();
    let out = dir.join("eval");
    let (llama, gpt2) = (model("llama"), model("gpt2"));
    let prompts = hh_prompts().display().to_string();
    let rm = reward_model();
    let out_s = out.display().to_string();
    let table = ok(&[
        "eval",
        "--model",
        &llama,
        "--model",
        &gpt2,
        "--prompts",
        &prompts,
        "--reward",
        &rm,
        "--output",
        &out_s,
        "--max-new-tokens",
        "12",
        "--ppl-model",
        &gpt2,
        "--pairs",
        &prompts,
        "--best-of",
        "3",
        "--seed",
        "7",
    ]);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let gens = read_jsonl(&out.join("generations.jsonl"));
    assert_eq!(gens.len(), 8, "4 prompts × 2 models");
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let name = m["model"].as_str().unwrap().to_string();
        assert!(table.contains(&format!("| `{name}` |")), "{table}");
        let lines: Vec<&Value> = gens
            .iter()
            .filter(|g| g["model"] == name.as_str())
            .collect();
        assert_eq!(lines.len(), 4, "{name}");

        // Greedy generations are `rrhf sample --strategy greedy`'s.
        let sampled = dir.join("greedy.jsonl");
        let sampled_s = sampled.display().to_string();
        ok(&[
            "sample",
            "--model",
            &name,
            "--prompts",
            &prompts,
            "--output",
            &sampled_s,
            "--strategy",
            "greedy",
            "--max-new-tokens",
            "12",
            "--keep-provided",
            "false",
        ]);
        let recs = records(&sampled);
        assert_eq!(recs.len(), 4);
        for (r, g) in recs.iter().zip(&lines) {
            assert_eq!(g["query"].as_str().unwrap(), r.query);
            assert_eq!(g["response"].as_str().unwrap(), r.responses[0], "{name}");
        }

        // The rewards are `rrhf score`'s on generations.jsonl.
        let as_records: Vec<Record> = lines
            .iter()
            .map(|g| Record {
                query: g["query"].as_str().unwrap().into(),
                responses: vec![g["response"].as_str().unwrap().into()],
                scores: None,
                sources: None,
                finish_reasons: None,
            })
            .collect();
        let data = dir.join("gens.jsonl");
        write_records(&data, &as_records).unwrap();
        let scored = dir.join("scored.jsonl");
        let (data_s, scored_s) = (data.display().to_string(), scored.display().to_string());
        ok(&[
            "score", "--data", &data_s, "--output", &scored_s, "--reward", &rm,
        ]);
        let want: Vec<f64> = records(&scored)
            .iter()
            .map(|r| r.scores.as_ref().unwrap()[0])
            .collect();
        for (g, w) in lines.iter().zip(&want) {
            assert!((g["reward"].as_f64().unwrap() - w).abs() <= 1e-9, "{name}");
        }
        let mean = want.iter().sum::<f64>() / want.len() as f64;
        let got = m["reward_mean"].as_f64().unwrap();
        assert!(
            (got - mean).abs() <= 1e-9,
            "{name}: {got} vs rrhf score {mean}"
        );
        assert_eq!(m["n"], 4);

        // PPL is the mean of exp(nll) over generations with scored tokens.
        let ppls: Vec<f64> = lines
            .iter()
            .filter_map(|g| g["nll"].as_f64())
            .map(f64::exp)
            .collect();
        let excluded = lines.iter().filter(|g| g["nll"].is_null()).count();
        assert_eq!(m["ppl_excluded"].as_u64().unwrap() as usize, excluded);
        let ppl = ppls.iter().sum::<f64>() / ppls.len() as f64;
        assert!(rel(m["ppl"].as_f64().unwrap(), ppl) <= 1e-12, "{name}");
        for g in &lines {
            assert!(g["n_tokens"].is_u64(), "{g}");
        }

        // Best-of-3 is the mean best reward of `rrhf sample --strategy sample --num-responses 3`, scored.
        let samples = dir.join("samples.jsonl");
        let samples_s = samples.display().to_string();
        ok(&[
            "sample",
            "--model",
            &name,
            "--prompts",
            &prompts,
            "--output",
            &samples_s,
            "--strategy",
            "sample",
            "--num-responses",
            "3",
            "--seed",
            "7",
            "--max-new-tokens",
            "12",
            "--keep-provided",
            "false",
        ]);
        ok(&[
            "score", "--data", &samples_s, "--output", &scored_s, "--reward", &rm,
        ]);
        let best: Vec<f64> = records(&scored)
            .iter()
            .map(|r| {
                r.scores
                    .as_ref()
                    .unwrap()
                    .iter()
                    .copied()
                    .fold(f64::MIN, f64::max)
            })
            .collect();
        let want_best = best.iter().sum::<f64>() / best.len() as f64;
        let got_best = m["best_of_n"].as_f64().unwrap();
        assert!(
            (got_best - want_best).abs() <= 1e-9,
            "{name}: {got_best} vs {want_best}"
        );

        // RM accuracy is `rrhf rank`'s on the pairs (its max length capped at GPT-2's 64 positions).
        let rank_out = dir.join("rank.jsonl").display().to_string();
        let max_len = if name.ends_with("gpt2") { "64" } else { "192" };
        let said = ok(&[
            "rank",
            "--model",
            &name,
            "--data",
            &prompts,
            "--output",
            &rank_out,
            "--max-len",
            max_len,
        ]);
        let acc = m["rm_accuracy"].as_f64().unwrap();
        assert!(
            said.contains(&format!("{acc:.4}")),
            "{name}: {acc} vs {said}"
        );
        assert_eq!(m["rm_pairs"], 4);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(md, table, "report.md is what the command prints");
    assert!(md.contains("| Best-of-3 |"), "{md}");
    let png = std::fs::read(out.join("eval.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Only the four outputs are left: no scratch directory, no temporary file.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["eval.png", "generations.jsonl", "report.json", "report.md"]
    );
    assert_eq!(
        report["settings"]["stop"],
        serde_json::json!(["Human:", "Assistant:"])
    );
}

/// Runs eval expecting a failure: its stderr, checked to hold one error line and no sign of model work.
fn fails_early(extra: &[&str], prompts: &Path) -> String {
    let dir = temp_dir();
    let out = dir.join("eval").display().to_string();
    let llama = model("llama");
    let prompts = prompts.display().to_string();
    let mut args = vec![
        "eval",
        "--model",
        &llama,
        "--prompts",
        &prompts,
        "--reward",
        "vader",
        "--output",
        &out,
    ];
    args.extend_from_slice(extra);
    let (success, _, stderr) = rrhf(&args);
    assert!(!success, "rrhf {args:?} succeeded");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        !stderr.contains("rrhf eval: model"),
        "model work began:\n{stderr}"
    );
    assert!(
        !stderr.contains("rrhf sample"),
        "model work began:\n{stderr}"
    );
    assert!(!dir.join("eval/report.json").exists());
    stderr
}

#[test]
fn bad_input_fails_before_any_model_work() {
    let dir = temp_dir();
    let hh = hh_prompts();

    // A reward model that cannot load.
    let missing = dir.join("no-such-rm");
    let spec = format!("model:{}", missing.display());
    let e = fails_early(&["--reward", &spec], &hh);
    assert!(
        e.contains("--reward model:") && e.contains("no-such-rm"),
        "{e}"
    );

    // Prompts with no valid line: bad JSON stops at its line; skipping everything leaves no prompt.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"query\": \"ok\"\n\n{not json}\n").unwrap();
    let e = fails_early(&[], &bad);
    assert!(e.contains("bad.jsonl:1"), "{e}");
    let e = fails_early(&["--skip-invalid"], &bad);
    assert!(e.contains("bad.jsonl") && e.contains("no records"), "{e}");
    let blank = dir.join("blank.jsonl");
    std::fs::write(&blank, "\n\n").unwrap();
    let e = fails_early(&[], &blank);
    assert!(e.contains("blank.jsonl") && e.contains("no records"), "{e}");

    // --pairs without chosen/rejected: RRHF records are not pairs.
    let rrhf_records = dir.join("records.jsonl");
    std::fs::write(
        &rrhf_records,
        "{\"query\": \"q\", \"responses\": [\"a\", \"b\"], \"scores\": [1, 0]}\n",
    )
    .unwrap();
    let p = rrhf_records.display().to_string();
    let e = fails_early(&["--pairs", &p], &hh);
    assert!(
        e.contains("records.jsonl: record 1 is not a chosen/rejected pair"),
        "{e}"
    );
    // A pairwise file missing `rejected` names its line and field.
    let half = dir.join("half.jsonl");
    std::fs::write(&half, "{\"prompt\": \"q\", \"chosen\": \"a\"}\n").unwrap();
    let h = half.display().to_string();
    let e = fails_early(&["--pairs", &h], &hh);
    assert!(e.contains("half.jsonl:1: field `rejected`"), "{e}");

    // A policy that is not there, and flags that cannot work.
    let e = fails_early(&["--model", "/no/such/model"], &hh);
    assert!(e.contains("/no/such/model"), "{e}");
    let e = fails_early(&["--best-of", "0"], &hh);
    assert!(e.contains("--best-of"), "{e}");
    let e = fails_early(&["--reward", "labels"], &hh);
    assert!(e.contains("labels"), "{e}");
}
