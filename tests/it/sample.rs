//! `rrhf sample` end to end: the binary on the tiny LLaMA fixture, and against a loopback OpenAI-compatible server.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{openai_reply, Reply, TestServer};
use crate::common::fixtures;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("rrhf-it-sample-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The HH-style pairwise prompts shipped in examples/tiny (4 prompts with chosen/rejected).
fn hh_prompts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/tiny/prompts.jsonl")
}

/// Command-line arguments from whitespace-separated words; `{model}` is the tiny LLaMA fixture, `{hh}` the HH
/// prompt file, and `{name}` the path `vars` gives for `name` (paths may contain spaces, words may not).
fn argv(words: &str, vars: &[(&str, &Path)]) -> Vec<String> {
    let model = fixtures().join("models/llama");
    let hh = hh_prompts();
    words
        .split_whitespace()
        .map(|w| {
            let path = match w {
                "{model}" => Some(model.as_path()),
                "{hh}" => Some(hh.as_path()),
                _ => vars
                    .iter()
                    .find(|(k, _)| format!("{{{k}}}") == w)
                    .map(|(_, p)| *p),
            };
            path.map_or_else(|| w.to_string(), |p| p.display().to_string())
        })
        .collect()
}

/// Runs the binary: (success, stderr).
fn rrhf(args: &[String]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rrhf"))
        .args(args)
        .output()
        .expect("running the rrhf binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[String]) -> String {
    let (success, stderr) = rrhf(args);
    assert!(success, "rrhf {args:?} failed:\n{stderr}");
    stderr
}

fn fails(args: &[String]) -> String {
    let (success, stderr) = rrhf(args);
    assert!(!success, "rrhf {args:?} should fail:\n{stderr}");
    stderr
}

fn records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sample_dp_writes_generated_then_provided_responses() {
    let dir = TempDir::new("dp");
    let out = dir.path("dp.jsonl");
    let log = ok(&argv(
        "sample --model {model} --prompts {hh} --output {out} --setting DP --max-new-tokens 12",
        &[("out", &out)],
    ));
    assert!(
        log.contains("diverse beam search (4 beams in 4 groups, diversity penalty 1"),
        "{log}"
    );
    assert!(log.contains("16 generated + 8 provided responses"), "{log}");
    let input = records(&hh_prompts());
    let recs = records(&out);
    assert_eq!(recs.len(), input.len());
    let policy = "policy:diverse-beam";
    for (r, p) in recs.iter().zip(&input) {
        assert_eq!(r["query"], p["prompt"]);
        assert!(r.get("scores").is_some_and(Value::is_null), "{r}");
        let responses = strs(&r["responses"]);
        assert_eq!(responses.len(), 6);
        assert_eq!(
            strs(&r["sources"]),
            [
                policy,
                policy,
                policy,
                policy,
                "dataset:chosen",
                "dataset:rejected"
            ]
        );
        assert_eq!(responses[4], p["chosen"].as_str().unwrap());
        assert_eq!(responses[5], p["rejected"].as_str().unwrap());
        // HH prompts: generations are cut at the default stop strings.
        for t in &responses[..4] {
            assert!(!t.contains("Human:") && !t.contains("Assistant:"), "{t:?}");
        }
    }
    // The records read back as unscored RRHF records.
    let back = rrhf::data::readers::read_records(
        &out,
        &rrhf::data::readers::ReadOptions {
            require_scores: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(back.records.len(), 4);
    assert!(back.records.iter().all(|r| r.scores.is_none()));
}

#[test]
fn sample_p_keeps_the_dataset_labels_without_a_model() {
    let dir = TempDir::new("p");
    let out = dir.path("p.jsonl");
    // --config works for sample like for every command.
    let cfg = dir.write("p.toml", "setting = \"P\"\n");
    ok(&argv(
        "sample --config {cfg} --prompts {hh} --output {out}",
        &[("cfg", &cfg), ("out", &out)],
    ));
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!(r["scores"], json!([1.0, 0.0]));
        assert_eq!(strs(&r["sources"]), ["dataset:chosen", "dataset:rejected"]);
    }
    // RRHF records keep their own scores; responses without sources are labelled `dataset`.
    let scored = dir.write(
        "scored.jsonl",
        "{\"query\": \"q\", \"responses\": [\"a\", \"b\", \"c\"], \"scores\": [0.5, -1, 2]}\n",
    );
    let p_run = "sample --setting P --prompts {in} --output {out}";
    ok(&argv(p_run, &[("in", &scored), ("out", &out)]));
    let recs = records(&out);
    assert_eq!(recs[0]["scores"], json!([0.5, -1.0, 2.0]));
    assert_eq!(strs(&recs[0]["sources"]), ["dataset", "dataset", "dataset"]);
    // Query-only prompts have nothing to keep.
    let q = dir.write("q.jsonl", "{\"query\": \"hello\"}\n");
    let err = fails(&argv(p_run, &[("in", &q), ("out", &out)]));
    assert!(err.contains("has no responses"), "{err}");
}

#[test]
fn sample_reads_query_only_lines() {
    let dir = TempDir::new("query");
    let prompts = dir.write(
        "q.jsonl",
        "{\"query\": \"Once upon a time\"}\n\n{\"query\": \"The capital of France is\", \"id\": 7}\n",
    );
    let out = dir.path("out.jsonl");
    // --strategy overrides the preset's beam search; BP's provided responses: there are none.
    let log = ok(&argv(
        "sample --model {model} --prompts {in} --output {out} --setting BP --strategy greedy --max-new-tokens 8 \
         --max-prompt-len 3",
        &[("in", &prompts), ("out", &out)],
    ));
    assert!(log.contains("2 generated + 0 provided"), "{log}");
    assert!(log.contains("2 prompts truncated"), "{log}");
    let recs = records(&out);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["query"], "The capital of France is");
    assert_eq!(strs(&recs[1]["sources"]), ["policy:greedy"]);
    assert!(recs[1]["scores"].is_null());
}

#[test]
fn sample_stop_strings_cut_text_and_stop_generation() {
    let dir = TempDir::new("stop");
    let prompts = dir.write("q.jsonl", "{\"query\": \"Once upon a time\"}\n");
    let (free, cut) = (dir.path("free.jsonl"), dir.path("cut.jsonl"));
    let greedy = "sample --model {model} --prompts {in} --output {out} --strategy greedy --max-new-tokens 24";
    let mut args = argv(greedy, &[("in", &prompts), ("out", &free)]);
    args.extend(["--stop".to_string(), String::new()]); // no stop strings
    let log = ok(&args);
    assert!(log.contains("24 tokens"), "{log}");
    let text = strs(&records(&free)[0]["responses"])[0].clone();
    // A stop string the tiny model does produce: the first two clean characters after the first one.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = (1..chars.len().saturating_sub(1))
        .map(|i| chars[i..i + 2].iter().collect::<String>())
        .find(|w: &String| !w.contains('\u{FFFD}') && !w.trim().is_empty())
        .unwrap_or_else(|| panic!("no usable stop string in {text:?}"));
    let expected = text[..text.find(&stop).unwrap()].trim_end().to_string();
    let mut args = argv(greedy, &[("in", &prompts), ("out", &cut)]);
    args.extend(["--stop", &stop, "--stop", "NEVER-THERE"].map(String::from));
    let log = ok(&args);
    assert!(log.contains("1 responses cut at a stop string"), "{log}");
    let got = strs(&records(&cut)[0]["responses"])[0].clone();
    assert_eq!(got, expected, "free text {text:?}, stop {stop:?}");
    // Generation stopped early: fewer tokens than the 24 of the free run.
    let i = log.find(" tokens at ").unwrap();
    let tokens: u64 = log[..i].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(tokens < 24, "{log}");
}

/// `--resume` after a partial output gives the same file as one run (beam search is deterministic).
#[test]
fn sample_resume_continues_to_the_same_file() {
    let dir = TempDir::new("resume");
    let first_two: String = fs::read_to_string(hh_prompts())
        .unwrap()
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect();
    let head = dir.write("head.jsonl", &first_two);
    let (one, resumed) = (dir.path("one.jsonl"), dir.path("resumed.jsonl"));
    let bp =
        "sample --model {model} --prompts {in} --output {out} --setting BP --max-new-tokens 10 \
              --batch-prompts 2";
    ok(&argv(bp, &[("in", &hh_prompts()), ("out", &one)]));
    // A partial output: the first two prompts, as a run killed after its first batch leaves it.
    ok(&argv(bp, &[("in", &head), ("out", &resumed)]));
    assert_eq!(records(&resumed).len(), 2);
    let mut args = argv(bp, &[("in", &hh_prompts()), ("out", &resumed)]);
    args.push("--resume".into());
    let log = ok(&args);
    assert!(
        log.contains("sampled 2 of 4 prompts (2 already in the output"),
        "{log}"
    );
    let expected = fs::read_to_string(&one).unwrap();
    assert_eq!(fs::read_to_string(&resumed).unwrap(), expected);
    // Nothing left to do: the file stays as it is.
    let log = ok(&args);
    assert!(log.contains("sampled 0 of 4 prompts (4 already"), "{log}");
    assert_eq!(fs::read_to_string(&resumed).unwrap(), expected);
}

#[test]
fn sample_bad_prompt_line_names_file_and_line_and_writes_nothing() {
    let dir = TempDir::new("bad");
    let out = dir.path("out.jsonl");
    let pairs = dir.write(
        "bad.jsonl",
        "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\", \"chosen\": \" a\", \"rejected\": \" b\"}\n\
         {\"prompt\": \"\\n\\nHuman: yo\\n\\nAssistant:\", \"chosen\": \" c\"}\n",
    );
    let dp = "sample --model {model} --prompts {in} --output {out} --setting DP";
    let err = fails(&argv(dp, &[("in", &pairs), ("out", &out)]));
    assert!(
        err.contains("bad.jsonl:2") && err.contains("rejected"),
        "{err}"
    );
    assert!(!out.exists());
    let greedy =
        "sample --model {model} --prompts {in} --output {out} --strategy greedy --max-new-tokens 4";
    let queries = dir.write(
        "q.jsonl",
        "{\"query\": \"a\"}\n{\"query\": \"b\"}\n{\"text\": \"c\"}\n",
    );
    let err = fails(&argv(greedy, &[("in", &queries), ("out", &out)]));
    assert!(err.contains("q.jsonl:3") && err.contains("query"), "{err}");
    assert!(!out.exists());
    // An existing output is left alone too.
    fs::write(&out, "keep me\n").unwrap();
    let broken = dir.write("json.jsonl", "{\"query\": \"a\"}\n{\"query\": \"b\"\n");
    let err = fails(&argv(greedy, &[("in", &broken), ("out", &out)]));
    assert!(
        err.contains("json.jsonl:2") && err.contains("invalid JSON"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&out).unwrap(), "keep me\n");
    // --skip-invalid goes on without the bad record.
    let mut args = argv(greedy, &[("in", &broken), ("out", &out)]);
    args.push("--skip-invalid".into());
    let log = ok(&args);
    assert!(log.contains("1 invalid skipped"), "{log}");
    assert_eq!(records(&out).len(), 1);
}

/// DP records of the HH prompts from the local model, in `dir/records.jsonl`.
fn dp_records(dir: &TempDir) -> PathBuf {
    let out = dir.path("records.jsonl");
    ok(&argv(
        "sample --model {model} --prompts {hh} --output {out} --setting DP --max-new-tokens 8",
        &[("out", &out)],
    ));
    out
}

#[test]
fn sample_endpoint_appends_endpoint_responses() {
    let dir = TempDir::new("endpoint");
    let out = dp_records(&dir);
    let before = records(&out);
    let server = TestServer::start(|req, _| openai_reply(req, "ep"));
    let url = PathBuf::from(&server.url);
    let endpoint = "sample --endpoint {url} --endpoint-model tiny-chat --prompts {hh} --output {out} --append \
                    --num-responses 2";
    let mut args = argv(endpoint, &[("url", &url), ("out", &out)]);
    args.extend(argv(
        "--temperature 0.7 --top-p 0.9 --concurrency 2 --timeout-ms 5000",
        &[],
    ));
    let log = ok(&args);
    assert!(log.contains("8 generated + 0 provided"), "{log}");
    assert!(log.contains("endpoint: 4 requests, 0 retries"), "{log}");
    let after = records(&out);
    assert_eq!(after.len(), 4);
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a["query"], b["query"]);
        let responses = strs(&a["responses"]);
        let sources = strs(&a["sources"]);
        assert_eq!(responses.len(), 8);
        assert_eq!(&responses[..6], &strs(&b["responses"])[..]);
        assert_eq!(&sources[6..], ["endpoint:tiny-chat", "endpoint:tiny-chat"]);
        assert!(
            responses[6].starts_with("ep 0: ") && responses[7].starts_with("ep 1: "),
            "{responses:?}"
        );
        assert!(a["scores"].is_null());
    }
    assert_eq!(
        strs(&after[0]["responses"])[6],
        "ep 0: What is a good name for a cat?"
    );
    // The HH transcript went as chat turns; sampling parameters and stops were passed through.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    let first = reqs
        .iter()
        .map(|r| r.json())
        .find(|v| v["messages"][0]["content"] == "What is a good name for a cat?")
        .expect("the first prompt was asked");
    assert_eq!(
        first["messages"],
        json!([{"role": "user", "content": "What is a good name for a cat?"}])
    );
    assert_eq!(first["n"], 2);
    assert_eq!(first["temperature"], 0.7);
    assert_eq!(first["top_p"], 0.9);
    assert_eq!(first["model"], "tiny-chat");
    assert_eq!(first["stop"], json!(["Human:", "Assistant:"]));

    // --resume --append: every record already has this endpoint's responses, so nothing is asked.
    let mut args = argv(endpoint, &[("url", &url), ("out", &out)]);
    args.push("--resume".into());
    let log = ok(&args);
    assert!(log.contains("sampled 0 of 4 prompts (4 already"), "{log}");
    assert_eq!(server.requests().len(), 4);
    assert_eq!(records(&out), after);
}

#[test]
fn sample_endpoint_failure_keeps_what_was_written() {
    let dir = TempDir::new("endpoint-fail");
    let out = dp_records(&dir);
    let before = records(&out);
    // The first prompt is answered; the second gets a 500, then a reply slower than the timeout.
    let server = TestServer::start(|req, i| match i {
        0 => openai_reply(req, "ep"),
        1 => Reply::status(500, "{\"error\": \"boom\"}"),
        _ => openai_reply(req, "late").after(Duration::from_millis(400)),
    });
    let healthy = TestServer::start(|req, _| openai_reply(req, "ep"));
    let run = "sample --endpoint {url} --endpoint-model tiny-chat --prompts {hh} --output {out} --append \
               --num-responses 1 --concurrency 1 --batch-prompts 1 --backoff-ms 1 --timeout-ms 100 --retries 1";
    let url = PathBuf::from(&server.url);
    let err = fails(&argv(run, &[("url", &url), ("out", &out)]));
    assert!(
        err.contains("prompt 2") && err.contains("no reply within"),
        "{err}"
    );
    assert!(err.contains("rerun with --resume --append"), "{err}");
    // One good request, then a 500 and a timeout (the retry) for prompt 2.
    assert_eq!(server.requests().len(), 3);
    let mid = records(&out);
    assert_eq!(mid.len(), 4);
    assert_eq!(strs(&mid[0]["responses"]).len(), 7);
    assert_eq!(
        strs(&mid[0]["sources"]).last().unwrap(),
        "endpoint:tiny-chat"
    );
    assert_eq!(
        &mid[1..],
        &before[1..],
        "records after the failure are untouched"
    );

    // Resuming against a healthy server finishes the other three without asking the first again.
    let url = PathBuf::from(&healthy.url);
    let mut args = argv(run, &[("url", &url), ("out", &out)]);
    args.push("--resume".into());
    let log = ok(&args);
    assert!(log.contains("sampled 3 of 4 prompts (1 already"), "{log}");
    assert_eq!(healthy.requests().len(), 3);
    for r in records(&out) {
        let sources = strs(&r["sources"]);
        assert_eq!(sources.len(), 7);
        let n = sources
            .iter()
            .filter(|s| *s == "endpoint:tiny-chat")
            .count();
        assert_eq!(n, 1);
    }
}

#[test]
fn sample_endpoint_that_ignores_n_is_asked_again() {
    let dir = TempDir::new("endpoint-n");
    let prompts = dir.write("q.jsonl", "{\"query\": \"one\"}\n{\"query\": \"two\"}\n");
    let out = dir.path("out.jsonl");
    // Like servers that ignore `n`: always one choice.
    let server = TestServer::start(|req, _| {
        let mut one = req.clone();
        let mut v = one.json();
        v["n"] = json!(1);
        one.body = v.to_string();
        openai_reply(&one, "once")
    });
    let url = PathBuf::from(&server.url);
    let log = ok(&argv(
        "sample --endpoint {url} --endpoint-model m --endpoint-api completions --prompts {in} --output {out} \
         --num-responses 3 --concurrency 2",
        &[("url", &url), ("in", &prompts), ("out", &out)],
    ));
    assert!(log.contains("6 generated + 0 provided"), "{log}");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 6);
    assert!(reqs.iter().all(|r| r.path == "/v1/completions"));
    let mut asked: Vec<u64> = reqs
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    asked.sort();
    assert_eq!(asked, [1, 1, 2, 2, 3, 3]);
    let recs = records(&out);
    assert_eq!(strs(&recs[1]["responses"]), ["once 0: two"; 3]);
    assert_eq!(strs(&recs[1]["sources"]), ["endpoint:m"; 3]);
}

#[test]
fn responses_cut_at_the_token_budget_are_marked_and_train_without_eos() {
    let dir = TempDir::new("finish");
    let q = dir.write(
        "q.jsonl",
        "{\"query\": \"a\"}\n{\"query\": \"b\"}\n{\"query\": \"c\"}\n",
    );
    let (plain, stopped) = (dir.path("plain.jsonl"), dir.path("stopped.jsonl"));
    let greedy = "sample --model {model} --prompts {in} --output {out} --strategy greedy --max-new-tokens 40";
    ok(&argv(greedy, &[("in", &q), ("out", &plain)]));
    ok(&argv(
        &format!("{greedy} --stop Assistant"),
        &[("in", &q), ("out", &stopped)],
    ));
    // The random fixture model never emits EOS: without a stop string every response runs into the budget.
    for r in records(&plain) {
        assert_eq!(strs(&r["finish_reasons"]), ["length"], "{r}");
    }
    let (mut cut, mut unfinished) = (0, 0);
    for (p, s) in records(&plain).iter().zip(records(&stopped)) {
        let full = p["responses"][0].as_str().unwrap();
        let got = s["responses"][0].as_str().unwrap();
        if s.get("finish_reasons").is_none() {
            // Complete: it ended at the stop string, so the field is left out (all responses `stop`).
            assert!(
                full.starts_with(got) && full[got.len()..].trim_start().starts_with("Assistant"),
                "{full:?} / {got:?}"
            );
            cut += 1;
        } else {
            assert_eq!(strs(&s["finish_reasons"]), ["length"]);
            assert_eq!(full, got);
            unfinished += 1;
        }
    }
    assert!(
        cut > 0 && unfinished > 0,
        "both kinds: {cut} cut, {unfinished} unfinished"
    );

    // Training appends EOS to complete responses only.
    let m = rrhf::model::load_model(
        &fixtures().join("models/llama"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let opts = rrhf::data::tokenize::TokenizeOptions::new(512, None).unwrap();
    let read = rrhf::data::readers::read_records(
        &stopped,
        &rrhf::data::readers::ReadOptions {
            require_scores: false,
            ..Default::default()
        },
    )
    .unwrap();
    for rec in &read.records {
        let t = rrhf::data::tokenize::tokenize_record(&m.tokenizer, rec, &opts).unwrap();
        let ends_in_eos = t.responses[0].last() == Some(&m.tokenizer.eos_id);
        assert_eq!(ends_in_eos, !rec.unfinished(0), "{rec:?}");
    }
}

#[test]
fn decode_dtype_bf16_samples_a_llama_and_refuses_other_architectures() {
    let dir = TempDir::new("decode-bf16");
    let q = dir.write("q.jsonl", "{\"query\": \"a\"}\n{\"query\": \"b\"}\n");
    let out = dir.path("s.jsonl");
    let greedy = "sample --model {model} --prompts {in} --output {out} --strategy greedy --max-new-tokens 6 \
                  --decode-dtype bf16";
    ok(&argv(greedy, &[("in", &q), ("out", &out)]));
    assert_eq!(records(&out).len(), 2);
    let gpt2 = fixtures().join("models/gpt2");
    let out2 = dir.path("g.jsonl");
    let err = fails(&argv(
        "sample --model {m} --prompts {in} --output {out} --strategy greedy --max-new-tokens 6 --decode-dtype bf16",
        &[("m", &gpt2), ("in", &q), ("out", &out2)],
    ));
    assert!(err.contains("LLaMA-architecture"), "{err}");
    assert!(!out2.exists());
}

#[test]
fn endpoint_choices_cut_at_max_tokens_are_marked_length() {
    let dir = TempDir::new("endpoint-finish");
    let out = dir.path("ep.jsonl");
    let q = dir.write("q.jsonl", "{\"query\": \"a\"}\n");
    let server = TestServer::start(|_, _| {
        Reply::json(json!({
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "cut"}, "finish_reason": "length"},
                {"index": 1, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"},
            ]
        }))
    });
    let url = PathBuf::from(&server.url);
    let log = ok(&argv(
        "sample --endpoint {url} --endpoint-model m --prompts {in} --output {out} --num-responses 2",
        &[("url", &url), ("in", &q), ("out", &out)],
    ));
    assert!(log.contains("1 at the token budget"), "{log}");
    let r = &records(&out)[0];
    assert_eq!(strs(&r["responses"]), ["cut", "done"]);
    assert_eq!(strs(&r["finish_reasons"]), ["length", "stop"]);
}
