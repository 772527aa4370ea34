//! `rrhf score` against references: reward models of each class against transformers (fixtures from
//! tools/make_score_fixtures.py), VADER against vaderSentiment 3.3.2, the KL term and p_i against log-probs computed
//! independently, and the LLM judge against a real HTTP server on 127.0.0.1 (well-formed, malformed and partial
//! replies, retries, resume).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use rrhf::data::readers::{read_records, write_records, InputFormat, ReadOptions};
use rrhf::data::Record;
use rrhf::model::{Input, Labels};
use rrhf::score::{score, RewardSpec, ScoreConfig, ScoreError, ScoreOn};
use serde_json::Value;

use crate::common::{fixtures, load, temp_dir};

fn score_dir() -> PathBuf {
    fixtures().join("score")
}

fn rewards_json() -> Value {
    serde_json::from_str(&fs::read_to_string(score_dir().join("rewards.json")).unwrap()).unwrap()
}

fn read_out(path: &Path) -> Vec<Record> {
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

/// A fixture model's records (unscored), the rewards transformers computed, and the input ids of each response.
type Fixture = (Vec<Record>, Vec<Vec<f64>>, Vec<Vec<Vec<u32>>>);

fn fixture_records(m: &Value) -> Fixture {
    let mut recs = Vec::new();
    let mut want = Vec::new();
    let mut ids = Vec::new();
    for r in m["records"].as_array().unwrap() {
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        recs.push(Record {
            query: r["query"].as_str().unwrap().to_string(),
            responses: strs(&r["responses"]),
            scores: None,
            sources: r.get("sources").map(strs),
            finish_reasons: None,
        });
        want.push(
            r["rewards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
        );
        ids.push(serde_json::from_value(r["ids"].clone()).unwrap());
    }
    (recs, want, ids)
}

fn assert_scores(name: &str, got: &[Record], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g
            .scores
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: record {i} unscored"));
        assert_eq!(g.len(), w.len(), "{name}: record {i}");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4,
                "{name}: record {i} response {j}: {a} vs transformers {b}"
            );
        }
    }
}

/// Runs `score` for one fixture model with its text layout; `path` overrides the model path.
fn run_model(
    name: &str,
    m: &Value,
    dir: &Path,
    path: Option<PathBuf>,
    tweak: impl Fn(&mut ScoreConfig),
) -> Vec<Record> {
    let (recs, _, _) = fixture_records(m);
    let data = dir.join(format!("{name}.in.jsonl"));
    write_records(&data, &recs).unwrap();
    let out = dir.join(format!("{name}.out.jsonl"));
    let model = path.unwrap_or_else(|| score_dir().join("models").join(name));
    let mut cfg = ScoreConfig::new(data, out.clone(), RewardSpec::Model(model));
    cfg.reward_args.batch_size = 3; // rows of different lengths in one batch: padding
    if m["append_eos"].as_bool().unwrap() && m["kind"] != "gptj_rm" {
        cfg.reward_args.rm_append_eos = true;
    }
    if let Some(l) = m.get("label").and_then(Value::as_str) {
        cfg.reward_args.label = Some(l.to_string());
    }
    tweak(&mut cfg);
    let s = score(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(s.unscored, 0, "{name}");
    read_out(&out)
}

#[test]
fn reward_models_match_transformers() {
    let fx = rewards_json();
    let dir = temp_dir();
    let models = fx["models"].as_object().unwrap();
    assert_eq!(models.len(), 6);
    for (name, m) in models {
        let (_, want, want_ids) = fixture_records(m);
        // Inputs: the ids transformers' tokenizer gives (incl. truncation, BOS, EOS).
        let rm = rrhf::model::reward::load_reward_model(
            &score_dir().join("models").join(name),
            &Default::default(),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let scorer = rrhf::score::reward_model::ModelScorer::new(
            rm,
            m.get("label").and_then(Value::as_str),
            None,
            None,
            m["append_eos"].as_bool().unwrap(),
            4,
        )
        .unwrap();
        let (recs, _, _) = fixture_records(m);
        for (r, ids) in recs.iter().zip(&want_ids) {
            for (resp, want) in r.responses.iter().zip(ids) {
                assert_eq!(&scorer.encode(&r.query, resp).unwrap(), want, "{name}");
            }
        }
        let got = run_model(name, m, &dir, None, |_| {});
        assert_scores(name, &got, &want);
    }
}

#[test]
fn gptj_reward_model_reads_the_pytorch_pickle() {
    let fx = rewards_json();
    let m = &fx["models"]["gptj_rm"];
    let (_, want, _) = fixture_records(m);
    let dir = temp_dir();
    let src = score_dir().join("models/gptj_rm");
    // The .pt named directly: config and tokenizer from beside it.
    let got = run_model("gptj_rm", m, &dir, Some(src.join("gptj_rm.pt")), |_| {});
    assert_scores("gptj_rm (.pt)", &got, &want);
    // The .pt alone in a directory (as Dahoas ships it): config and tokenizer from explicit paths.
    let alone = dir.join("dahoas");
    fs::create_dir_all(&alone).unwrap();
    fs::copy(src.join("gptj_rm.pt"), alone.join("hf_ckpt.pt")).unwrap();
    let got = run_model("gptj_rm", m, &dir, Some(alone.clone()), |c| {
        c.reward_args.rm_config = Some(src.join("config.json"));
        c.reward_args.rm_tokenizer = Some(src.join("tokenizer.json"));
    });
    assert_scores("gptj_rm (.pt + --rm-config/--rm-tokenizer)", &got, &want);
    // Without a config the error names the flag.
    let (recs, _, _) = fixture_records(m);
    let data = dir.join("x.jsonl");
    write_records(&data, &recs).unwrap();
    let cfg = ScoreConfig::new(data, dir.join("y.jsonl"), RewardSpec::Model(alone));
    let e = score(&cfg).unwrap_err().to_string();
    assert!(e.contains("--rm-config"), "{e}");
}

#[test]
fn classifier_needs_a_known_label() {
    let fx = rewards_json();
    let dir = temp_dir();
    let m = &fx["models"]["distilbert_cls"];
    let (recs, _, _) = fixture_records(m);
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let mut cfg = ScoreConfig::new(
        data,
        dir.join("out.jsonl"),
        RewardSpec::Model(score_dir().join("models/distilbert_cls")),
    );
    let e = score(&cfg).unwrap_err().to_string();
    assert!(e.contains("--label") && e.contains("POSITIVE"), "{e}");
    cfg.reward_args.label = Some("happy".into());
    let e = score(&cfg).unwrap_err().to_string();
    assert!(e.contains("happy") && e.contains("NEGATIVE"), "{e}");
    // By index and by case-insensitive name: the same rewards.
    cfg.reward_args.label = Some("1".into());
    score(&cfg).unwrap();
    let a = read_out(&dir.join("out.jsonl"));
    cfg.reward_args.label = Some("positive".into());
    score(&cfg).unwrap();
    assert_eq!(a, read_out(&dir.join("out.jsonl")));
}

#[test]
fn statistics_per_source() {
    let fx = rewards_json();
    let dir = temp_dir();
    let m = &fx["models"]["llama_rm"];
    let (recs, want, _) = fixture_records(m);
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let mut cfg = ScoreConfig::new(
        data,
        dir.join("out.jsonl"),
        RewardSpec::Model(score_dir().join("models/llama_rm")),
    );
    cfg.stats_output = Some(dir.join("stats.json"));
    let s = score(&cfg).unwrap();
    let all: Vec<f64> = want.iter().flatten().copied().collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let max = want
        .iter()
        .map(|r| r.iter().copied().fold(f64::MIN, f64::max))
        .sum::<f64>()
        / want.len() as f64;
    assert_eq!(s.stats[0].group, "all");
    assert!((s.stats[0].mean - mean).abs() < 1e-4);
    assert!((s.stats[0].max - max).abs() < 1e-4);
    let groups: Vec<&str> = s.stats.iter().map(|x| x.group.as_str()).collect();
    assert_eq!(
        groups,
        ["all", "dataset:chosen", "dataset:rejected", "policy:beam"]
    );
    let beam = &s.stats[3];
    assert_eq!((beam.responses, beam.queries), (3, 3));
    assert!((beam.mean - (want[0][0] + want[1][0] + want[2][0]) / 3.0).abs() < 1e-4);
    let report = s.report();
    assert!(
        report.contains("policy:beam") && report.contains("mean"),
        "{report}"
    );
    let json: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(json[0]["group"], "all");
}

#[test]
fn vader_matches_the_reference_implementation() {
    let v: Value =
        serde_json::from_str(&fs::read_to_string(score_dir().join("vader.json")).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = rrhf::score::vader::compound(text);
        let want = c["compound"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12,
            "{text:?}: {got} vs vaderSentiment {want}"
        );
        let rounded = (got * 1e4).round() / 1e4;
        assert!((rounded - c["compound_rounded"].as_f64().unwrap()).abs() < 1e-12);
    }
}

#[test]
fn vader_reward_on_response_or_full_text() {
    let dir = temp_dir();
    let recs = vec![Record {
        query: "I hate waiting, but".into(),
        responses: vec![" this film was wonderful!".into(), " it was awful.".into()],
        scores: None,
        sources: None,
        finish_reasons: None,
    }];
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let out = dir.join("out.jsonl");
    let mut cfg = ScoreConfig::new(data, out.clone(), RewardSpec::Vader);
    score(&cfg).unwrap();
    let got = read_out(&out)[0].scores.clone().unwrap();
    let c = rrhf::score::vader::compound;
    assert_eq!(
        got,
        vec![c(" this film was wonderful!"), c(" it was awful.")]
    );
    assert!(got[0] > 0.5 && got[1] < -0.3, "{got:?}");
    cfg.reward_args.score_on = Some(ScoreOn::Full);
    score(&cfg).unwrap();
    let got = read_out(&out)[0].scores.clone().unwrap();
    assert_eq!(got[0], c("I hate waiting, but this film was wonderful!"));
}

/// Σ log π(response tokens | query) for one unpadded sequence, the tokenisation of the shared contract.
fn seq_logprob(name: &str, query: &str, response: &str) -> (f64, usize) {
    let m = load(name, DType::F32);
    let q = m.tokenizer.encode(query, true).unwrap();
    let mut r = m.tokenizer.encode(response, false).unwrap();
    r.push(m.tokenizer.eos_id);
    let ids: Vec<u32> = q.iter().chain(&r).copied().collect();
    let input =
        Input::causal(std::slice::from_ref(&ids), m.tokenizer.pad_id, &Device::Cpu).unwrap();
    let labels = Labels {
        flat_positions: (q.len() as u32 - 1..ids.len() as u32 - 1).collect(),
        ids: r.clone(),
    };
    let lp = m
        .model
        .label_logprobs(&input, &labels)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (lp.iter().map(|&x| x as f64).sum(), r.len())
}

fn small_records() -> Vec<Record> {
    vec![
        Record {
            query: "\n\nHuman: What is two plus two?\n\nAssistant:".into(),
            responses: vec![" Two plus two is four.".into(), " Five.".into(), "".into()],
            scores: Some(vec![1.0, -0.5, 0.25]),
            sources: None,
            finish_reasons: None,
        },
        Record {
            query: "The cat sat".into(),
            responses: vec![" on the mat.".into(), " in the park in the morning.".into()],
            scores: Some(vec![0.0, 2.0]),
            sources: None,
            finish_reasons: None,
        },
    ]
}

#[test]
fn kl_penalty_is_the_difference_of_sequence_logprobs() {
    let dir = temp_dir();
    let recs = small_records();
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let out = dir.join("out.jsonl");
    let models = crate::common::fixtures().join("models");
    let mut cfg = ScoreConfig::new(data.clone(), out.clone(), RewardSpec::Labels);
    cfg.kl_coef = Some(0.5);
    cfg.policy = Some(models.join("llama"));
    cfg.reference = Some(models.join("llama_tied"));
    cfg.logprob.batch_queries = 2; // both records in one packed batch
    let s = score(&cfg).unwrap();
    let got = read_out(&out);
    let mut kl_sum = 0.0;
    let mut n = 0;
    for (g, r) in got.iter().zip(&recs) {
        for ((x, resp), label) in g
            .scores
            .as_ref()
            .unwrap()
            .iter()
            .zip(&r.responses)
            .zip(r.scores.as_ref().unwrap())
        {
            let (lp_pi, _) = seq_logprob("llama", &r.query, resp);
            let (lp_ref, _) = seq_logprob("llama_tied", &r.query, resp);
            let want = label - 0.5 * (lp_pi - lp_ref);
            assert!((x - want).abs() < 1e-4, "{x} vs {want}");
            kl_sum += lp_pi - lp_ref;
            n += 1;
        }
    }
    assert!((s.mean_kl.unwrap() - kl_sum / n as f64).abs() < 1e-4);
    // The padded layout gives the same.
    cfg.logprob.layout = rrhf::data::batch::Layout::Padded;
    score(&cfg).unwrap();
    for (a, b) in read_out(&out).iter().zip(&got) {
        for (x, y) in a
            .scores
            .as_ref()
            .unwrap()
            .iter()
            .zip(b.scores.as_ref().unwrap())
        {
            assert!((x - y).abs() < 1e-4);
        }
    }
    // An overflowing penalty is refused.
    let out2 = dir.join("out2.jsonl");
    let mut big = ScoreConfig {
        output: out2.clone(),
        ..cfg.clone()
    };
    big.kl_coef = Some(1e308);
    match score(&big) {
        Err(ScoreError::NonFinite(msg)) => assert!(msg.contains("refusing"), "{msg}"),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    // What was scored before the failing record is kept for --resume; the failing one is not written.
    if out2.exists() {
        assert!(read_out(&out2).iter().any(|r| r.scores.is_none()));
    }
    // Half a KL setup is a flag error.
    let mut half = ScoreConfig::new(data, dir.join("o3.jsonl"), RewardSpec::Labels);
    half.kl_coef = Some(0.1);
    half.policy = Some(models.join("llama"));
    let e = score(&half).unwrap_err().to_string();
    assert!(e.contains("--reference"), "{e}");
}

#[test]
fn policy_reward_is_p_i() {
    let dir = temp_dir();
    let recs = small_records();
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let out = dir.join("out.jsonl");
    let models = crate::common::fixtures().join("models");
    let mut cfg = ScoreConfig::new(data, out.clone(), RewardSpec::Policy(models.join("gpt2")));
    cfg.logprob.length_penalty = 1.0;
    // The fixture GPT-2 embeds 64 positions; a longer --max-len is refused.
    cfg.max_len = 64;
    score(&cfg).unwrap();
    for (g, r) in read_out(&out).iter().zip(&recs) {
        for (x, resp) in g.scores.as_ref().unwrap().iter().zip(&r.responses) {
            let (lp, n) = seq_logprob("gpt2", &r.query, resp);
            assert!((x - lp / n as f64).abs() < 1e-4, "{x} vs {}", lp / n as f64);
        }
    }
}

#[test]
fn labels_keep_the_data_and_unscored_records_are_reported() {
    let dir = temp_dir();
    let mut recs = small_records();
    recs[1].scores = None;
    let data = dir.join("in.jsonl");
    write_records(&data, &recs).unwrap();
    let out = dir.join("out.jsonl");
    let mut cfg = ScoreConfig::new(data, out.clone(), RewardSpec::Labels);
    let s = score(&cfg).unwrap();
    assert_eq!((s.scored, s.unscored), (1, 1));
    assert!(
        s.unscored_examples[0].starts_with("record 2:"),
        "{:?}",
        s.unscored_examples
    );
    let got = read_out(&out);
    assert_eq!(got[0].scores, recs[0].scores);
    assert_eq!(got[1].scores, None);
    cfg.drop_unscored = true;
    score(&cfg).unwrap();
    assert_eq!(read_out(&out).len(), 1);
    // Flags of other reward kinds are refused.
    cfg.reward_args.label = Some("POSITIVE".into());
    assert!(score(&cfg).unwrap_err().to_string().contains("--label"));
}

// ---------------------------------------------------------------------------------------------------------------
// The judge against a real HTTP server.
// ---------------------------------------------------------------------------------------------------------------

/// What the test server answers for a query.
type Reply = Arc<dyn Fn(&str, usize) -> (u16, String) + Send + Sync>;

/// A chat-completions server on 127.0.0.1: answers `connections` requests, then stops. Returns its URL and the
/// count of requests served.
fn judge_server(connections: usize, reply: Reply) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(mut stream) = stream else { continue };
            let reply = reply.clone();
            let count = count.clone();
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let req: Value = serde_json::from_slice(&body).unwrap();
                let prompt = req["messages"][0]["content"].as_str().unwrap().to_string();
                let query = prompt
                    .split("\nQuery: ")
                    .nth(1)
                    .and_then(|s| s.split('\n').next())
                    .unwrap_or("")
                    .to_string();
                let k = prompt.matches("\nResponse ").count();
                count.fetch_add(1, Ordering::SeqCst);
                let (status, content) = reply(&query, k);
                let body = if status == 200 {
                    serde_json::json!({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]})
                    .to_string()
                } else {
                    content
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (url, served)
}

fn good_reply(k: usize) -> String {
    (1..=k)
        .map(|i| {
            format!(
                "Response {i}: Relevance: {}, Correctness: 4, Coherence: 5, Safety: 5",
                (i % 5) + 1
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn judge_records() -> Vec<Record> {
    let rec = |q: &str, k: usize| Record {
        query: q.into(),
        responses: (0..k).map(|i| format!("answer {i}")).collect(),
        scores: None,
        sources: None,
        finish_reasons: None,
    };
    vec![
        rec("good", 3),
        rec("malformed", 2),
        rec("partial", 3),
        rec("error", 2),
    ]
}

fn judge_cfg(dir: &Path, url: &str) -> ScoreConfig {
    let data = dir.join("in.jsonl");
    write_records(&data, &judge_records()).unwrap();
    let mut cfg = ScoreConfig::new(data, dir.join("out.jsonl"), RewardSpec::Judge(url.into()));
    cfg.reward_args.judge_model = Some("judge-test".into());
    cfg.judge_timeout_ms = 5000;
    cfg.judge_retries = 1;
    cfg.judge_backoff_ms = 1;
    cfg.judge_concurrency = 2;
    cfg
}

#[test]
fn judge_scores_well_formed_replies_and_reports_the_rest() {
    let dir = temp_dir();
    let reply: Reply = Arc::new(|q: &str, k: usize| match q {
        "good" => (200, good_reply(k)),
        "malformed" => (200, "I am sorry, I cannot rate these responses.".into()),
        // Only the first response is scored.
        "partial" => (200, good_reply(1)),
        // Always a server error: one try and one retry.
        _ => (500, "{\"error\": \"overloaded\"}".into()),
    });
    // 3 + 2 attempts for the error record.
    let (url, served) = judge_server(5, reply);
    let cfg = judge_cfg(&dir, &url);
    let s = score(&cfg).unwrap();
    assert_eq!(served.load(Ordering::SeqCst), 5);
    assert_eq!((s.scored, s.unscored), (1, 3));
    let ex = s.unscored_examples.join("\n");
    assert!(ex.contains("record 2: unparseable reply"), "{ex}");
    assert!(
        ex.contains("record 3: unparseable reply") && ex.contains("2, 3 of 3"),
        "{ex}"
    );
    assert!(
        ex.contains("record 4: request failed") && ex.contains("500"),
        "{ex}"
    );
    let got = read_out(&cfg.output);
    // Relevance (i % 5) + 1 plus 4 + 5 + 5.
    assert_eq!(got[0].scores, Some(vec![16.0, 17.0, 18.0]));
    assert!(got[1..].iter().all(|r| r.scores.is_none()));

    // Resume against a server that now answers everything: only the three unscored records are asked again.
    let reply: Reply = Arc::new(|_: &str, k: usize| (200, good_reply(k)));
    let (url2, served2) = judge_server(3, reply);
    let mut cfg2 = judge_cfg(&dir, &url2);
    cfg2.resume = true;
    let s = score(&cfg2).unwrap();
    assert_eq!(served2.load(Ordering::SeqCst), 3);
    assert_eq!((s.resumed, s.scored, s.unscored), (1, 4, 0));
    let got = read_out(&cfg2.output);
    assert_eq!(got[1].scores, Some(vec![16.0, 17.0]));
    assert_eq!(got[3].scores, Some(vec![16.0, 17.0]));
}

#[test]
fn judge_needs_a_model_name_and_reachable_key() {
    let dir = temp_dir();
    let mut cfg = judge_cfg(&dir, "http://127.0.0.1:9");
    cfg.reward_args.judge_model = None;
    assert!(score(&cfg)
        .unwrap_err()
        .to_string()
        .contains("--judge-model"));
    cfg.reward_args.judge_model = Some("m".into());
    cfg.reward_args.api_key_env = Some("RRHF_TEST_SURELY_UNSET_KEY".into());
    let e = score(&cfg).unwrap_err().to_string();
    assert!(e.contains("RRHF_TEST_SURELY_UNSET_KEY"), "{e}");
}
