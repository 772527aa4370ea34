//! JSON Lines, plain or gzip-compressed (by `.gz` extension or gzip magic bytes).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use super::convert::{self, Bad};
use super::{InputFormat, ReadOptions, ReadOutcome};
use crate::data::error::DataError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads every non-blank line of a JSONL file (records may be empty: the caller reports [`DataError::Empty`]).
pub(super) fn read(path: &Path, opts: &ReadOptions) -> Result<ReadOutcome, DataError> {
    let io = |e| DataError::io(path, e);
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
        || file.fill_buf().map_err(io)?.starts_with(&GZIP_MAGIC);
    let mut reader: Box<dyn BufRead> = if gz {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    };

    let mut format = (opts.format != InputFormat::Auto).then_some(opts.format);
    let mut out = ReadOutcome::default();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        let mut bytes = buf.as_slice();
        if line_no == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes); // UTF-8 BOM
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = match parse(bytes) {
            Err(bad) => Err(bad),
            Ok(v) => {
                if format.is_none() {
                    format = decide(&v)
                        .map_err(|msg| DataError::invalid(path, Some(line_no), None, msg))?;
                }
                convert::to_record(&v, format.unwrap_or(InputFormat::Rrhf), opts)
            }
        };
        let bad = match record {
            Ok(r) => {
                out.records.push(r);
                out.lines.push(line_no);
                continue;
            }
            Err(bad) => bad,
        };
        let e = DataError::invalid(path, Some(line_no), bad.field.as_deref(), bad.msg);
        if opts.skip_invalid {
            out.skipped.push(e);
        } else {
            return Err(e);
        }
    }
    Ok(out)
}

/// `Auto`: the format from the fields of the first record that is a JSON object. `Ok(None)` for a value that is
/// not an object (the record is then invalid on its own and the next one decides); an object whose fields fit no
/// format is a whole-file error.
fn decide(v: &Value) -> Result<Option<InputFormat>, String> {
    let Value::Object(obj) = v else {
        return Ok(None);
    };
    let names: Vec<&str> = obj.keys().map(String::as_str).collect();
    match convert::detect(&names) {
        Some(f) => Ok(Some(f)),
        None => Err(convert::undetectable("fields of the first record", &names)),
    }
}

/// Parses one line into a JSON value, or says what is wrong with it.
pub(super) fn parse(bytes: &[u8]) -> Result<Value, Bad> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to();
            // Valid prefix: tells which field the bad bytes are in.
            let prefix = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
            let field = scan(prefix).path;
            return Err(Bad {
                field,
                msg: format!(
                    "not valid UTF-8 (byte 0x{:02X} at byte {} of the line); the file must be UTF-8 text",
                    bytes[at],
                    at + 1
                ),
            });
        }
    };
    serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let serde_msg = full
            .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
            .map(|m| format!("{m} at column {}", e.column()))
            .unwrap_or(full);
        let s = scan(text);
        match s.bare {
            Some(token) => Bad {
                field: s.path,
                msg: format!(
                    "invalid JSON ({serde_msg}): bare {token} is not valid JSON (Python's json.dumps writes it); \
                     write null or a number"
                ),
            },
            None => Bad::whole(format!("invalid JSON: {serde_msg}")),
        }
    })
}

/// What [`scan`] found.
#[derive(Debug, PartialEq)]
pub(super) struct Scan {
    /// The first bare `NaN`, `Infinity` or `-Infinity` outside strings.
    pub bare: Option<&'static str>,
    /// The field path (`scores[1]`) at that token, or at the end of the text when there is none.
    pub path: Option<String>,
}

enum Frame {
    Object {
        key: Option<String>,
        expecting_key: bool,
    },
    Array {
        index: usize,
    },
}

fn path_of(stack: &[Frame]) -> Option<String> {
    let mut p = String::new();
    for f in stack {
        match f {
            Frame::Object { key: Some(k), .. } => {
                if !p.is_empty() {
                    p.push('.');
                }
                p.push_str(k);
            }
            Frame::Object { key: None, .. } => break,
            Frame::Array { index } => p.push_str(&format!("[{index}]")),
        }
    }
    (!p.is_empty()).then_some(p)
}

/// A tolerant pass over (possibly invalid) JSON text: finds bare non-finite number tokens outside strings and
/// tracks the field path they sit at.
pub(super) fn scan(text: &str) -> Scan {
    let b = text.as_bytes();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(b.len());
                if let Some(Frame::Object {
                    key,
                    expecting_key: true,
                }) = stack.last_mut()
                {
                    *key = Some(text.get(start..end).unwrap_or_default().to_string());
                }
            }
            b'{' => stack.push(Frame::Object {
                key: None,
                expecting_key: true,
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(Frame::Object { expecting_key, .. }) = stack.last_mut() {
                    *expecting_key = false;
                }
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { expecting_key, .. }) => *expecting_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < b.len() && b[i].is_ascii_alphanumeric() {
                    i += 1;
                }
                let negative = start > 0 && b[start - 1] == b'-';
                let bare = match &text[start..i] {
                    "NaN" => Some("NaN"),
                    "Infinity" if negative => Some("-Infinity"),
                    "Infinity" => Some("Infinity"),
                    _ => None,
                };
                if bare.is_some() {
                    return Scan {
                        bare,
                        path: path_of(&stack),
                    };
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Scan {
        bare: None,
        path: path_of(&stack),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_bare_non_finite_tokens_and_their_field() {
        let s = scan(r#"{"query": "NaN here", "responses": ["a", "b"], "scores": [1.0, NaN]}"#);
        assert_eq!(s.bare, Some("NaN"));
        assert_eq!(s.path.as_deref(), Some("scores[1]"));
        let s = scan(r#"{"scores": [-Infinity], "x": 1}"#);
        assert_eq!(
            (s.bare, s.path.as_deref()),
            (Some("-Infinity"), Some("scores[0]"))
        );
        let s = scan(r#"{"a": {"b": Infinity}}"#);
        assert_eq!((s.bare, s.path.as_deref()), (Some("Infinity"), Some("a.b")));
        // Inside strings (escaped quotes included) they are text.
        let s = scan(r#"{"query": "say \"NaN\" Infinity", "scores": [1e5, null, true]}"#);
        assert_eq!(s.bare, None);
        // NaNs as part of a longer word are not the token.
        assert_eq!(scan(r#"{"a": NaNa}"#).bare, None);
    }

    #[test]
    fn parse_explains_bare_nan() {
        let bad = parse(br#"{"query": "q", "responses": ["a"], "scores": [NaN]}"#).unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("scores[0]"));
        assert!(bad.msg.contains(
            "bare NaN is not valid JSON (Python's json.dumps writes it); write null or a number"
        ));
        assert!(bad.msg.contains("column"), "{}", bad.msg);
        assert!(!bad.msg.contains("line 1"), "{}", bad.msg);
    }

    #[test]
    fn parse_reports_serde_message() {
        let bad = parse(br#"{"query": "q", "responses": ["a"]"#).unwrap_err();
        assert_eq!(bad.field, None);
        assert!(
            bad.msg
                .starts_with("invalid JSON: EOF while parsing an object"),
            "{}",
            bad.msg
        );
    }

    #[test]
    fn parse_reports_non_utf8_with_its_field() {
        let bad = parse(b"{\"query\": \"caf\xe9\", \"responses\": []}").unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("query"));
        assert!(
            bad.msg.contains("not valid UTF-8 (byte 0xE9 at byte 15"),
            "{}",
            bad.msg
        );
    }

    #[test]
    fn decide_uses_the_first_object() {
        assert_eq!(decide(&serde_json::json!([1])), Ok(None));
        assert_eq!(
            decide(&serde_json::json!({"prompt": "p", "chosen": "c", "rejected": "r"})),
            Ok(Some(InputFormat::Pairwise))
        );
        let e = decide(&serde_json::json!({"text": "t"})).unwrap_err();
        assert!(
            e.contains("cannot tell the input format") && e.contains("text"),
            "{e}"
        );
    }
}
