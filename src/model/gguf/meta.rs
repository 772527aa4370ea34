//! Typed access to the GGUF metadata table; every error names the file and the key.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::model::error::{ModelError, Result};

use super::*;

/// Typed access to the metadata table; every error names the file and the key.
pub(super) struct Meta<'a> {
    pub(super) path: &'a Path,
    pub(super) md: &'a HashMap<String, Value>,
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

pub(super) fn as_i128(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

/// An f32 as the shortest decimal that reads back as the same f32 (`1e-5`, not `9.99999974e-6`).
pub(super) fn f32_to_f64(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

impl Meta<'_> {
    pub(super) fn err(&self, key: &str, msg: impl std::fmt::Display) -> ModelError {
        gguf_err(self.path, format!("metadata key `{key}`: {msg}"))
    }

    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }

    pub(super) fn req(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    pub(super) fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        match as_i128(v) {
            Some(x) if x >= 0 && x <= usize::MAX as i128 => Ok(x as usize),
            Some(x) => Err(self.err(key, format!("value {x} is out of range"))),
            None => Err(self.err(
                key,
                format!("has type {}, expected an integer", type_name(v)),
            )),
        }
    }

    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }

    pub(super) fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_of(key, self.req(key)?)
    }

    pub(super) fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.usize_opt(key)? {
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| self.err(key, format!("value {x} is out of range"))),
            None => Ok(None),
        }
    }

    pub(super) fn f64_of(&self, key: &str, v: &Value) -> Result<f64> {
        let x = match v {
            Value::F32(x) => f32_to_f64(*x),
            Value::F64(x) => *x,
            other => match as_i128(other) {
                Some(i) => i as f64,
                None => {
                    return Err(
                        self.err(key, format!("has type {}, expected a number", type_name(v)))
                    )
                }
            },
        };
        if !x.is_finite() {
            return Err(self.err(key, format!("value {x} is not finite")));
        }
        Ok(x)
    }

    pub(super) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| self.f64_of(key, v)).transpose()
    }

    pub(super) fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_of(key, self.req(key)?)
    }

    pub(super) fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("has type {}, expected a string", type_name(v)))),
        }
    }

    pub(super) fn str_req(&self, key: &str) -> Result<&str> {
        self.str_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub(super) fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("has type {}, expected a bool", type_name(v)))),
        }
    }

    pub(super) fn array_req(&self, key: &str) -> Result<&[Value]> {
        match self.req(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.err(key, format!("has type {}, expected an array", type_name(v)))),
        }
    }

    pub(super) fn str_array_req(&self, key: &str) -> Result<Vec<&str>> {
        self.array_req(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(
                    key,
                    format!("element {i} has type {}, expected a string", type_name(v)),
                )),
            })
            .collect()
    }

    pub(super) fn int_array_opt(&self, key: &str) -> Result<Option<Vec<i128>>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array_req(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_i128(v).ok_or_else(|| {
                    self.err(
                        key,
                        format!("element {i} has type {}, expected an integer", type_name(v)),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
