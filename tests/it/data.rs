//! Data readers: every format reads, every bad input names its file, line (or row) and field, `skip_invalid`
//! counts, and `write_records` round-trips. Files are written to a fresh temp dir; Parquet files are written with
//! the parquet crate's writer, so no binary fixture is needed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::{Compression, GzipLevel};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use rrhf::data::readers::{
    alpaca_prompt, read_records, write_records, InputFormat, PromptTemplate, ReadOptions,
};
use rrhf::data::{DataError, Record};

use crate::common::temp_dir;

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn opts() -> ReadOptions {
    ReadOptions::default()
}

fn skipping() -> ReadOptions {
    ReadOptions {
        skip_invalid: true,
        ..ReadOptions::default()
    }
}

fn rec(query: &str, responses: &[&str], scores: Option<&[f64]>) -> Record {
    Record {
        query: query.into(),
        responses: responses.iter().map(|s| s.to_string()).collect(),
        scores: scores.map(<[f64]>::to_vec),
        sources: None,
        finish_reasons: None,
    }
}

fn labelled(query: &str, chosen: &str, rejected: &str) -> Record {
    Record {
        query: query.into(),
        responses: vec![chosen.into(), rejected.into()],
        scores: Some(vec![1.0, 0.0]),
        sources: Some(vec!["dataset:chosen".into(), "dataset:rejected".into()]),
        finish_reasons: None,
    }
}

/// The error's text names the file, the line (as `path:N`) and the field.
fn assert_names(e: &DataError, path: &Path, line: usize, field: Option<&str>, needle: &str) {
    let text = e.to_string();
    assert!(
        text.contains(&format!("{}:{line}", path.display())),
        "no `path:{line}` in: {text}"
    );
    if let Some(f) = field {
        assert!(
            text.contains(&format!("field `{f}`")),
            "no field `{f}` in: {text}"
        );
    }
    assert!(text.contains(needle), "no {needle:?} in: {text}");
    match e {
        DataError::Invalid { at, .. } => {
            assert_eq!(at.path, path);
            assert_eq!(at.line, Some(line));
            assert_eq!(at.field.as_deref(), field, "{text}");
        }
        other => panic!("expected DataError::Invalid, got {other:?}"),
    }
}

const GOOD_RRHF: &str = r#"{"query": "q1", "responses": ["a", "b"], "scores": [1.0, -2]}"#;

// ---------------------------------------------------------------------------------------------- good files

#[test]
fn rrhf_jsonl_reads() {
    let dir = temp_dir();
    let text = format!(
        "{GOOD_RRHF}\n\n   \r\n{}\r\n{}",
        r#"{"query": "q2", "responses": [""], "scores": [0], "sources": ["policy:beam"], "extra": {"x": 1}}"#,
        r#"{"responses": ["x", "y", "z"], "query": "", "scores": [3, 2, 1e-3]}"#
    );
    let p = write_file(&dir, "records.jsonl", text.as_bytes());
    let out = read_records(&p, &opts()).unwrap();
    assert!(out.skipped.is_empty());
    let mut second = rec("q2", &[""], Some(&[0.0]));
    second.sources = Some(vec!["policy:beam".into()]);
    assert_eq!(
        out.records,
        vec![
            rec("q1", &["a", "b"], Some(&[1.0, -2.0])),
            second,
            rec("", &["x", "y", "z"], Some(&[3.0, 2.0, 1e-3])),
        ]
    );
}

#[test]
fn rrhf_jsonl_gz_reads() {
    let dir = temp_dir();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    writeln!(enc, "{GOOD_RRHF}").unwrap();
    writeln!(
        enc,
        r#"{{"query": "q2", "responses": ["c"], "scores": [5]}}"#
    )
    .unwrap();
    let bytes = enc.finish().unwrap();
    let p = write_file(&dir, "records.jsonl.gz", &bytes);
    let out = read_records(&p, &opts()).unwrap();
    assert_eq!(
        out.records,
        vec![
            rec("q1", &["a", "b"], Some(&[1.0, -2.0])),
            rec("q2", &["c"], Some(&[5.0]))
        ]
    );
    // Gzip is also recognised by its magic bytes, and bad lines inside it are located.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    writeln!(
        enc,
        "{GOOD_RRHF}\n{{\"query\": \"q\", \"responses\": [\"a\"], \"scores\": [NaN]}}"
    )
    .unwrap();
    let p = write_file(&dir, "records.data", &enc.finish().unwrap());
    let e = read_records(&p, &opts()).unwrap_err();
    assert_names(&e, &p, 2, Some("scores[0]"), "bare NaN");
}

#[test]
fn unscored_records_are_kept_without_require_scores() {
    let dir = temp_dir();
    let text = r#"{"query": "q", "responses": ["a", "b"]}
{"query": "r", "responses": ["c"], "scores": null}"#;
    let p = write_file(&dir, "prompts.jsonl", text.as_bytes());
    let o = ReadOptions {
        require_scores: false,
        ..ReadOptions::default()
    };
    let out = read_records(&p, &o).unwrap();
    assert_eq!(
        out.records,
        vec![rec("q", &["a", "b"], None), rec("r", &["c"], None)]
    );
    let e = read_records(&p, &opts()).unwrap_err();
    assert_names(
        &e,
        &p,
        1,
        Some("scores"),
        "unscored record: run `rrhf score` first",
    );
}

#[test]
fn pairwise_jsonl_reads() {
    let dir = temp_dir();
    // Dahoas/rm-static rows: responses start with a space and are kept verbatim; `response` is ignored.
    let text = r#"{"prompt": "\n\nHuman: Hi?\n\nAssistant:", "response": " Hello.", "chosen": " Hello.", "rejected": " Go."}
{"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": ""}"#;
    let p = write_file(&dir, "pairs.jsonl", text.as_bytes());
    let expected = vec![
        labelled("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go."),
        labelled("\n\nHuman: 2+2?\n\nAssistant:", " 4", ""),
    ];
    assert_eq!(read_records(&p, &opts()).unwrap().records, expected);
    let explicit = ReadOptions {
        format: InputFormat::Pairwise,
        ..ReadOptions::default()
    };
    assert_eq!(read_records(&p, &explicit).unwrap().records, expected);
}

#[test]
fn hh_raw_jsonl_reads() {
    let dir = temp_dir();
    let text = r#"{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"}"#;
    let p = write_file(&dir, "hh.jsonl", text.as_bytes());
    let out = read_records(&p, &opts()).unwrap();
    assert_eq!(
        out.records,
        vec![labelled(
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
            " yes",
            " no"
        )]
    );
}

#[test]
fn alpaca_jsonl_reads_and_templates_apply() {
    let dir = temp_dir();
    let text = r#"{"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
{"instruction": "Name a color.", "input": "", "output": "Blue."}"#;
    let p = write_file(&dir, "alpaca.jsonl", text.as_bytes());
    let out = read_records(&p, &opts()).unwrap();
    let mut first = rec(
        &alpaca_prompt("Add the numbers.", "1 2"),
        &["3"],
        Some(&[1.0]),
    );
    first.sources = Some(vec!["dataset:output".into()]);
    let mut second = rec(
        &alpaca_prompt("Name a color.", ""),
        &["Blue."],
        Some(&[1.0]),
    );
    second.sources = Some(vec!["dataset:output".into()]);
    assert_eq!(out.records, vec![first, second]);
    assert!(out.records[0]
        .query
        .contains("### Input:\n1 2\n\n### Response:"));
    assert!(!out.records[1].query.contains("### Input:"));

    // `--prompt-template alpaca` renders other formats' queries as the instruction.
    let p = write_file(&dir, "records.jsonl", GOOD_RRHF.as_bytes());
    let o = ReadOptions {
        prompt_template: PromptTemplate::Alpaca,
        ..ReadOptions::default()
    };
    assert_eq!(
        read_records(&p, &o).unwrap().records[0].query,
        alpaca_prompt("q1", "")
    );
}

#[test]
fn auto_refuses_unknown_fields_and_explicit_format_applies() {
    let dir = temp_dir();
    let p = write_file(&dir, "text.jsonl", b"{\"text\": \"hello\"}\n");
    let e = read_records(&p, &skipping()).unwrap_err();
    assert_names(&e, &p, 1, None, "cannot tell the input format");
    // An explicit format reads the fields it needs, so a missing one is named.
    let o = ReadOptions {
        format: InputFormat::Alpaca,
        ..ReadOptions::default()
    };
    let e = read_records(&p, &o).unwrap_err();
    assert_names(
        &e,
        &p,
        1,
        Some("instruction"),
        "missing field `instruction`",
    );
}

// ---------------------------------------------------------------------------------------------- bad input

/// (second line, field, text the message must hold). The first line of each file is good.
fn bad_lines() -> Vec<(&'static [u8], Option<&'static str>, &'static str)> {
    vec![
        (
            br#"{"query": "q", "responses": ["a"], "scores": [1.0]"#,
            None,
            "invalid JSON: EOF while parsing",
        ),
        (
            br#"{"query": "q", "responses": ["a", "b"], "scores": [0.5, NaN]}"#,
            Some("scores[1]"),
            "bare NaN is not valid JSON (Python's json.dumps writes it); write null or a number",
        ),
        (
            br#"{"query": "q", "responses": ["a"], "scores": [-Infinity]}"#,
            Some("scores[0]"),
            "bare -Infinity",
        ),
        (
            br#"{"responses": ["a"], "scores": [1.0]}"#,
            Some("query"),
            "missing field `query`",
        ),
        (
            br#"{"query": "q", "scores": [1.0]}"#,
            Some("responses"),
            "missing field `responses`",
        ),
        (
            br#"{"query": "q", "responses": ["a", "b"], "scores": [1.0]}"#,
            Some("scores"),
            "1 scores for 2 responses",
        ),
        (
            br#"{"query": "q", "responses": ["a"], "scores": ["1.0"]}"#,
            Some("scores[0]"),
            "expected a number",
        ),
        (
            br#"{"query": "q", "responses": ["a", "b"], "scores": [1.0, null]}"#,
            Some("scores[1]"),
            "null score",
        ),
        (
            br#"{"query": "q", "responses": ["a"], "scores": [true]}"#,
            Some("scores[0]"),
            "bool",
        ),
        (
            br#"{"query": "q", "responses": [], "scores": []}"#,
            Some("responses"),
            "zero responses",
        ),
        (
            br#"{"query": "q", "responses": ["a"]}"#,
            Some("scores"),
            "unscored record: run `rrhf score` first",
        ),
        (
            br#"{"query": "q", "responses": ["a"], "scores": null}"#,
            Some("scores"),
            "unscored record",
        ),
        (
            br#"{"query": "q", "responses": ["a"], "scores": [1], "sources": ["x", "y"]}"#,
            Some("sources"),
            "2 sources for 1 responses",
        ),
        (
            b"{\"query\": \"caf\xe9\", \"responses\": [\"a\"], \"scores\": [1]}",
            Some("query"),
            "not valid UTF-8",
        ),
        (b"[1, 2]", None, "expected a JSON object"),
    ]
}

#[test]
fn bad_rrhf_lines_name_file_line_and_field() {
    let dir = temp_dir();
    for (i, (line, field, needle)) in bad_lines().into_iter().enumerate() {
        let mut bytes = format!("{GOOD_RRHF}\n").into_bytes();
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(b"\n");
        let p = write_file(&dir, &format!("bad{i}.jsonl"), &bytes);
        let e = read_records(&p, &opts()).unwrap_err();
        assert_names(&e, &p, 2, field, needle);
    }
}

#[test]
fn bad_rows_of_other_formats_name_file_line_and_field() {
    let dir = temp_dir();
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        (
            "hh.jsonl",
            r#"{"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: b\n\nAssistant: no"}"#,
            "rejected",
            "does not share the conversation of `chosen`",
        ),
        (
            "hh2.jsonl",
            r#"{"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}"#,
            "chosen",
            "no \"\\n\\nAssistant:\" turn",
        ),
        (
            "pairs.jsonl",
            r#"{"prompt": "p", "chosen": " c"}"#,
            "rejected",
            "missing field `rejected`",
        ),
        (
            "pairs2.jsonl",
            r#"{"prompt": "p", "chosen": " c", "rejected": 3}"#,
            "rejected",
            "expected a string",
        ),
        (
            "alpaca.jsonl",
            r#"{"instruction": "i", "input": ""}"#,
            "output",
            "missing field `output`",
        ),
    ];
    for (name, line, field, needle) in cases {
        let p = write_file(&dir, name, format!("\n{line}\n").as_bytes());
        let e = read_records(&p, &opts()).unwrap_err();
        assert_names(&e, &p, 2, Some(field), needle);
    }
}

#[test]
fn skip_invalid_counts_bad_records() {
    let dir = temp_dir();
    let bad = bad_lines();
    let mut bytes = Vec::new();
    for (line, _, _) in &bad {
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(b"\n");
        bytes.extend_from_slice(GOOD_RRHF.as_bytes());
        bytes.extend_from_slice(b"\n");
    }
    let p = write_file(&dir, "mixed.jsonl", &bytes);
    let e = read_records(&p, &opts()).unwrap_err();
    assert_names(&e, &p, 1, None, "invalid JSON");
    let out = read_records(&p, &skipping()).unwrap();
    assert_eq!(out.records.len(), bad.len());
    assert_eq!(out.skipped.len(), bad.len());
    for (i, (e, (_, field, needle))) in out.skipped.iter().zip(&bad).enumerate() {
        assert_names(e, &p, 2 * i + 1, *field, needle);
    }
}

#[test]
fn empty_files_are_empty() {
    let dir = temp_dir();
    let every_bad = format!(
        "{}\n{}\n",
        r#"{"query": "q", "responses": []}"#,
        r#"{"query": "q", "responses": ["a"], "scores": [NaN]}"#
    );
    for (name, bytes, o) in [
        ("empty.jsonl", "".to_string(), opts()),
        ("blank.jsonl", "\n  \n\r\n\t\n".to_string(), opts()),
        ("all_skipped.jsonl", every_bad, skipping()),
    ] {
        let p = write_file(&dir, name, bytes.as_bytes());
        match read_records(&p, &o) {
            Err(DataError::Empty(q)) => assert_eq!(q, p),
            other => panic!("{name}: expected DataError::Empty, got {other:?}"),
        }
    }
    let p = write_file(
        &dir,
        "empty.jsonl.gz",
        &flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default())
            .finish()
            .unwrap(),
    );
    assert!(matches!(
        read_records(&p, &opts()),
        Err(DataError::Empty(_))
    ));
}

#[test]
fn io_errors_fail_even_when_skipping() {
    let dir = temp_dir();
    let missing = dir.join("missing.jsonl");
    let e = read_records(&missing, &skipping()).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()));
    // A corrupt gzip stream is an I/O error too.
    let p = write_file(
        &dir,
        "corrupt.jsonl.gz",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0x00],
    );
    assert!(matches!(
        read_records(&p, &skipping()),
        Err(DataError::Io { .. })
    ));
}

// ---------------------------------------------------------------------------------------------- Parquet

/// One column chunk: values plus definition and repetition levels.
enum Values {
    Strings(Vec<&'static str>),
    Doubles(Vec<f64>),
}

type Chunk = (Values, Option<Vec<i16>>, Option<Vec<i16>>);

fn write_parquet(path: &Path, schema: &str, compression: Compression, row_groups: Vec<Vec<Chunk>>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(fs::File::create(path).unwrap(), schema, props).unwrap();
    for chunks in row_groups {
        let mut rg = writer.next_row_group().unwrap();
        for (values, def, rep) in chunks {
            let mut col = rg
                .next_column()
                .unwrap()
                .expect("as many chunks as columns");
            match values {
                Values::Strings(v) => {
                    let v: Vec<ByteArray> = v.into_iter().map(ByteArray::from).collect();
                    col.typed::<ByteArrayType>()
                        .write_batch(&v, def.as_deref(), rep.as_deref())
                        .unwrap();
                }
                Values::Doubles(v) => {
                    col.typed::<DoubleType>()
                        .write_batch(&v, def.as_deref(), rep.as_deref())
                        .unwrap();
                }
            }
            col.close().unwrap();
        }
        assert!(
            rg.next_column().unwrap().is_none(),
            "a chunk for every column"
        );
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

const PAIRWISE_SCHEMA: &str = "message schema {
    OPTIONAL BYTE_ARRAY prompt (UTF8);
    REQUIRED BYTE_ARRAY response (UTF8);
    REQUIRED BYTE_ARRAY chosen (UTF8);
    REQUIRED BYTE_ARRAY rejected (UTF8);
}";

fn strings(v: &[&'static str]) -> Chunk {
    (Values::Strings(v.to_vec()), None, None)
}

/// Rows 1-2 in one row group, row 3 (prompt null) in a second.
pub(crate) fn write_pairwise_parquet(path: &Path, compression: Compression) {
    let group1 = vec![
        (
            Values::Strings(vec![
                "\n\nHuman: Hi?\n\nAssistant:",
                "\n\nHuman: 2+2?\n\nAssistant:",
            ]),
            Some(vec![1, 1]),
            None,
        ),
        strings(&[" Hello.", " 4"]),
        strings(&[" Hello.", " 4"]),
        strings(&[" Go.", ""]),
    ];
    let group2 = vec![
        (Values::Strings(vec![]), Some(vec![0]), None),
        strings(&["r"]),
        strings(&["c"]),
        strings(&["x"]),
    ];
    write_parquet(path, PAIRWISE_SCHEMA, compression, vec![group1, group2]);
}

#[test]
fn pairwise_parquet_reads() {
    let dir = temp_dir();
    for (name, compression) in [
        ("snappy.parquet", Compression::SNAPPY),
        ("gzip.parquet", Compression::GZIP(GzipLevel::default())),
        ("plain.parquet", Compression::UNCOMPRESSED),
    ] {
        let p = dir.join(name);
        write_pairwise_parquet(&p, compression);
        let e = read_records(&p, &opts()).unwrap_err();
        assert_names(
            &e,
            &p,
            3,
            Some("prompt"),
            "row 3: expected a string, found null",
        );
        let out = read_records(&p, &skipping()).unwrap();
        assert_eq!(
            out.records,
            vec![
                labelled("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go."),
                labelled("\n\nHuman: 2+2?\n\nAssistant:", " 4", ""),
            ]
        );
        assert_eq!(out.skipped.len(), 1);
        assert_names(&out.skipped[0], &p, 3, Some("prompt"), "row 3");
    }
}

#[test]
fn hh_raw_parquet_reads() {
    let dir = temp_dir();
    let p = dir.join("hh.parquet");
    let schema = "message schema { REQUIRED BYTE_ARRAY chosen (UTF8); REQUIRED BYTE_ARRAY rejected (UTF8); }";
    write_parquet(
        &p,
        schema,
        Compression::SNAPPY,
        vec![vec![
            strings(&[
                "\n\nHuman: a\n\nAssistant: yes",
                "\n\nHuman: a\n\nAssistant: yes",
            ]),
            strings(&[
                "\n\nHuman: a\n\nAssistant: no",
                "\n\nHuman: b\n\nAssistant: no",
            ]),
        ]],
    );
    let e = read_records(&p, &opts()).unwrap_err();
    assert_names(&e, &p, 2, Some("rejected"), "row 2: does not share");
    let out = read_records(&p, &skipping()).unwrap();
    assert_eq!(
        out.records,
        vec![labelled("\n\nHuman: a\n\nAssistant:", " yes", " no")]
    );
    assert_eq!(out.skipped.len(), 1);
}

#[test]
fn rrhf_parquet_with_lists_reads() {
    let dir = temp_dir();
    let p = dir.join("records.parquet");
    let schema = "message schema {
        REQUIRED BYTE_ARRAY query (UTF8);
        REQUIRED GROUP responses (LIST) { REPEATED GROUP list { REQUIRED BYTE_ARRAY element (UTF8); } }
        OPTIONAL GROUP scores (LIST) { REPEATED GROUP list { REQUIRED DOUBLE element; } }
    }";
    // Rows: ("q1", [a, b], [1, 0]), ("q2", [c], null), ("q3", [d, e], [0.5, NaN]).
    write_parquet(
        &p,
        schema,
        Compression::SNAPPY,
        vec![vec![
            strings(&["q1", "q2", "q3"]),
            (
                Values::Strings(vec!["a", "b", "c", "d", "e"]),
                Some(vec![1; 5]),
                Some(vec![0, 1, 0, 0, 1]),
            ),
            (
                Values::Doubles(vec![1.0, 0.0, 0.5, f64::NAN]),
                Some(vec![2, 2, 0, 2, 2]),
                Some(vec![0, 1, 0, 0, 1]),
            ),
        ]],
    );
    let e = read_records(&p, &opts()).unwrap_err();
    assert_names(&e, &p, 2, Some("scores"), "row 2: unscored record");
    let o = ReadOptions {
        require_scores: false,
        skip_invalid: true,
        ..ReadOptions::default()
    };
    let out = read_records(&p, &o).unwrap();
    assert_eq!(
        out.records,
        vec![
            rec("q1", &["a", "b"], Some(&[1.0, 0.0])),
            rec("q2", &["c"], None)
        ]
    );
    assert_eq!(out.skipped.len(), 1);
    assert_names(
        &out.skipped[0],
        &p,
        3,
        Some("scores[1]"),
        "row 3: NaN is not a finite number",
    );
}

#[test]
fn unreadable_parquet_fails_even_when_skipping() {
    let dir = temp_dir();
    let p = write_file(&dir, "broken.parquet", b"PAR1 this is not really parquet");
    let e = read_records(&p, &skipping()).unwrap_err();
    assert!(e.to_string().contains("not a readable Parquet file"), "{e}");
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    let p = dir.join("zero_rows.parquet");
    write_parquet(&p, PAIRWISE_SCHEMA, Compression::SNAPPY, vec![]);
    assert!(matches!(
        read_records(&p, &opts()),
        Err(DataError::Empty(_))
    ));
}

// ---------------------------------------------------------------------------------------------- writing

#[test]
fn write_then_read_round_trips() {
    let dir = temp_dir();
    let mut with_sources = rec("q\n\"quoted\" ünïcode", &["", " b"], Some(&[0.1, -3e10]));
    with_sources.sources = Some(vec!["policy:beam".into(), "dataset:chosen".into()]);
    let records = vec![
        with_sources,
        rec("unscored", &["x"], None),
        rec("q3", &["y"], Some(&[f64::MIN_POSITIVE])),
    ];
    let p = dir.join("out.jsonl");
    write_records(&p, &records).unwrap();
    let o = ReadOptions {
        require_scores: false,
        ..ReadOptions::default()
    };
    assert_eq!(read_records(&p, &o).unwrap().records, records);
    // Overwrites atomically and leaves no temp file behind.
    write_records(&p, &records[..1]).unwrap();
    assert_eq!(read_records(&p, &o).unwrap().records, records[..1].to_vec());
    let names: Vec<_> = fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.jsonl")]);
}

#[test]
fn write_refuses_non_finite_scores() {
    let dir = temp_dir();
    let p = dir.join("out.jsonl");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let records = vec![
            rec("q", &["a"], Some(&[1.0])),
            rec("q", &["a", "b"], Some(&[0.0, bad])),
        ];
        let e = write_records(&p, &records).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("record 1") && text.contains("scores[1]"),
            "{text}"
        );
        assert!(!p.exists(), "nothing is written");
        assert_eq!(fs::read_dir(&*dir).unwrap().count(), 0, "no temp file left");
    }
}
