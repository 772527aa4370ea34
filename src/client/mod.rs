//! A blocking client for OpenAI-compatible servers (`/v1/chat/completions`, `/v1/completions`): vLLM, llama.cpp's
//! server, TGI, OpenAI. Timeouts, retries with exponential back-off on 429 / 5xx / timeouts / connection errors,
//! an API key from an environment variable, counters of requests and retries, and bounded concurrency through
//! [`map_concurrent`] (plain threads: the client is `Clone + Send + Sync`).
//!
//! May import: the base modules only.

mod error;
mod pool;
mod prompt;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use error::excerpt;
pub use error::ClientError;
pub use pool::map_concurrent;
pub use prompt::messages_from_prompt;

/// Where and how to reach an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted); `/v1/...` is appended.
    pub url: String,
    /// The `model` field of every request.
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer KEY`.
    pub api_key_env: Option<String>,
    /// Limit of one HTTP exchange (connect, send, the whole reply).
    pub timeout: Duration,
    /// Retries after the first attempt (429, 5xx, timeouts and connection errors only).
    pub max_retries: u32,
    /// Wait before the first retry; doubles with each further one (a `Retry-After` header can lengthen it).
    pub backoff: Duration,
    /// Requests in flight at once (used by callers through [`map_concurrent`]).
    pub concurrency: usize,
}

impl EndpointConfig {
    /// A config with the defaults: no API key, 120 s timeout, 3 retries, 1 s initial back-off, 4 in flight.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        EndpointConfig {
            url: url.into(),
            model: model.into(),
            api_key_env: None,
            timeout: Duration::from_secs(120),
            max_retries: 3,
            backoff: Duration::from_secs(1),
            concurrency: 4,
        }
    }
}

/// Which API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiKind {
    /// `/v1/chat/completions` with `messages`.
    #[default]
    Chat,
    /// `/v1/completions` with a raw `prompt`.
    Completions,
}

impl std::str::FromStr for ApiKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "chat" => Ok(ApiKind::Chat),
            "completions" | "completion" => Ok(ApiKind::Completions),
            _ => Err(format!(
                "unknown endpoint API `{s}` (expected chat or completions)"
            )),
        }
    }
}

impl std::fmt::Display for ApiKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiKind::Chat => "chat",
            ApiKind::Completions => "completions",
        })
    }
}

impl serde::Serialize for ApiKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionParams {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Choices wanted (the server may return fewer: some ignore `n`).
    pub n: usize,
    /// Stop strings (sent only when non-empty; OpenAI accepts at most 4).
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

impl Default for CompletionParams {
    fn default() -> Self {
        CompletionParams {
            max_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            n: 1,
            stop: Vec::new(),
            seed: None,
        }
    }
}

/// Counters of a client (all clones share them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// HTTP attempts made (first tries and retries).
    pub requests: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Calls that failed in the end (after their retries).
    pub failures: u64,
    /// `usage.completion_tokens` summed over successful replies that report it.
    pub completion_tokens: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    completion_tokens: AtomicU64,
}

struct Inner {
    cfg: EndpointConfig,
    /// Base URL without a trailing `/` or `/v1`.
    base: String,
    agent: ureq::Agent,
    api_key: Option<String>,
    counters: Counters,
}

/// A blocking OpenAI-compatible client; cheap to clone (clones share the connection pool and the counters).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.base)
            .field("model", &self.inner.cfg.model)
            .field("api_key", &self.inner.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Longest wait a `Retry-After` header may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One failed attempt: what the final error would be, and whether another attempt may help.
struct Failure {
    error: ClientError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Client {
    /// Checks the URL and reads the API key from `cfg.api_key_env` (an error names the variable if it is unset).
    pub fn new(cfg: EndpointConfig) -> Result<Self, ClientError> {
        let trimmed = cfg.url.trim().trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let config_err = |msg: String| ClientError::Config {
            url: cfg.url.clone(),
            msg,
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(config_err(
                "the endpoint URL must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
                    .into(),
            ));
        }
        if base.starts_with("https://") && !cfg!(feature = "tls") {
            return Err(config_err(
                "https:// endpoints need TLS, which this binary was built without: \
                 rebuild with `cargo build --release --features tls`, or reach the server over http://"
                    .into(),
            ));
        }
        if cfg.model.trim().is_empty() {
            return Err(config_err("the endpoint model name is empty".into()));
        }
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ => {
                    return Err(ClientError::MissingApiKey {
                        url: cfg.url.clone(),
                        var: var.clone(),
                    })
                }
            },
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .max_idle_connections_per_host(cfg.concurrency.max(1) * 2)
            .build()
            .into();
        Ok(Client {
            inner: Arc::new(Inner {
                base,
                agent,
                api_key,
                counters: Counters::default(),
                cfg,
            }),
        })
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &EndpointConfig {
        &self.inner.cfg
    }

    /// The full URL of an API path such as `/v1/chat/completions`.
    pub fn url_of(&self, kind: ApiKind) -> String {
        let path = match kind {
            ApiKind::Chat => "/v1/chat/completions",
            ApiKind::Completions => "/v1/completions",
        };
        format!("{}{path}", self.inner.base)
    }

    /// `n` chat replies (`choices[i].message.content`, in `index` order) to `messages` = `(role, content)` pairs.
    pub fn chat(
        &self,
        messages: &[(String, String)],
        p: &CompletionParams,
    ) -> Result<Vec<String>, ClientError> {
        Ok(texts(self.chat_choices(messages, p)?))
    }

    /// `n` completions (`choices[i].text`, in `index` order) of a raw prompt.
    pub fn complete(&self, prompt: &str, p: &CompletionParams) -> Result<Vec<String>, ClientError> {
        Ok(texts(self.complete_choices(prompt, p)?))
    }

    /// As [`Client::chat`], with each choice's `finish_reason`.
    pub fn chat_choices(
        &self,
        messages: &[(String, String)],
        p: &CompletionParams,
    ) -> Result<Vec<Choice>, ClientError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        let mut body = self.body(p);
        body["messages"] = Value::Array(msgs);
        self.request(ApiKind::Chat, &body)
    }

    /// As [`Client::complete`], with each choice's `finish_reason`.
    pub fn complete_choices(
        &self,
        prompt: &str,
        p: &CompletionParams,
    ) -> Result<Vec<Choice>, ClientError> {
        let mut body = self.body(p);
        body["prompt"] = Value::String(prompt.to_string());
        self.request(ApiKind::Completions, &body)
    }

    /// The counters so far (shared by all clones).
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            completion_tokens: c.completion_tokens.load(Ordering::Relaxed),
        }
    }

    fn body(&self, p: &CompletionParams) -> Value {
        let mut body = json!({
            "model": self.inner.cfg.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": p.n,
        });
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        if let Some(s) = p.seed {
            body["seed"] = json!(s);
        }
        body
    }

    /// Posts `body` with retries and extracts the choices.
    fn request(&self, kind: ApiKind, body: &Value) -> Result<Vec<Choice>, ClientError> {
        let url = self.url_of(kind);
        let c = &self.inner.counters;
        let attempts_max = self.inner.cfg.max_retries.saturating_add(1);
        let mut delay = self.inner.cfg.backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            c.requests.fetch_add(1, Ordering::Relaxed);
            let failure = match self.attempt(&url, body, attempt) {
                Ok(text) => match parse_choices(&url, kind, &text) {
                    Ok((texts, tokens)) => {
                        c.completion_tokens.fetch_add(tokens, Ordering::Relaxed);
                        return Ok(texts);
                    }
                    Err(error) => Failure {
                        error,
                        retryable: false,
                        retry_after: None,
                    },
                },
                Err(f) => f,
            };
            if !failure.retryable || attempt >= attempts_max {
                c.failures.fetch_add(1, Ordering::Relaxed);
                return Err(failure.error);
            }
            c.retries.fetch_add(1, Ordering::Relaxed);
            let wait = match failure.retry_after {
                Some(r) => delay.max(r.min(MAX_RETRY_AFTER)),
                None => delay,
            };
            std::thread::sleep(wait);
            delay = delay.saturating_mul(2);
        }
    }

    /// One HTTP exchange: the body of a 2xx reply, or the failure.
    fn attempt(&self, url: &str, body: &Value, attempt: u32) -> Result<String, Failure> {
        let mut req = self.inner.agent.post(url);
        if let Some(key) = &self.inner.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let timeout = self.inner.cfg.timeout;
        let mut resp = req
            .send_json(body)
            .map_err(|e| transport_failure(url, e, timeout, attempt))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| transport_failure(url, e, timeout, attempt))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(Failure {
            retryable: status == 429 || status >= 500,
            retry_after,
            error: ClientError::Status {
                url: url.to_string(),
                status,
                body: excerpt(&text),
                attempts: attempt,
            },
        })
    }
}

/// Classifies a ureq error: timeouts and connection problems are retried; bad URLs and TLS problems are not.
fn transport_failure(url: &str, e: ureq::Error, timeout: Duration, attempts: u32) -> Failure {
    let url = url.to_string();
    let timed_out = match &e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        _ => false,
    };
    if timed_out {
        return Failure {
            error: ClientError::Timeout {
                url,
                timeout,
                attempts,
            },
            retryable: true,
            retry_after: None,
        };
    }
    let permanent = matches!(
        e,
        ureq::Error::BadUri(_)
            | ureq::Error::Http(_)
            | ureq::Error::Tls(_)
            | ureq::Error::RequireHttpsOnly(_)
            | ureq::Error::InvalidProxyUrl
    );
    if permanent {
        return Failure {
            error: ClientError::Config {
                url,
                msg: e.to_string(),
            },
            retryable: false,
            retry_after: None,
        };
    }
    Failure {
        error: ClientError::Connection {
            url,
            msg: e.to_string(),
            attempts,
        },
        retryable: true,
        retry_after: None,
    }
}

/// One reply of a server: its text and, where the server says, why it ended (`"stop"`, `"length"`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    pub finish_reason: Option<String>,
}

fn texts(choices: Vec<Choice>) -> Vec<String> {
    choices.into_iter().map(|c| c.text).collect()
}

/// The `choices` (in `index` order) and `usage.completion_tokens` (0 when absent).
fn parse_choices(url: &str, kind: ApiKind, text: &str) -> Result<(Vec<Choice>, u64), ClientError> {
    let bad = |field: &str, msg: String| ClientError::Malformed {
        url: url.to_string(),
        field: field.to_string(),
        msg,
        body: excerpt(text),
    };
    let v: Value = serde_json::from_str(text)
        .map_err(|e| bad("(body)", format!("the reply is not JSON ({e})")))?;
    let choices = match v.get("choices") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("choices", "expected a list".into())),
        None => {
            let msg = match v.get("error") {
                Some(err) => format!("no `choices`; the server reported an error: {err}"),
                None => "missing field `choices`".into(),
            };
            return Err(bad("choices", msg));
        }
    };
    if choices.is_empty() {
        return Err(bad("choices", "the list of choices is empty".into()));
    }
    let mut out: Vec<(u64, Choice)> = Vec::with_capacity(choices.len());
    for (i, ch) in choices.iter().enumerate() {
        let (field, got) = match kind {
            ApiKind::Chat => (
                format!("choices[{i}].message.content"),
                ch.get("message").and_then(|m| m.get("content")),
            ),
            ApiKind::Completions => (format!("choices[{i}].text"), ch.get("text")),
        };
        let s = match got {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(bad(
                    &field,
                    format!("expected a string, found {}", json_kind(other)),
                ))
            }
            None => return Err(bad(&field, format!("missing field `{field}`"))),
        };
        let index = ch.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
        let finish_reason = ch
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push((
            index,
            Choice {
                text: s,
                finish_reason,
            },
        ));
    }
    out.sort_by_key(|(i, _)| *i);
    let tokens = v
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok((out.into_iter().map(|(_, c)| c).collect(), tokens))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_completion_choices_in_index_order() {
        let body = r#"{"choices":[{"index":1,"message":{"role":"assistant","content":"b"}},
                       {"index":0,"message":{"role":"assistant","content":"a"}}],
                       "usage":{"completion_tokens":7}}"#;
        let (t, n) = parse_choices("u", ApiKind::Chat, body).unwrap();
        assert_eq!((texts(t), n), (vec!["a".to_string(), "b".to_string()], 7));
        let (t, n) =
            parse_choices("u", ApiKind::Completions, r#"{"choices":[{"text":"x"}]}"#).unwrap();
        assert_eq!(
            (t.clone(), n),
            (
                vec![Choice {
                    text: "x".into(),
                    finish_reason: None
                }],
                0
            )
        );
        let (t, _) = parse_choices(
            "u",
            ApiKind::Completions,
            r#"{"choices":[{"text":"x","finish_reason":"length"},{"text":"y","index":1,"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        let reasons: Vec<Option<&str>> = t.iter().map(|c| c.finish_reason.as_deref()).collect();
        assert_eq!(reasons, [Some("length"), Some("stop")]);
    }

    #[test]
    fn malformed_replies_name_the_field() {
        let e = parse_choices(
            "http://h/v1/chat/completions",
            ApiKind::Chat,
            r#"{"choices":[{"message":{}}]}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("choices[0].message.content"), "{msg}");
        assert!(msg.starts_with("http://h/v1/chat/completions"), "{msg}");
        let e = parse_choices("u", ApiKind::Completions, r#"{"id": 1}"#).unwrap_err();
        assert!(
            matches!(&e, ClientError::Malformed { field, .. } if field == "choices"),
            "{e}"
        );
        let e = parse_choices("u", ApiKind::Completions, "<html>").unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
        let e = parse_choices(
            "u",
            ApiKind::Completions,
            r#"{"error": {"message": "bad model"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad model"), "{e}");
    }

    #[test]
    fn urls_are_normalised() {
        for base in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1/",
        ] {
            let c = Client::new(EndpointConfig::new(base, "m")).unwrap();
            assert_eq!(
                c.url_of(ApiKind::Chat),
                "http://127.0.0.1:8000/v1/chat/completions"
            );
            assert_eq!(
                c.url_of(ApiKind::Completions),
                "http://127.0.0.1:8000/v1/completions"
            );
        }
        let e = Client::new(EndpointConfig::new("127.0.0.1:8000", "m")).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
    }

    #[test]
    fn api_kind_names() {
        assert_eq!("chat".parse::<ApiKind>().unwrap(), ApiKind::Chat);
        assert_eq!(
            "completions".parse::<ApiKind>().unwrap(),
            ApiKind::Completions
        );
        assert!("responses".parse::<ApiKind>().is_err());
        assert_eq!(ApiKind::Completions.to_string(), "completions");
    }
}
