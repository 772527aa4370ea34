//! The OpenAI-compatible client against a real HTTP/1.1 server on 127.0.0.1 started by the test.
//!
//! [`TestServer`] is a small threaded server (keep-alive, Content-Length and chunked request bodies) whose replies
//! come from a closure; `sample.rs` (and the judge tests) reuse it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rrhf::client::{map_concurrent, Client, ClientError, CompletionParams, EndpointConfig};
use serde_json::{json, Value};

/// Hard limits that keep a broken test from running away.
const MAX_REQUESTS: usize = 1000;
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// What the server sends back, after `delay`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn json(v: Value) -> Self {
        Reply {
            status: 200,
            body: v.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Reply {
            status,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// A loopback HTTP server; stops when dropped.
pub struct TestServer {
    pub url: String,
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves every request with `handler(request, index)` (index: 0-based, in arrival order).
    pub fn start(handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = Arc::new(AtomicUsize::new(0));
        let accept = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) || counter.load(Ordering::SeqCst) >= MAX_REQUESTS
                    {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (requests, handler, counter) =
                        (requests.clone(), handler.clone(), counter.clone());
                    std::thread::spawn(move || serve(stream, &requests, &*handler, &counter));
                }
            })
        };
        TestServer {
            url: format!("http://{addr}"),
            addr,
            requests,
            stop,
            accept: Some(accept),
        }
    }

    /// Replies with `script[i]` to the i-th request and with `then` after the script.
    pub fn scripted(
        script: Vec<Reply>,
        then: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start(move |req, i| match script.get(i) {
            Some(r) => r.clone(),
            None => then(req),
        })
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Serves the requests of one connection until it closes or idles.
fn serve(stream: TcpStream, log: &Mutex<Vec<Request>>, handler: &Handler, counter: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        let index = counter.fetch_add(1, Ordering::SeqCst);
        if index >= MAX_REQUESTS {
            return;
        }
        log.lock().unwrap().push(req.clone());
        let reply = handler(&req, index);
        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            reply.status,
            reason(reply.status),
            reply.body.len()
        );
        let sent = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(reply.body.as_bytes()))
            .and_then(|()| writer.flush());
        if sent.is_err() {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A well-formed OpenAI reply with `n` choices for a chat or completions request:
/// `"{tag} {i}: {last user message or prompt}"`.
pub fn openai_reply(req: &Request, tag: &str) -> Reply {
    let v = req.json();
    let n = v["n"].as_u64().unwrap_or(1) as usize;
    let chat = req.path.ends_with("/chat/completions");
    let text_of = |i: usize| -> String {
        let input = if chat {
            v["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string()
        } else {
            v["prompt"].as_str().unwrap_or("").to_string()
        };
        format!("{tag} {i}: {}", input.trim())
    };
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": text_of(i)}, "finish_reason": "stop"})
            } else {
                json!({"index": i, "text": text_of(i), "finish_reason": "stop"})
            }
        })
        .collect();
    Reply::json(json!({
        "id": "cmpl-test",
        "object": if chat { "chat.completion" } else { "text_completion" },
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 3 * n, "total_tokens": 5 + 3 * n}
    }))
}

/// A config with millisecond timeouts and back-off.
pub fn fast_config(url: &str) -> EndpointConfig {
    EndpointConfig {
        url: url.to_string(),
        model: "test-model".into(),
        api_key_env: None,
        timeout: Duration::from_secs(5),
        max_retries: 2,
        backoff: Duration::from_millis(1),
        concurrency: 2,
    }
}

fn params(n: usize) -> CompletionParams {
    CompletionParams {
        max_tokens: 16,
        temperature: 0.7,
        top_p: 0.9,
        n,
        stop: vec!["Human:".into()],
        seed: Some(5),
    }
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
}

#[test]
fn client_chat_reply_with_several_choices() {
    let server = TestServer::start(|req, _| openai_reply(req, "chat"));
    let var = "RRHF_TEST_CLIENT_KEY_CHAT";
    std::env::set_var(var, "sk-test-123");
    let mut cfg = fast_config(&server.url);
    cfg.api_key_env = Some(var.into());
    let client = Client::new(cfg).unwrap();
    let out = client
        .chat(
            &msgs(&[("system", "Be brief."), ("user", "Hello there")]),
            &params(3),
        )
        .unwrap();
    assert_eq!(
        out,
        vec![
            "chat 0: Hello there",
            "chat 1: Hello there",
            "chat 2: Hello there"
        ]
    );
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(r.header("authorization"), Some("Bearer sk-test-123"));
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .contains("application/json"));
    let v = r.json();
    assert_eq!(v["model"], "test-model");
    assert_eq!(v["n"], 3);
    assert_eq!(v["max_tokens"], 16);
    assert_eq!(v["temperature"], 0.7);
    assert_eq!(v["top_p"], 0.9);
    assert_eq!(v["stop"], json!(["Human:"]));
    assert_eq!(v["seed"], 5);
    assert_eq!(
        v["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    );
    let s = client.stats();
    assert_eq!(
        (s.requests, s.retries, s.failures, s.completion_tokens),
        (1, 0, 0, 9)
    );
}

#[test]
fn client_completions_reply_with_several_choices() {
    let server = TestServer::start(|req, _| openai_reply(req, "text"));
    // A base URL ending in /v1 works too.
    let client = Client::new(fast_config(&format!("{}/v1/", server.url))).unwrap();
    let mut p = params(2);
    p.stop.clear();
    p.seed = None;
    let out = client.complete("Once upon a time", &p).unwrap();
    assert_eq!(
        out,
        vec!["text 0: Once upon a time", "text 1: Once upon a time"]
    );
    let r = &server.requests()[0];
    assert_eq!(r.path, "/v1/completions");
    assert_eq!(r.header("authorization"), None);
    let v = r.json();
    assert_eq!(v["prompt"], "Once upon a time");
    assert!(v.get("stop").is_none() && v.get("seed").is_none(), "{v}");
}

#[test]
fn client_retries_a_500_then_succeeds() {
    let server = TestServer::scripted(
        vec![
            Reply::status(500, r#"{"error": "overloaded"}"#),
            Reply::status(429, "slow down"),
        ],
        |req| openai_reply(req, "ok"),
    );
    let client = Client::new(fast_config(&server.url)).unwrap();
    let out = client.chat(&msgs(&[("user", "hi")]), &params(1)).unwrap();
    assert_eq!(out, vec!["ok 0: hi"]);
    let s = client.stats();
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 0));
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn client_500s_exhaust_the_retries_with_a_clear_error() {
    let server = TestServer::start(|_, _| Reply::status(503, "<h1>maintenance</h1>"));
    let client = Client::new(fast_config(&server.url)).unwrap();
    let e = client.complete("x", &params(1)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            ClientError::Status {
                status: 503,
                attempts: 3,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{}/v1/completions", server.url)),
        "{msg}"
    );
    assert!(
        msg.contains("HTTP 503") && msg.contains("maintenance"),
        "{msg}"
    );
    let s = client.stats();
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 1));
}

#[test]
fn client_timeout_is_retried_then_reported() {
    let server =
        TestServer::start(|req, _| openai_reply(req, "late").after(Duration::from_millis(400)));
    let mut cfg = fast_config(&server.url);
    cfg.timeout = Duration::from_millis(60);
    cfg.max_retries = 2;
    let client = Client::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = client
        .chat(&msgs(&[("user", "hi")]), &params(1))
        .unwrap_err();
    let elapsed = t0.elapsed();
    let msg = e.to_string();
    assert!(
        matches!(e, ClientError::Timeout { attempts: 3, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("/v1/chat/completions") && msg.contains("no reply within"),
        "{msg}"
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let s = client.stats();
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 1));
}

#[test]
fn client_malformed_body_names_the_missing_field() {
    let server = TestServer::start(|_, _| {
        Reply::json(json!({"choices": [{"index": 0, "message": {"role": "assistant"}}]}))
    });
    let client = Client::new(fast_config(&server.url)).unwrap();
    let e = client
        .chat(&msgs(&[("user", "hi")]), &params(1))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, ClientError::Malformed { field, .. } if field == "choices[0].message.content"),
        "{msg}"
    );
    assert!(
        msg.contains(&server.url) && msg.contains("missing field"),
        "{msg}"
    );
    // Not retried: the server answered, the answer is wrong.
    assert_eq!(client.stats().requests, 1);

    let server = TestServer::start(|_, _| Reply::status(200, "not json at all"));
    let client = Client::new(fast_config(&server.url)).unwrap();
    let e = client.complete("x", &params(1)).unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");

    let server = TestServer::start(|_, _| Reply::json(json!({"object": "list"})));
    let client = Client::new(fast_config(&server.url)).unwrap();
    let e = client.complete("x", &params(1)).unwrap_err();
    assert!(e.to_string().contains("missing field `choices`"), "{e}");
}

#[test]
fn client_missing_api_key_env_var_is_named() {
    let var = "RRHF_TEST_CLIENT_KEY_THAT_IS_NEVER_SET";
    std::env::remove_var(var);
    let mut cfg = fast_config("http://127.0.0.1:9");
    cfg.api_key_env = Some(var.into());
    let e = Client::new(cfg).unwrap_err();
    assert!(
        matches!(&e, ClientError::MissingApiKey { var: v, .. } if v == var),
        "{e}"
    );
    assert!(
        e.to_string().contains(var) && e.to_string().contains("127.0.0.1:9"),
        "{e}"
    );
}

#[test]
fn client_401_is_not_retried() {
    let server = TestServer::start(|_, _| {
        Reply::status(
            401,
            r#"{"error": {"message": "Incorrect API key provided"}}"#,
        )
    });
    let client = Client::new(fast_config(&server.url)).unwrap();
    let e = client
        .chat(&msgs(&[("user", "hi")]), &params(1))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            ClientError::Status {
                status: 401,
                attempts: 1,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("Incorrect API key"), "{msg}");
    let s = client.stats();
    assert_eq!((s.requests, s.retries, s.failures), (1, 0, 1));
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn client_connection_refused_is_retried_then_reported() {
    // A port with nobody listening: bind, note it, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = fast_config(&format!("http://127.0.0.1:{port}"));
    cfg.max_retries = 1;
    let client = Client::new(cfg).unwrap();
    let e = client.complete("x", &params(1)).unwrap_err();
    assert!(
        matches!(e, ClientError::Connection { attempts: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert_eq!(client.stats().retries, 1);
}

#[test]
fn client_https_and_bad_urls_are_config_errors_or_accepted() {
    let e = Client::new(fast_config("ftp://127.0.0.1")).unwrap_err();
    assert!(matches!(e, ClientError::Config { .. }), "{e}");
    // https is accepted when the binary has TLS (the default `tls` feature).
    let https = Client::new(fast_config("https://127.0.0.1:9"));
    assert_eq!(https.is_ok(), cfg!(feature = "tls"));
}

#[test]
fn client_is_shared_across_threads_with_bounded_concurrency() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let server = {
        let (in_flight, peak) = (in_flight.clone(), peak.clone());
        TestServer::start(move |req, _| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            in_flight.fetch_sub(1, Ordering::SeqCst);
            openai_reply(req, "r")
        })
    };
    let client = Client::new(fast_config(&server.url)).unwrap();
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt {i}")).collect();
    let out = map_concurrent(&prompts, 3, |p| {
        client.complete(p, &params(1)).map(|mut v| v.remove(0))
    });
    let texts: Vec<String> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        texts,
        (0..8)
            .map(|i| format!("r 0: prompt {i}"))
            .collect::<Vec<_>>()
    );
    let p = peak.load(Ordering::SeqCst);
    assert!((2..=3).contains(&p), "peak in flight {p}");
    assert_eq!(client.stats().requests, 8);
}
