//! Fuzzing (issue 11, item 6): valid inputs of every reader are mutated by a small seeded mutator (bit flips, byte
//! inserts and deletes, truncation, splicing, integer fields set to extremes, JSON values replaced by extremes and
//! wrong types) and each reader must answer with a clean error that names the file — never a panic, an abort, or an
//! allocation far beyond the file's size.
//!
//! The allocation bound is enforced in-process: this test binary's global allocator refuses, on a thread that runs a
//! fuzz case, any single request above `16 × file size + 16 MiB` (room for per-reader buffers and f32 copies of the
//! file's tensors, far below the 2^32..2^64 a corrupt length field asks for). A refused request aborts the binary
//! after printing the target and case, so the case is reproducible from its number.
//!
//! CI runs a bounded number of cases per target (the whole module takes a few seconds in release);
//! `RRHF_FUZZ_CASES=N` runs N per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rrhf::data::readers::{read_records, InputFormat, ReadOptions};
use rrhf::model::config::ModelConfig;
use rrhf::model::gguf::load_gguf;
use rrhf::model::load::load_model;
use rrhf::model::reward::read_pickle;
use rrhf::model::weights::read_safetensors;
use rrhf::rng::Rng;
use serde_json::{json, Value};

use super::common::{fixtures, temp_dir};

// ----- allocation guard ---------------------------------------------------------------------------------------------

/// The system allocator, with a per-thread cap on a single request while a fuzz case runs.
struct Guarded;

thread_local! {
    /// The largest request allowed on this thread; 0 = no cap (every other test in this binary).
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// What runs, for the abort message: target name and case number.
    static CASE: Cell<(&'static str, usize)> = const { Cell::new(("", 0)) };
}

fn over_limit(size: usize) -> bool {
    let limit = LIMIT.try_with(Cell::get).unwrap_or(0);
    if limit == 0 || size <= limit {
        return false;
    }
    let (target, case) = CASE.try_with(Cell::get).unwrap_or(("?", 0));
    // Formatted on the stack: allocating here would recurse into the allocator.
    let mut buf = [0u8; 256];
    let mut w = &mut buf[..];
    let _ = writeln!(
        w,
        "fuzz {target} case {case}: an allocation of {size} bytes exceeds the bound of {limit} (16 x file size + 16 MiB)"
    );
    let n = 256 - w.len();
    // SAFETY: writes n initialised bytes of `buf` to stderr.
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
    true
}

// SAFETY: every call forwards to `System` unchanged, or returns null (an allocation failure, which callers handle
// as the contract requires) for a request above this thread's cap.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if over_limit(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if over_limit(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if over_limit(new) {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Guarded = Guarded;

/// Caps allocations on this thread while it lives.
struct Cap;
impl Cap {
    fn new(target: &'static str, case: usize, file_len: usize) -> Self {
        CASE.with(|c| c.set((target, case)));
        LIMIT.with(|l| l.set(file_len.saturating_mul(16).saturating_add(16 << 20)));
        Cap
    }
}
impl Drop for Cap {
    fn drop(&mut self) {
        LIMIT.with(|l| l.set(0));
    }
}

// ----- mutator ------------------------------------------------------------------------------------------------------

/// Cases per target: `default` in CI, `RRHF_FUZZ_CASES` when set.
fn cases(default: usize) -> usize {
    std::env::var("RRHF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const INTERESTING_U64: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// 1–4 byte-level edits inside `data[lo..]` (positions drawn below `hi`, so a header can be targeted).
fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, lo: usize, hi: usize) {
    let n_ops = 1 + rng.below(4) as usize;
    for _ in 0..n_ops {
        let hi = hi.min(data.len());
        let span = hi.saturating_sub(lo).max(1) as u64;
        let at = (lo + rng.below(span) as usize).min(data.len());
        match rng.below(8) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 if at < data.len() => data[at] = rng.next_u64() as u8,
            2 => {
                let k = 1 + rng.below(8) as usize;
                for _ in 0..k {
                    data.insert(at, rng.next_u64() as u8);
                }
            }
            3 => {
                let k = (1 + rng.below(16) as usize).min(data.len() - at);
                data.drain(at..at + k);
            }
            4 => data.truncate(at),
            5 => {
                // Splice: a chunk of the input copied over another place.
                let from = rng.below(data.len().max(1) as u64) as usize;
                let k = (1 + rng.below(32) as usize)
                    .min(data.len().saturating_sub(from))
                    .min(data.len().saturating_sub(at));
                let chunk = data[from..from + k].to_vec();
                data[at..at + k].copy_from_slice(&chunk);
            }
            6 => {
                // A length or count field set to an extreme, as 4 or 8 little-endian bytes.
                let v = INTERESTING_U64[rng.below(INTERESTING_U64.len() as u64) as usize];
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let bytes = &v.to_le_bytes()[..width];
                let end = (at + width).min(data.len());
                data[at..end].copy_from_slice(&bytes[..end - at]);
            }
            _ => {
                let v = INTERESTING_U64[rng.below(INTERESTING_U64.len() as u64) as usize];
                let text = v.to_string();
                let end = (at + text.len()).min(data.len());
                data.splice(at..end, text.bytes());
            }
        }
    }
}

/// A JSON value that readers should refuse or bound: extremes, negatives, wrong types, big containers.
fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(20) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(1u64 << 40),
        4 => json!(i64::MIN),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(0.5),
        8 => json!(""),
        9 => json!("x"),
        10 => Value::Null,
        11 => json!(true),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, "a", null]),
        15 => json!("a".repeat(1000)),
        16 => json!([[[[[[1]]]]]]),
        17 => json!(4294967296u64),
        18 => json!(2147483647),
        _ => json!(-2147483648i64),
    }
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Edits the `k`-th node (pre-order) of `v`: replaced by an interesting value, or, for a container, one of its
/// entries removed or duplicated.
fn edit_nth(v: &mut Value, k: &mut usize, rng: &mut Rng) -> bool {
    if *k == 0 {
        match v {
            Value::Object(o) if !o.is_empty() && rng.below(3) == 0 => {
                let key = o.keys().nth(rng.below(o.len() as u64) as usize).cloned();
                if let Some(key) = key {
                    o.remove(&key);
                }
            }
            Value::Array(a) if !a.is_empty() && rng.below(3) == 0 => {
                let i = rng.below(a.len() as u64) as usize;
                if rng.below(2) == 0 {
                    a.remove(i);
                } else {
                    let x = a[i].clone();
                    a.push(x);
                }
            }
            _ => *v = interesting_json(rng),
        }
        return true;
    }
    *k -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| edit_nth(x, k, rng)),
        Value::Object(o) => o.values_mut().any(|x| edit_nth(x, k, rng)),
        _ => false,
    }
}

fn mutate_json(v: &mut Value, rng: &mut Rng) {
    for _ in 0..1 + rng.below(3) {
        let mut k = rng.below(count_nodes(v) as u64) as usize;
        edit_nth(v, &mut k, rng);
    }
}

// ----- harness ------------------------------------------------------------------------------------------------------

/// Runs `n` cases: `make(rng, case)` writes a mutated input and returns its path; `check(path)` reads it and
/// returns the reader's error text (None when the input was accepted). A case fails on a panic or on an error
/// that does not name the file; an allocation over the bound aborts (see the module doc).
fn fuzz(
    target: &'static str,
    seed: u64,
    n: usize,
    mut make: impl FnMut(&mut Rng, usize) -> PathBuf,
    check: impl Fn(&Path) -> Option<String>,
) {
    let mut failures = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..n {
        let mut rng = case_rng(seed, case);
        let path = make(&mut rng, case);
        let len = std::fs::metadata(&path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let outcome = {
            let _cap = Cap::new(target, case, len);
            catch_unwind(AssertUnwindSafe(|| check(&path)))
        };
        match outcome {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("case {case}: panic: {msg}"));
                let _ = std::fs::copy(
                    &path,
                    std::env::temp_dir().join(format!("rrhf-fuzz-{target}-{case}")),
                );
            }
            Ok(None) => accepted += 1,
            Ok(Some(err)) => {
                refused += 1;
                let name = path.file_name().map(|f| f.to_string_lossy().into_owned());
                if !name.is_some_and(|f| err.contains(&f)) {
                    failures.push(format!("case {case}: error does not name the file: {err}"));
                }
            }
        }
    }
    eprintln!("fuzz {target}: {n} cases, {accepted} accepted, {refused} refused cleanly");
    assert!(
        failures.is_empty(),
        "fuzz {target}: {} of {n} cases failed:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The generator of one case: a case is reproducible from the target's seed and its number alone.
fn case_rng(seed: u64, case: usize) -> Rng {
    Rng::new(seed ^ (case as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn err_text<T, E: std::fmt::Display>(r: Result<T, E>) -> Option<String> {
    r.err().map(|e| e.to_string())
}

// ----- targets ------------------------------------------------------------------------------------------------------

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

#[test]
fn fuzz_jsonl_records() {
    let seeds: Vec<Vec<Value>> = vec![
        vec![
            json!({"query": "q1", "responses": ["a", "b"], "scores": [1.0, 0.5]}),
            json!({"query": "q2", "responses": ["c"], "scores": [2], "sources": ["policy:beam"]}),
        ],
        vec![
            json!({"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " x", "chosen": " c", "rejected": " r"}),
        ],
        vec![
            json!({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}),
        ],
        vec![json!({"instruction": "Name a color.", "input": "", "output": "Red."})],
        vec![
            json!({"query": "q", "responses": ["a"], "messages": [{"role": "user", "content": "hi"}]}),
        ],
    ];
    let tmp = temp_dir();
    fuzz(
        "jsonl",
        0x15011,
        cases(3000),
        |rng, case| {
            let mut lines = seeds[rng.below(seeds.len() as u64) as usize].clone();
            let mut text = Vec::new();
            if rng.below(2) == 0 {
                let i = rng.below(lines.len() as u64) as usize;
                mutate_json(&mut lines[i], rng);
            }
            for l in &lines {
                text.extend(serde_json::to_vec(l).unwrap());
                text.push(b'\n');
            }
            if rng.below(2) == 0 {
                let len = text.len();
                mutate_bytes(&mut text, rng, 0, len);
            }
            let (name, bytes) = match rng.below(5) {
                0 => (format!("c{case}.jsonl.gz"), gzip(&text)),
                1 => {
                    // Corrupt gzip framing too.
                    let mut z = gzip(&text);
                    let len = z.len();
                    mutate_bytes(&mut z, rng, 0, len);
                    (format!("c{case}.jsonl.gz"), z)
                }
                _ => (format!("c{case}.jsonl"), text),
            };
            let p = tmp.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        },
        |p| {
            let opts = ReadOptions {
                skip_invalid: p.to_string_lossy().len() % 2 == 0,
                ..ReadOptions::default()
            };
            let r = read_records(p, &opts);
            let _ = std::fs::remove_file(p);
            err_text(r)
        },
    );
}

const PARQUET_SEED: u64 = 0x9A_9E7;

/// The pairwise Parquet file of `data.rs`, Snappy, gzip and uncompressed.
fn parquet_seeds() -> Vec<Vec<u8>> {
    use parquet::basic::{Compression, GzipLevel};
    let tmp = temp_dir();
    [
        Compression::SNAPPY,
        Compression::GZIP(GzipLevel::default()),
        Compression::UNCOMPRESSED,
    ]
    .into_iter()
    .map(|c| {
        let p = tmp.join("seed.parquet");
        super::data::write_pairwise_parquet(&p, c);
        std::fs::read(&p).unwrap()
    })
    .collect()
}

fn mutate_parquet(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
    let len = b.len();
    // The footer (schema, row-group offsets and sizes) sits at the end: aim half of the edits there.
    let lo = if rng.below(2) == 0 {
        len.saturating_sub(400)
    } else {
        0
    };
    mutate_bytes(&mut b, rng, lo, len);
    b
}

#[test]
fn fuzz_parquet_rows() {
    let seeds = parquet_seeds();
    let tmp = temp_dir();
    fuzz(
        "parquet",
        PARQUET_SEED,
        cases(2000),
        |rng, case| {
            let p = tmp.join(format!("c{case}.parquet"));
            std::fs::write(&p, mutate_parquet(&seeds, rng)).unwrap();
            p
        },
        |p| {
            // Skipping: the seed's row 3 is invalid on purpose (a null prompt), so intact rows are accepted.
            let opts = ReadOptions {
                format: InputFormat::Auto,
                skip_invalid: true,
                ..ReadOptions::default()
            };
            let r = read_records(p, &opts);
            let _ = std::fs::remove_file(p);
            err_text(r)
        },
    );
}

fn config_seeds() -> Vec<Value> {
    let mut out = Vec::new();
    for dir in [fixtures().join("models"), fixtures().join("score/models")] {
        let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path().join("config.json");
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.push(serde_json::from_str(&text).unwrap());
            }
        }
    }
    out
}

#[test]
fn fuzz_config_json() {
    let seeds = config_seeds();
    let tmp = temp_dir();
    fuzz(
        "config",
        0xC0F1,
        cases(3000),
        |rng, case| {
            let mut v = seeds[rng.below(seeds.len() as u64) as usize].clone();
            mutate_json(&mut v, rng);
            let mut text = serde_json::to_vec_pretty(&v).unwrap();
            if rng.below(4) == 0 {
                let len = text.len();
                mutate_bytes(&mut text, rng, 0, len);
            }
            let p = tmp.join(format!("config{case}.json"));
            std::fs::write(&p, text).unwrap();
            p
        },
        |p| {
            let r = ModelConfig::from_file(p);
            let _ = std::fs::remove_file(p);
            err_text(r)
        },
    );
}

/// A whole model load with a mutated config.json beside the real weights: sizes in the config (positions, heads,
/// vocabulary) drive allocations such as rope tables, which must be checked against the weights first.
#[test]
fn fuzz_config_json_model_load() {
    let tmp = temp_dir();
    let models = ["llama", "llama_tied", "gpt2", "gpt_neox"];
    let dirs: Vec<PathBuf> = models
        .iter()
        .map(|m| {
            let d = tmp.join(m);
            std::fs::create_dir_all(&d).unwrap();
            for e in std::fs::read_dir(fixtures().join("models").join(m))
                .unwrap()
                .flatten()
            {
                let name = e.file_name();
                if name != "cases.safetensors" && name != "cases.json" {
                    std::fs::copy(e.path(), d.join(name)).unwrap();
                }
            }
            d
        })
        .collect();
    let seeds: Vec<Value> = dirs
        .iter()
        .map(|d| serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap())
        .collect();
    fuzz(
        "config-load",
        0x10AD,
        cases(1000),
        |rng, _case| {
            let i = rng.below(dirs.len() as u64) as usize;
            let mut v = seeds[i].clone();
            mutate_json(&mut v, rng);
            std::fs::write(dirs[i].join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
            dirs[i].join("config.json")
        },
        |p| {
            let dir = p.parent().unwrap();
            // The bound is the weights' size, not the small config's.
            let st = std::fs::metadata(dir.join("model.safetensors"))
                .unwrap()
                .len() as usize;
            LIMIT.with(|l| l.set(st.saturating_mul(16).saturating_add(16 << 20)));
            err_text(load_model(dir, &Device::Cpu, DType::F32)).map(|e| {
                // A model-directory error names the directory or a file in it; accept either by naming config.json.
                if e.contains(&dir.display().to_string()) {
                    format!("{e} (config.json)")
                } else {
                    e
                }
            })
        },
    );
}

/// The 8-byte header length, the JSON header, and the first bytes of the data.
fn split_safetensors(b: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), &b[8 + n..])
}

#[test]
fn fuzz_safetensors_headers() {
    let seeds: Vec<Vec<u8>> = ["llama", "gpt2", "llama_tied"]
        .iter()
        .map(|m| {
            std::fs::read(fixtures().join("models").join(m).join("model.safetensors")).unwrap()
        })
        .collect();
    let tmp = temp_dir();
    fuzz(
        "safetensors",
        0x5AFE,
        cases(3000),
        |rng, case| {
            let seed = &seeds[rng.below(seeds.len() as u64) as usize];
            let (mut header, data) = split_safetensors(seed);
            let mut b;
            if rng.below(2) == 0 {
                // Structural: a dtype, shape or offset set to an extreme or a wrong type.
                mutate_json(&mut header, rng);
                let h = serde_json::to_vec(&header).unwrap();
                b = (h.len() as u64).to_le_bytes().to_vec();
                b.extend(h);
                b.extend(data);
            } else {
                b = seed.clone();
                let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                mutate_bytes(&mut b, rng, 0, 8 + hlen + 16);
            }
            let p = tmp.join(format!("c{case}.safetensors"));
            std::fs::write(&p, b).unwrap();
            p
        },
        |p| {
            let r = read_safetensors(p, DType::F32, &Device::Cpu);
            let _ = std::fs::remove_file(p);
            err_text(r)
        },
    );
}

// GGUF: a tiny valid llama file written with candle's GGUF writer (f32 tensors, byte-level vocabulary).
const G_HIDDEN: usize = 8;
const G_HEADS: usize = 2;
const G_KV: usize = 1;
const G_FFN: usize = 16;

fn gguf_tokens() -> Vec<String> {
    // GPT-2's byte-to-unicode spelling: printable bytes stay, the rest map to U+0100 onward.
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut extra = 0;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        tokens.push(char::from_u32(c).unwrap().to_string());
    }
    tokens.push("he".into());
    tokens
}

fn gguf_metadata() -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let s = |x: &str| V::String(x.to_string());
    let tokens = gguf_tokens();
    let n = tokens.len();
    vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny")),
        ("llama.embedding_length".into(), V::U32(G_HIDDEN as u32)),
        ("llama.block_count".into(), V::U32(1)),
        ("llama.feed_forward_length".into(), V::U32(G_FFN as u32)),
        ("llama.attention.head_count".into(), V::U32(G_HEADS as u32)),
        ("llama.attention.head_count_kv".into(), V::U32(G_KV as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), V::F32(10000.0)),
        ("llama.context_length".into(), V::U32(64)),
        (
            "llama.rope.dimension_count".into(),
            V::U32((G_HIDDEN / G_HEADS) as u32),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array((0..n).map(|i| V::I32(if i < 3 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), V::Array(vec![s("h e")])),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        ),
    ]
}

fn gguf_tensors() -> Vec<(String, QTensor)> {
    let vocab = gguf_tokens().len();
    let hd = G_HIDDEN / G_HEADS;
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![vocab, G_HIDDEN]),
        ("output_norm.weight", vec![G_HIDDEN]),
        ("blk.0.attn_norm.weight", vec![G_HIDDEN]),
        ("blk.0.attn_q.weight", vec![G_HEADS * hd, G_HIDDEN]),
        ("blk.0.attn_k.weight", vec![G_KV * hd, G_HIDDEN]),
        ("blk.0.attn_v.weight", vec![G_KV * hd, G_HIDDEN]),
        ("blk.0.attn_output.weight", vec![G_HIDDEN, G_HEADS * hd]),
        ("blk.0.ffn_norm.weight", vec![G_HIDDEN]),
        ("blk.0.ffn_gate.weight", vec![G_FFN, G_HIDDEN]),
        ("blk.0.ffn_up.weight", vec![G_FFN, G_HIDDEN]),
        ("blk.0.ffn_down.weight", vec![G_HIDDEN, G_FFN]),
    ];
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) / 16.0).collect();
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
            (
                name.to_string(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect()
}

fn write_gguf(path: &Path, md: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) {
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

fn interesting_gguf_value(rng: &mut Rng) -> gguf_file::Value {
    use gguf_file::Value as V;
    match rng.below(15) {
        0 => V::U32(0),
        1 => V::U32(u32::MAX),
        2 => V::U64(u64::MAX),
        3 => V::U64(1 << 40),
        4 => V::I32(-1),
        5 => V::I64(i64::MIN),
        6 => V::F32(f32::NAN),
        7 => V::F32(-1.0),
        8 => V::F64(1e308),
        9 => V::String(String::new()),
        10 => V::Bool(true),
        11 => V::Array(vec![]),
        12 => V::Array(vec![V::U8(1), V::U8(2)]),
        13 => V::String("a b c".into()),
        _ => V::String("llama".into()),
    }
}

#[test]
fn fuzz_gguf_headers_and_metadata() {
    let tmp = temp_dir();
    let md = gguf_metadata();
    let tensors = gguf_tensors();
    let good = tmp.join("good.gguf");
    write_gguf(&good, &md, &tensors);
    // The seed must load: otherwise every mutation is refused for the same reason and nothing deeper is reached.
    load_model(&good, &Device::Cpu, DType::F32).expect("the GGUF seed loads");
    let seed = std::fs::read(&good).unwrap();
    let header_end = {
        let mut r = std::io::Cursor::new(&seed);
        gguf_file::Content::read(&mut r).unwrap().tensor_data_offset as usize
    };
    fuzz(
        "gguf",
        0x6606,
        cases(2000),
        |rng, case| {
            let p = tmp.join(format!("c{case}.gguf"));
            if rng.below(2) == 0 {
                // Metadata: a value replaced by an extreme or a wrong type, a key dropped, or a token list edited.
                let mut md = md.clone();
                for _ in 0..1 + rng.below(2) {
                    let i = rng.below(md.len() as u64) as usize;
                    match rng.below(4) {
                        0 => {
                            md.remove(i);
                        }
                        1 => {
                            if let gguf_file::Value::Array(a) = &mut md[i].1 {
                                if !a.is_empty() {
                                    let j = rng.below(a.len() as u64) as usize;
                                    let v = interesting_gguf_value(rng);
                                    // GGUF arrays hold one type: a value of another type replaces them all.
                                    if std::mem::discriminant(&v) == std::mem::discriminant(&a[j]) {
                                        a[j] = v;
                                    } else {
                                        *a = vec![v; 1 + j % 4];
                                    }
                                }
                            }
                        }
                        _ => md[i].1 = interesting_gguf_value(rng),
                    }
                }
                write_gguf(&p, &md, &tensors);
            } else {
                let mut b = seed.clone();
                mutate_bytes(&mut b, rng, 0, header_end);
                std::fs::write(&p, b).unwrap();
            }
            p
        },
        |p| {
            let r = load_gguf(p, &Device::Cpu).map(|_| ());
            let r2 = r.and_then(|_| load_model(p, &Device::Cpu, DType::F32).map(|_| ()));
            let _ = std::fs::remove_file(p);
            err_text(r2)
        },
    );
}

/// `(name, bytes)` of every entry of a zip archive.
fn unzip(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().into_owned(), b)
        })
        .collect()
}

fn rezip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, b) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn fuzz_pt_pickle() {
    let src = fixtures().join("score/models/gptj_rm/gptj_rm.pt");
    let entries = unzip(&src);
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .expect("a data.pkl entry");
    let raw = std::fs::read(&src).unwrap();
    let tmp = temp_dir();
    fuzz(
        "pt",
        0x9_1C,
        cases(2000),
        |rng, case| {
            let p = tmp.join(format!("c{case}.pt"));
            match rng.below(4) {
                // The zip container itself (directory, local headers, sizes).
                0 => {
                    let mut b = raw.clone();
                    let len = b.len();
                    let lo = if rng.below(2) == 0 {
                        len.saturating_sub(300)
                    } else {
                        0
                    };
                    mutate_bytes(&mut b, rng, lo, len);
                    std::fs::write(&p, b).unwrap();
                }
                // The pickle program: opcodes, shapes, strides, storage keys.
                _ => {
                    let mut e = entries.clone();
                    let len = e[pkl].1.len();
                    mutate_bytes(&mut e[pkl].1, rng, 0, len);
                    if rng.below(8) == 0 {
                        // A storage shorter than the pickle says.
                        if let Some((_, d)) = e.iter_mut().find(|(n, _)| n.contains("/data/")) {
                            d.truncate(d.len() / 2);
                        }
                    }
                    rezip(&p, &e);
                }
            }
            p
        },
        |p| {
            let r = read_pickle(p, DType::F32, &Device::Cpu);
            let _ = std::fs::remove_file(p);
            err_text(r)
        },
    );
}

/// The CLI's `--config FILE.toml` path, mutated, in a child process under `ulimit -v` (1 GiB of address space):
/// the binary must exit 1 or 2 with an `error:` line, or succeed; never abort or be killed.
#[test]
fn fuzz_config_toml_cli() {
    let tmp = temp_dir();
    let seed = format!(
        "model = \"{}\"\ndata = \"{}\"\nmax_len = 64\nbatch_queries = 2\nlr = 2e-5\nstop = [\"Human:\", \"Assistant:\"]\ndropout = true\n",
        tmp.join("no-such-model").display(),
        tmp.join("no-such-data.jsonl").display()
    );
    let exe = env!("CARGO_BIN_EXE_rrhf");
    let mut failures = Vec::new();
    let n = cases(100);
    for case in 0..n {
        let mut rng = Rng::new(0x7031 ^ case as u64);
        let mut b = seed.clone().into_bytes();
        // TOML value kinds that byte edits rarely produce: tables, datetimes, out-of-range and special numbers.
        const EXTRA: [&str; 8] = [
            "[section]\nx = 1\n",
            "when = 1979-05-27T07:32:00Z\n",
            "max_len = 18446744073709551615\n",
            "seed = -9223372036854775808\n",
            "stop = [[1], {a = 1}]\n",
            "lr = 1e400\n",
            "lr = nan\n",
            "max_len = -1\n",
        ];
        if rng.below(2) == 0 {
            b.extend(EXTRA[rng.below(EXTRA.len() as u64) as usize].bytes());
        }
        if rng.below(4) != 0 {
            let len = b.len();
            mutate_bytes(&mut b, &mut rng, 0, len);
        }
        let p = tmp.join(format!("c{case}.toml"));
        std::fs::write(&p, &b).unwrap();
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "ulimit -v 1048576; exec timeout 60 {exe} rank --config {}",
                p.display()
            ))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        let clean = match code {
            Some(0) => true,
            Some(1) | Some(2) => stderr.contains("error:"),
            _ => false,
        };
        if !clean {
            failures.push(format!(
                "case {case}: exit {code:?}, stderr: {}\n--- toml:\n{}",
                stderr.trim(),
                String::from_utf8_lossy(&b)
            ));
        }
    }
    eprintln!("fuzz toml-cli: {n} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ----- regression tests for what the fuzzer found ------------------------------------------------------------------

/// Found by `fuzz_gguf_headers_and_metadata`: `llama.block_count = 2^32 − 1` sized the tensor plan (9 entries per
/// block) before any tensor was looked up, allocating gigabytes for a file of a few kilobytes.
#[test]
fn gguf_block_count_beyond_the_file_tensors_is_refused() {
    let tmp = temp_dir();
    let mut md = gguf_metadata();
    for (k, v) in md.iter_mut() {
        if k == "llama.block_count" {
            *v = gguf_file::Value::U32(u32::MAX);
        }
    }
    let p = tmp.join("blocks.gguf");
    write_gguf(&p, &md, &gguf_tensors());
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    let err = {
        let _cap = Cap::new("regression", 0, len);
        load_gguf(&p, &Device::Cpu)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    assert!(
        err.contains("blocks.gguf")
            && err.contains("llama.block_count")
            && err.contains("4294967295"),
        "{err}"
    );
}

/// Found by `fuzz_config_json_model_load`: `rotary_pct: 1e308` in a GPT-NeoX config.json made the rotary dimension
/// saturate to `usize::MAX` and the rope table allocation abort the process.
#[test]
fn huge_rotary_fraction_in_config_is_a_config_error() {
    let tmp = temp_dir();
    let dir = tmp.join("neox");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("models/gpt_neox"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    v["rotary_pct"] = json!(1e308);
    if let Some(rp) = v.get_mut("rope_parameters").and_then(Value::as_object_mut) {
        rp.insert("partial_rotary_factor".into(), json!(1e308));
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let err = {
        let _cap = Cap::new("regression", 0, 1 << 20);
        load_model(&dir, &Device::Cpu, DType::F32)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    assert!(
        err.contains("config.json") && err.contains("1e308") && err.contains("[0, 1]"),
        "{err}"
    );
}

/// Found by `fuzz_config_json_model_load`: `num_hidden_layers: 2^64 − 1` sized the block list before any layer
/// weight was looked up ("capacity overflow" panic); the load now fails at the first missing layer weight.
#[test]
fn huge_layer_count_in_config_is_refused_by_its_missing_weights() {
    let tmp = temp_dir();
    for (model, key) in [
        ("gpt_neox", "num_hidden_layers"),
        ("llama", "num_hidden_layers"),
        ("gpt2", "n_layer"),
    ] {
        let dir = tmp.join(model);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixtures().join("models").join(model))
            .unwrap()
            .flatten()
        {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        v[key] = json!(u64::MAX);
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        let err = {
            let _cap = Cap::new("regression", 0, 1 << 20);
            catch_unwind(|| {
                load_model(&dir, &Device::Cpu, DType::F32)
                    .err()
                    .map(|e| e.to_string())
            })
        };
        let err = err
            .unwrap_or_else(|_| panic!("{model}: panicked"))
            .expect("refused");
        assert!(
            err.contains(model) && err.contains("is missing"),
            "{model}: {err}"
        );
    }
}

/// Found by `fuzz_parquet_rows` (cases 970, 1299 and 1349 of its stream): the parquet crate panics on some corrupt
/// files ("column start and length should not be negative", "Decoder for dict should have been set", a slice
/// index out of range) instead of returning an error; the reader turns the panic into a clean error naming the file.
#[test]
fn corrupt_parquet_that_panics_the_parquet_crate_is_a_clean_error() {
    let seeds = parquet_seeds();
    let tmp = temp_dir();
    for case in [970, 1299, 1349] {
        let p = tmp.join(format!("case{case}.parquet"));
        std::fs::write(
            &p,
            mutate_parquet(&seeds, &mut case_rng(PARQUET_SEED, case)),
        )
        .unwrap();
        let err = read_records(&p, &ReadOptions::default())
            .map(|_| ())
            .expect_err("a corrupt file is refused")
            .to_string();
        assert!(
            err.contains(&format!("case{case}.parquet"))
                && err.contains("the parquet reader failed on it"),
            "case {case}: {err}"
        );
        // The binary reports it as an error only: the panic hook stays quiet (and under mpirun does not end the job).
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rrhf"))
            .args(["score", "--reward", "labels", "--data"])
            .arg(&p)
            .arg("--output")
            .arg(tmp.join(format!("case{case}.out.jsonl")))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {case}: refused");
        assert!(
            stderr.contains("the parquet reader failed on it") && !stderr.contains("panicked"),
            "case {case}: {stderr}"
        );
    }
}
