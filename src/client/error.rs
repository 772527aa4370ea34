//! Errors of the OpenAI-compatible client: each names the URL it concerns.

use std::time::Duration;

/// How many characters of a reply body an error message quotes.
pub(crate) const EXCERPT_CHARS: usize = 300;

/// The first [`EXCERPT_CHARS`] characters of `body`, on one line.
pub(crate) fn excerpt(body: &str) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.is_empty() {
        return "(empty body)".into();
    }
    let mut out: String = flat.chars().take(EXCERPT_CHARS).collect();
    if flat.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out
}

/// A failed request to an OpenAI-compatible endpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-success status (after retries for 429 and 5xx).
    #[error("{url}: HTTP {status} after {attempts} attempt(s): {body}")]
    Status {
        url: String,
        status: u16,
        /// The start of the reply body.
        body: String,
        attempts: u32,
    },
    /// No complete reply within the timeout, on every attempt.
    #[error(
        "{url}: no reply within {timeout:?} (the last of {attempts} attempt(s); raise --timeout-ms?)"
    )]
    Timeout {
        url: String,
        timeout: Duration,
        attempts: u32,
    },
    /// The connection failed (refused, reset, DNS, protocol), on every attempt.
    #[error("{url}: connection failed after {attempts} attempt(s): {msg}")]
    Connection {
        url: String,
        msg: String,
        attempts: u32,
    },
    /// The reply is not the JSON shape of the OpenAI API; `field` is the path that is missing or wrong.
    #[error("{url}: malformed reply: {msg} (field `{field}`); body: {body}")]
    Malformed {
        url: String,
        field: String,
        msg: String,
        body: String,
    },
    /// The API key variable named by `--api-key-env` is not set.
    #[error("{url}: the API key environment variable `{var}` is not set (or not valid Unicode)")]
    MissingApiKey { url: String, var: String },
    /// The endpoint configuration is unusable (bad URL, TLS not built in, ...).
    #[error("{url}: {msg}")]
    Config { url: String, msg: String },
}

impl ClientError {
    /// The URL the error is about.
    pub fn url(&self) -> &str {
        match self {
            ClientError::Status { url, .. }
            | ClientError::Timeout { url, .. }
            | ClientError::Connection { url, .. }
            | ClientError::Malformed { url, .. }
            | ClientError::MissingApiKey { url, .. }
            | ClientError::Config { url, .. } => url,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_is_short_and_flat() {
        assert_eq!(excerpt(""), "(empty body)");
        assert_eq!(excerpt("a\nb"), "a b");
        let long = "x".repeat(1000);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }
}
