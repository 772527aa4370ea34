//! One parsed row (a JSON object, or a Parquet row turned into one) → a [`Record`], per input format.

use serde_json::{Map, Value};

use super::{alpaca_prompt, InputFormat, PromptTemplate, ReadOptions};
use crate::data::record::{FinishReason, Record};

/// A problem with one record: the field (a path such as `scores[1]`) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Bad {
    pub field: Option<String>,
    pub msg: String,
}

impl Bad {
    pub fn at(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Bad {
            field: Some(field.into()),
            msg: msg.into(),
        }
    }

    pub fn whole(msg: impl Into<String>) -> Self {
        Bad {
            field: None,
            msg: msg.into(),
        }
    }
}

/// The format whose fields these are, if any (`Auto`'s per-file decision).
pub(super) fn detect(names: &[&str]) -> Option<InputFormat> {
    let has = |n: &str| names.contains(&n);
    if has("responses") || has("query") {
        Some(InputFormat::Rrhf)
    } else if has("prompt") && (has("chosen") || has("rejected")) {
        Some(InputFormat::Pairwise)
    } else if has("chosen") || has("rejected") {
        Some(InputFormat::HhRaw)
    } else if has("instruction") {
        Some(InputFormat::Alpaca)
    } else {
        None
    }
}

/// The error text when [`detect`] finds no format.
pub(super) fn undetectable(what: &str, names: &[&str]) -> String {
    format!(
        "cannot tell the input format from the {what} ({}): expected query/responses/scores (rrhf), \
         prompt/chosen/rejected (pairwise), chosen/rejected (hh) or instruction/input/output (alpaca); \
         pass the format explicitly",
        names.join(", ")
    )
}

/// JSON type name, for messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn found(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 20 => format!("a string {s:?}"),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => format!("the bool {b}"),
        other => kind(other).to_string(),
    }
}

fn req_str(obj: &Map<String, Value>, key: &str) -> Result<String, Bad> {
    match obj.get(key) {
        None => Err(Bad::at(key, format!("missing field `{key}`"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(Bad::at(
            key,
            format!("expected a string, found {}", found(v)),
        )),
    }
}

/// An optional string: absent or null is "".
fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<String, Bad> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(Bad::at(
            key,
            format!("expected a string, found {}", found(v)),
        )),
    }
}

fn str_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, Bad> {
    let items = match obj.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(Bad::at(
                key,
                format!("expected a list of strings, found {}", found(v)),
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            v => Err(Bad::at(
                format!("{key}[{i}]"),
                format!("expected a string, found {}", found(v)),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Turns one parsed row of a known format into a record (template applied).
pub(super) fn to_record(v: &Value, format: InputFormat, opts: &ReadOptions) -> Result<Record, Bad> {
    let obj = match v {
        Value::Object(o) => o,
        other => {
            return Err(Bad::whole(format!(
                "expected a JSON object, found {}",
                kind(other)
            )))
        }
    };
    let mut rec = match format {
        InputFormat::Rrhf | InputFormat::Auto => rrhf(obj, opts.require_scores)?,
        InputFormat::Pairwise => pairwise(obj)?,
        InputFormat::HhRaw => hh_raw(obj)?,
        InputFormat::Alpaca => return alpaca(obj),
    };
    if opts.prompt_template == PromptTemplate::Alpaca {
        rec.query = alpaca_prompt(&rec.query, "");
    }
    Ok(rec)
}

fn rrhf(obj: &Map<String, Value>, require_scores: bool) -> Result<Record, Bad> {
    let query = req_str(obj, "query")?;
    let responses = match str_list(obj, "responses")? {
        Some(r) => r,
        None if obj.contains_key("responses") => {
            return Err(Bad::at(
                "responses",
                "expected a list of strings, found null",
            ))
        }
        None => return Err(Bad::at("responses", "missing field `responses`")),
    };
    if responses.is_empty() {
        return Err(Bad::at(
            "responses",
            "zero responses: a record needs at least one",
        ));
    }
    let scores = match obj.get("scores") {
        None | Some(Value::Null) if require_scores => {
            return Err(Bad::at("scores", "unscored record: run `rrhf score` first"))
        }
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            if items.len() != responses.len() {
                return Err(Bad::at(
                    "scores",
                    format!(
                        "{} scores for {} responses: len(scores) must equal len(responses)",
                        items.len(),
                        responses.len()
                    ),
                ));
            }
            let mut s = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                s.push(score(item).map_err(|m| Bad::at(format!("scores[{i}]"), m))?);
            }
            Some(s)
        }
        Some(v) => {
            return Err(Bad::at(
                "scores",
                format!("expected a list of numbers or null, found {}", found(v)),
            ))
        }
    };
    let sources = str_list(obj, "sources")?;
    if let Some(src) = &sources {
        if src.len() != responses.len() {
            return Err(Bad::at(
                "sources",
                format!(
                    "{} sources for {} responses: len(sources) must equal len(responses)",
                    src.len(),
                    responses.len()
                ),
            ));
        }
    }
    let finish_reasons = match str_list(obj, "finish_reasons")? {
        None => None,
        Some(list) => {
            if list.len() != responses.len() {
                return Err(Bad::at(
                    "finish_reasons",
                    format!(
                        "{} finish reasons for {} responses: len(finish_reasons) must equal len(responses)",
                        list.len(),
                        responses.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                out.push(FinishReason::parse(s).ok_or_else(|| {
                    Bad::at(
                        format!("finish_reasons[{i}]"),
                        format!("`{s}` is not a finish reason: expected \"stop\" or \"length\""),
                    )
                })?);
            }
            Some(out)
        }
    };
    Ok(Record {
        query,
        responses,
        scores,
        sources,
        finish_reasons,
    })
}

fn score(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(format!("score {n} is not a finite number")),
        },
        Value::Null => Err("null score: every response needs a finite number \
                            (serde_json writes NaN as null)"
            .into()),
        other => Err(format!("expected a number, found {}", found(other))),
    }
}

fn labelled(query: String, chosen: String, rejected: String) -> Record {
    Record {
        query,
        responses: vec![chosen, rejected],
        scores: Some(vec![1.0, 0.0]),
        sources: Some(vec!["dataset:chosen".into(), "dataset:rejected".into()]),
        finish_reasons: None,
    }
}

fn pairwise(obj: &Map<String, Value>) -> Result<Record, Bad> {
    let prompt = req_str(obj, "prompt")?;
    let chosen = req_str(obj, "chosen")?;
    let rejected = req_str(obj, "rejected")?;
    Ok(labelled(prompt, chosen, rejected))
}

/// The turn marker hh-rlhf transcripts are split at.
pub(super) const ASSISTANT: &str = "\n\nAssistant:";

/// Splits hh-rlhf raw transcripts: the query is `chosen` up to and including its last `"\n\nAssistant:"`,
/// which `rejected` must share.
pub(super) fn split_hh(chosen: &str, rejected: &str) -> Result<(String, String, String), Bad> {
    let Some(at) = chosen.rfind(ASSISTANT) else {
        return Err(Bad::at(
            "chosen",
            "no \"\\n\\nAssistant:\" turn in the transcript",
        ));
    };
    let query = &chosen[..at + ASSISTANT.len()];
    if !rejected.starts_with(query) {
        return Err(Bad::at(
            "rejected",
            "does not share the conversation of `chosen` up to its last \"\\n\\nAssistant:\" \
             (the two transcripts must differ only in the final assistant turn)",
        ));
    }
    Ok((
        query.to_string(),
        chosen[query.len()..].to_string(),
        rejected[query.len()..].to_string(),
    ))
}

fn hh_raw(obj: &Map<String, Value>) -> Result<Record, Bad> {
    let chosen = req_str(obj, "chosen")?;
    let rejected = req_str(obj, "rejected")?;
    let (query, c, r) = split_hh(&chosen, &rejected)?;
    Ok(labelled(query, c, r))
}

fn alpaca(obj: &Map<String, Value>) -> Result<Record, Bad> {
    let instruction = req_str(obj, "instruction")?;
    let input = opt_str(obj, "input")?;
    let output = req_str(obj, "output")?;
    Ok(Record {
        query: alpaca_prompt(&instruction, &input),
        responses: vec![output],
        scores: Some(vec![1.0]),
        sources: Some(vec!["dataset:output".into()]),
        finish_reasons: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(require_scores: bool) -> ReadOptions {
        ReadOptions {
            require_scores,
            ..ReadOptions::default()
        }
    }

    fn bad(v: Value, format: InputFormat) -> Bad {
        to_record(&v, format, &opts(true)).unwrap_err()
    }

    #[test]
    fn detects_formats_from_field_names() {
        let d = detect;
        assert_eq!(
            d(&["query", "responses", "scores"]),
            Some(InputFormat::Rrhf)
        );
        assert_eq!(
            d(&["prompt", "response", "chosen", "rejected"]),
            Some(InputFormat::Pairwise)
        );
        assert_eq!(d(&["chosen", "rejected"]), Some(InputFormat::HhRaw));
        assert_eq!(
            d(&["instruction", "input", "output"]),
            Some(InputFormat::Alpaca)
        );
        assert_eq!(d(&["text"]), None);
    }

    #[test]
    fn rrhf_record_reads() {
        let v = json!({"query": "q", "responses": ["a", ""], "scores": [1, -0.5], "extra": 3});
        let r = to_record(&v, InputFormat::Rrhf, &opts(true)).unwrap();
        assert_eq!(r.query, "q");
        assert_eq!(r.responses, vec!["a", ""]);
        assert_eq!(r.scores, Some(vec![1.0, -0.5]));
        assert_eq!(r.sources, None);
    }

    #[test]
    fn rrhf_scores_are_checked() {
        let b = bad(
            json!({"query": "q", "responses": ["a", "b"], "scores": [1.0]}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("scores"));
        assert!(b.msg.contains("1 scores for 2 responses"), "{}", b.msg);
        for (s, needle) in [
            (json!("1.0"), "a string"),
            (json!(null), "null score"),
            (json!(true), "bool"),
        ] {
            let b = bad(
                json!({"query": "q", "responses": ["a", "b"], "scores": [0.5, s]}),
                InputFormat::Rrhf,
            );
            assert_eq!(b.field.as_deref(), Some("scores[1]"));
            assert!(b.msg.contains(needle), "{}", b.msg);
        }
        let b = bad(
            json!({"query": "q", "responses": ["a"], "scores": 1.0}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("scores"));
    }

    #[test]
    fn rrhf_unscored_depends_on_require_scores() {
        for v in [
            json!({"query": "q", "responses": ["a"]}),
            json!({"query": "q", "responses": ["a"], "scores": null}),
        ] {
            let b = to_record(&v, InputFormat::Rrhf, &opts(true)).unwrap_err();
            assert_eq!(b.field.as_deref(), Some("scores"));
            assert!(b.msg.contains("unscored record: run `rrhf score` first"));
            assert_eq!(
                to_record(&v, InputFormat::Rrhf, &opts(false))
                    .unwrap()
                    .scores,
                None
            );
        }
    }

    #[test]
    fn rrhf_structure_is_checked() {
        let b = bad(
            json!({"query": "q", "responses": [], "scores": []}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("responses"));
        assert!(b.msg.contains("zero responses"));
        let b = bad(
            json!({"responses": ["a"], "scores": [1]}),
            InputFormat::Rrhf,
        );
        assert_eq!(
            (b.field.as_deref(), b.msg.as_str()),
            (Some("query"), "missing field `query`")
        );
        let b = bad(
            json!({"query": "q", "responses": ["a", 3], "scores": [1, 2]}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("responses[1]"));
        let b = bad(
            json!({"query": "q", "responses": ["a"], "scores": [1], "sources": ["x", "y"]}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("sources"));
        let b = bad(
            json!({"query": "q", "responses": ["a", "b"], "scores": [1, 0], "finish_reasons": ["stop"]}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("finish_reasons"));
        let b = bad(
            json!({"query": "q", "responses": ["a", "b"], "scores": [1, 0], "finish_reasons": ["stop", "eos"]}),
            InputFormat::Rrhf,
        );
        assert_eq!(b.field.as_deref(), Some("finish_reasons[1]"));
        assert!(b.msg.contains("`eos`"), "{}", b.msg);
        let r = to_record(
            &json!({"query": "q", "responses": ["a", "b"], "finish_reasons": ["stop", "length"]}),
            InputFormat::Rrhf,
            &opts(false),
        )
        .unwrap();
        assert!(!r.unfinished(0) && r.unfinished(1));
        let b = bad(json!(["q"]), InputFormat::Rrhf);
        assert_eq!(b.field, None);
        assert!(b.msg.contains("expected a JSON object"));
    }

    #[test]
    fn pairwise_keeps_texts_verbatim() {
        let v = json!({"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "x", "chosen": " Hello!", "rejected": " Go away."});
        let r = to_record(&v, InputFormat::Pairwise, &opts(true)).unwrap();
        assert_eq!(r.query, "\n\nHuman: hi\n\nAssistant:");
        assert_eq!(r.responses, vec![" Hello!", " Go away."]);
        assert_eq!(r.scores, Some(vec![1.0, 0.0]));
        assert_eq!(
            r.sources,
            Some(vec![
                "dataset:chosen".to_string(),
                "dataset:rejected".to_string()
            ])
        );
        let b = bad(json!({"prompt": "p", "chosen": "c"}), InputFormat::Pairwise);
        assert_eq!(b.field.as_deref(), Some("rejected"));
    }

    #[test]
    fn hh_splits_at_the_last_assistant_turn() {
        let chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good";
        let rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad";
        let (q, c, r) = split_hh(chosen, rejected).unwrap();
        assert_eq!(q, "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:");
        assert_eq!((c.as_str(), r.as_str()), (" good", " bad"));
        let b = split_hh(chosen, "\n\nHuman: x\n\nAssistant: bad").unwrap_err();
        assert_eq!(b.field.as_deref(), Some("rejected"));
        assert!(b.msg.contains("does not share"));
        let b = split_hh("\n\nHuman: only", "\n\nHuman: only").unwrap_err();
        assert_eq!(b.field.as_deref(), Some("chosen"));
        // An empty final turn is fine.
        let (_, c, _) = split_hh(
            "\n\nHuman: a\n\nAssistant:",
            "\n\nHuman: a\n\nAssistant: no",
        )
        .unwrap();
        assert_eq!(c, "");
    }

    #[test]
    fn alpaca_rows_use_the_template() {
        let v = json!({"instruction": "Add.", "input": "1 2", "output": "3"});
        let r = to_record(&v, InputFormat::Alpaca, &opts(true)).unwrap();
        assert_eq!(r.query, alpaca_prompt("Add.", "1 2"));
        assert_eq!(r.responses, vec!["3"]);
        assert_eq!(r.scores, Some(vec![1.0]));
        assert_eq!(r.sources, Some(vec!["dataset:output".to_string()]));
        let v = json!({"instruction": "Hi.", "output": ""});
        let r = to_record(&v, InputFormat::Alpaca, &opts(true)).unwrap();
        assert_eq!(r.query, alpaca_prompt("Hi.", ""));
        // The template option does not apply twice.
        let o = ReadOptions {
            prompt_template: PromptTemplate::Alpaca,
            ..ReadOptions::default()
        };
        assert_eq!(
            to_record(&v, InputFormat::Alpaca, &o).unwrap().query,
            alpaca_prompt("Hi.", "")
        );
        let b = bad(json!({"instruction": "x"}), InputFormat::Alpaca);
        assert_eq!(b.field.as_deref(), Some("output"));
    }

    #[test]
    fn prompt_template_wraps_queries() {
        let o = ReadOptions {
            prompt_template: PromptTemplate::Alpaca,
            ..ReadOptions::default()
        };
        let v = json!({"query": "Say hi.", "responses": ["hi"], "scores": [1]});
        assert_eq!(
            to_record(&v, InputFormat::Rrhf, &o).unwrap().query,
            alpaca_prompt("Say hi.", "")
        );
    }
}
