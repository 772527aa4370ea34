//! `tools/demo.sh --tiny`: the demo's whole code path (prompts → sample → score → train → eval → report) on the tiny
//! fixture LLaMA and the bundled snippets, no download. Skips (with a note) where bash or python3 is missing.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::temp_dir;

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new("bash")
        .arg("tools/demo.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RRHF_BIN", env!("CARGO_BIN_EXE_rrhf"))
        .output()
        .expect("running bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn queries(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["query"].as_str().unwrap().to_string()
        })
        .collect()
}

fn check_run(out: &Path, n_train: usize, n_eval: usize) {
    let train = queries(&out.join("data/train_prompts.jsonl"));
    let eval = queries(&out.join("data/eval_prompts.jsonl"));
    assert_eq!((train.len(), eval.len()), (n_train, n_eval));
    let train_set: HashSet<_> = train.iter().collect();
    assert!(
        eval.iter().all(|q| !train_set.contains(q)),
        "train and eval prompts overlap"
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/report.json")).unwrap())
            .unwrap();
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert!(models[0]["model"]
        .as_str()
        .unwrap()
        .ends_with("models/llama"));
    assert!(models[1]["model"].as_str().unwrap().ends_with("policy"));
    assert!(models[0]["best_of_n"].is_f64(), "initial best-of-k missing");
    assert!(
        models[1]["best_of_n"].is_null(),
        "best-of-k is for the initial model only"
    );
    assert!(models[0]["ppl"].is_f64() && models[1]["ppl"].is_f64());
    for m in models {
        assert_eq!(m["n"].as_u64(), Some(n_eval as u64));
    }
    assert!(report["train_data"].is_object());

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| initial |",
        "| trained (RRHF) |",
        "**Gap**",
        "policy/loss.png",
        "eval/eval.png",
        "| sample |",
        "| train |",
        "| eval |",
        "before / after",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    assert!(out.join("policy/loss.png").is_file() && out.join("eval/eval.png").is_file());
    let timings = std::fs::read_to_string(out.join("timings.tsv")).unwrap();
    assert!(timings.lines().any(|l| l.starts_with("train")));
}

#[test]
fn tiny_demo_runs_the_whole_recipe() {
    if !have("bash") || !have("python3") {
        eprintln!("skipped: bash or python3 missing");
        return;
    }
    let dir = temp_dir();
    let out = dir.join("demo");
    let out_s = out.to_str().unwrap();
    let (ok, log) = demo(&["--tiny", "--output", out_s]);
    assert!(ok, "demo.sh --tiny failed:\n{log}");
    assert!(log.contains("rrhf demo"), "no plan printed:\n{log}");
    check_run(&out, 6, 4);

    // The same recipe on the user's own prompts (the split the first run wrote), into the same directory: a
    // previous demo output is replaced.
    let own = dir.join("own");
    std::fs::create_dir_all(&own).unwrap();
    for f in ["train_prompts.jsonl", "eval_prompts.jsonl"] {
        std::fs::copy(out.join("data").join(f), own.join(f)).unwrap();
    }
    let (ok, log) = demo(&[
        "--tiny",
        "--train-prompts",
        own.join("train_prompts.jsonl").to_str().unwrap(),
        "--eval-prompts",
        own.join("eval_prompts.jsonl").to_str().unwrap(),
        "--k",
        "3",
        "--output",
        out_s,
    ]);
    assert!(ok, "demo.sh with own prompts failed:\n{log}");
    check_run(&out, 6, 4);

    // A directory that is not a demo output is left alone; --online says it is not there yet.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let (ok, log) = demo(&["--tiny", "--output", other.to_str().unwrap()]);
    assert!(!ok && log.contains("not a previous demo output"), "{log}");
    assert_eq!(
        std::fs::read_to_string(other.join("keep.txt")).unwrap(),
        "mine"
    );
    let (ok, log) = demo(&["--online"]);
    assert!(!ok && log.contains("not implemented yet"), "{log}");
}
