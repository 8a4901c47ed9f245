//! GGUF metadata values and typed access to them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One metadata value. Integer and float widths are kept so a writer can round-trip a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// GGUF's value-type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as a signed integer, whatever its stored width.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v as i64,
            Value::I8(v) => v as i64,
            Value::U16(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::U32(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            Value::Bool(v) => v as i64,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A short human rendering (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!("{:?}...", &s[..s.floor_char_boundary(60)]),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            v => format!("{}", v.as_i64().unwrap_or_default()),
        }
    }
}

/// The key/value section of a GGUF file, with typed getters whose errors name the file and key.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    pub path: PathBuf,
    pub entries: BTreeMap<String, Value>,
}

impl Metadata {
    pub fn new(path: &Path) -> Self {
        Metadata {
            path: path.to_path_buf(),
            entries: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    /// A non-negative integer that fits in `usize`.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.required(key)?;
        v.as_i64()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("expected a non-negative integer, found {}", v.summary()),
                )
            })
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.usize(key).map(Some)
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.required(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| self.err(key, format!("expected a number, found {}", v.summary())))
    }

    pub fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.f32(key).map(Some)
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected a bool, found {}", v.summary()))),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| self.err(key, format!("expected a string, found {}", v.summary())))
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.str(key).map(Some)
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.required(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.err(key, format!("expected an array, found {}", v.summary()))),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.err(key, format!("item {i} is not a string")))
            })
            .collect()
    }

    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| self.err(key, format!("item {i} is not a number")))
            })
            .collect()
    }

    pub fn i64_array(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .ok_or_else(|| self.err(key, format!("item {i} is not an integer")))
            })
            .collect()
    }
}
