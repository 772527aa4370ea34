//! Parquet (Hugging Face datasets ship it), read row by row with the record API; each row becomes a JSON object
//! and goes through the same per-format rules as a JSONL line.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

use super::convert::{self, Bad};
use super::{InputFormat, ReadOptions, ReadOutcome};
use crate::data::error::DataError;

const MAGIC: &[u8; 4] = b"PAR1";

/// A `.parquet` extension, or a file that starts with the Parquet magic bytes.
pub(super) fn is_parquet(path: &Path) -> Result<bool, DataError> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        return Ok(true);
    }
    let mut head = [0u8; 4];
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DataError::io(path, e)),
        }
    }
    Ok(n == 4 && &head == MAGIC)
}

fn unreadable(path: &Path, row: Option<usize>, e: parquet::errors::ParquetError) -> DataError {
    let mut msg = match row {
        Some(r) => format!("row {r}: cannot read the Parquet file: {e}"),
        None => format!("not a readable Parquet file: {e}"),
    };
    if msg.contains("Disabled feature") {
        msg.push_str(
            " (this build reads uncompressed, Snappy and gzip Parquet: rewrite the file with one of those, \
             e.g. pyarrow's compression=\"snappy\")",
        );
    }
    DataError::invalid(path, row, None, msg)
}

/// Reads every row (records may be empty: the caller reports [`DataError::Empty`]).
///
/// The parquet crate panics on some corrupt files instead of returning an error (found by fuzzing: negative
/// column chunk offsets in the footer, a dictionary page missing, a truncated level buffer); such a panic is
/// turned into the same "not a readable Parquet file" error as the crate's own failures.
pub(super) fn read(path: &Path, opts: &ReadOptions) -> Result<ReadOutcome, DataError> {
    crate::panic::catch_quietly(|| read_rows(path, opts)).unwrap_or_else(|why| {
        Err(DataError::invalid(
            path,
            None,
            None,
            format!("not a readable Parquet file: the parquet reader failed on it ({why}); the file is corrupt"),
        ))
    })
}

fn read_rows(path: &Path, opts: &ReadOptions) -> Result<ReadOutcome, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| unreadable(path, None, e))?;
    let format = match opts.format {
        InputFormat::Auto => {
            let schema = reader.metadata().file_metadata().schema_descr();
            let names: Vec<&str> = schema
                .root_schema()
                .get_fields()
                .iter()
                .map(|t| t.name())
                .collect();
            convert::detect(&names).ok_or_else(|| {
                DataError::invalid(
                    path,
                    None,
                    None,
                    convert::undetectable("Parquet columns", &names),
                )
            })?
        }
        f => f,
    };
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| unreadable(path, None, e))?;
    let mut out = ReadOutcome::default();
    for (i, row) in rows.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| unreadable(path, Some(n), e))?;
        match row_value(&row).and_then(|v| convert::to_record(&v, format, opts)) {
            Ok(r) => {
                out.records.push(r);
                out.lines.push(n);
            }
            Err(bad) => {
                let e = DataError::invalid(
                    path,
                    Some(n),
                    bad.field.as_deref(),
                    format!("row {n}: {}", bad.msg),
                );
                if opts.skip_invalid {
                    out.skipped.push(e);
                } else {
                    return Err(e);
                }
            }
        }
    }
    Ok(out)
}

/// One row as a JSON object (column name → value).
pub(super) fn row_value(row: &Row) -> Result<Value, Bad> {
    let mut obj = Map::new();
    for (name, field) in row.get_column_iter() {
        obj.insert(name.clone(), field_value(field, name)?);
    }
    Ok(Value::Object(obj))
}

fn float(x: f64, at: &str) -> Result<Value, Bad> {
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or_else(|| Bad::at(at, format!("{x} is not a finite number")))
}

fn field_value(f: &Field, at: &str) -> Result<Value, Bad> {
    Ok(match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float16(x) => float(f64::from(*x), at)?,
        Field::Float(x) => float(f64::from(*x), at)?,
        Field::Double(x) => float(*x, at)?,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => {
                return Err(Bad::at(
                    at,
                    format!(
                        "not valid UTF-8 (at byte {} of the value)",
                        e.valid_up_to() + 1
                    ),
                ))
            }
        },
        Field::Group(row) => {
            let mut obj = Map::new();
            for (name, field) in row.get_column_iter() {
                obj.insert(name.clone(), field_value(field, &format!("{at}.{name}"))?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, e)| field_value(e, &format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                let value = field_value(v, &format!("{at}.{key}"))?;
                obj.insert(key, value);
            }
            Value::Object(obj)
        }
        // Decimals, dates, times: their text (no input format uses them).
        other => Value::String(other.to_string()),
    })
}
