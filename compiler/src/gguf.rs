//! Reader for the metadata section of GGUF files (llama.cpp's model format): the key/value header that
//! carries hyper-parameters and the tokenizer. Tensor data is not read here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file (magic {magic:02x?})")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated metadata at byte {offset}")]
    Truncated { path: PathBuf, offset: usize },
    #[error("{path}: metadata key '{key}' has unknown value type {ty}")]
    ValueType { path: PathBuf, key: String, ty: u32 },
    #[error("{path}: metadata key '{key}' {problem}")]
    Key { path: PathBuf, key: String, problem: String },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

#[derive(Debug)]
pub struct GgufMetadata {
    pub path: PathBuf,
    pub version: u32,
    pub tensor_count: u64,
    pub values: BTreeMap<String, GgufValue>,
}

impl GgufMetadata {
    pub fn read(path: &Path) -> Result<GgufMetadata, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and only read through this mapping while it lives; a
        // concurrent truncation by another process is outside what any reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, &map)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufMetadata, GgufError> {
        let mut r = Reader { path, bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4)?.try_into().expect("took 4 bytes");
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), magic });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path: path.to_path_buf(), version });
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        let mut values = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(&key, ty)?;
            values.insert(key, value);
        }
        Ok(GgufMetadata { path: path.to_path_buf(), version, tensor_count, values })
    }

    fn key_error(&self, key: &str, problem: &str) -> GgufError {
        GgufError::Key { path: self.path.clone(), key: key.to_string(), problem: problem.to_string() }
    }

    pub fn get(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.values.get(key).ok_or_else(|| self.key_error(key, "is missing"))
    }

    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            GgufValue::Str(s) => Ok(s),
            _ => Err(self.key_error(key, "is not a string")),
        }
    }

    pub fn uint(&self, key: &str) -> Result<u64, GgufError> {
        match self.get(key)? {
            GgufValue::UInt(v) => Ok(*v),
            GgufValue::Int(v) if *v >= 0 => Ok(*v as u64),
            _ => Err(self.key_error(key, "is not a non-negative integer")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        match self.values.get(key) {
            Some(GgufValue::Bool(b)) => *b,
            _ => default,
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get(key)? {
            GgufValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    GgufValue::Str(s) => Ok(s.as_str()),
                    _ => Err(self.key_error(key, "has a non-string element")),
                })
                .collect(),
            _ => Err(self.key_error(key, "is not an array")),
        }
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        match self.get(key)? {
            GgufValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    GgufValue::Int(i) => Ok(*i),
                    GgufValue::UInt(u) => Ok(*u as i64),
                    _ => Err(self.key_error(key, "has a non-integer element")),
                })
                .collect(),
            _ => Err(self.key_error(key, "is not an array")),
        }
    }
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(GgufError::Truncated { path: self.path.to_path_buf(), offset: self.pos })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("took 4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("took 8 bytes")))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        let len = usize::try_from(len)
            .map_err(|_| GgufError::Truncated { path: self.path.to_path_buf(), offset: self.pos })?;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    fn value(&mut self, key: &str, ty: u32) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::UInt(self.take(1)?[0] as u64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::UInt(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => GgufValue::UInt(self.u32()? as u64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                let item_ty = self.u32()?;
                let n = self.u64()?;
                // Each element takes at least one byte, which bounds a hostile count by the file size.
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(GgufError::Truncated { path: self.path.to_path_buf(), offset: self.pos });
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, item_ty)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            _ => return Err(GgufError::ValueType { path: self.path.to_path_buf(), key: key.to_string(), ty }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf_string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn sample() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(gguf_string("general.architecture"));
        b.extend(8u32.to_le_bytes());
        b.extend(gguf_string("llama"));
        b.extend(gguf_string("llama.block_count"));
        b.extend(4u32.to_le_bytes());
        b.extend(30u32.to_le_bytes());
        b.extend(gguf_string("tokenizer.ggml.tokens"));
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(gguf_string("a"));
        b.extend(gguf_string("Ġb"));
        b
    }

    #[test]
    fn parses_scalars_and_arrays() {
        let m = GgufMetadata::parse(Path::new("t.gguf"), &sample()).unwrap();
        assert_eq!(m.string("general.architecture").unwrap(), "llama");
        assert_eq!(m.uint("llama.block_count").unwrap(), 30);
        assert_eq!(m.strings("tokenizer.ggml.tokens").unwrap(), vec!["a", "Ġb"]);
        assert!(m.string("missing").unwrap_err().to_string().contains("'missing' is missing"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = sample();
        for len in 0..full.len() {
            assert!(GgufMetadata::parse(Path::new("t.gguf"), &full[..len]).is_err(), "prefix {len} parsed");
        }
    }
}
