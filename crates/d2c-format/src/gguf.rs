//! GGUF container: a bounds-checked reader and an atomic writer, in safe Rust.
//!
//! Adapters come from the internet and ggml's own parser has had heap-overflow CVEs, so the
//! reader never trusts a count or length from the header: every one is capped (constants below)
//! and checked against the bytes actually left in the file before anything is allocated.
//! Tensor data is memory-mapped and only sliced, never copied, until a caller decodes it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::ggml_type;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Versions 2 and 3 share the layout we parse (64-bit counts); version 1 used 32-bit counts
/// and has not been written by anything in years.
pub const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml stores names in a fixed `char[64]` including the terminating NUL.
pub const MAX_TENSOR_NAME_LEN: usize = 63;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Keys are short identifiers; a megabyte key is an attack, not metadata.
pub const MAX_KEY_LEN: u64 = 64 * 1024;
/// Chat templates are the longest legitimate strings seen in the wild (tens of KiB).
pub const MAX_STRING_LEN: u64 = 16 * 1024 * 1024;
/// Tokenizer vocabularies and merges are the largest arrays (a few hundred thousand entries).
pub const MAX_ARRAY_LEN: u64 = 16 * 1024 * 1024;
/// Real models carry a few dozen keys.
pub const MAX_KV_COUNT: u64 = 1 << 16;
/// A 400-layer model with 20 tensors per layer is still far below this.
pub const MAX_TENSOR_COUNT: u64 = 1 << 20;
/// ggml indexes elements with int64; keep well inside it so products never overflow.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;
/// ggml only accepts power-of-two alignments; anything above a page is nonsense.
pub const MAX_ALIGNMENT: u64 = 1 << 16;
/// Every array element becomes one in-memory `Value` (tens of bytes), whatever its size on
/// disk: a file of one-byte elements would make us allocate ~40x its size. Metadata of real
/// models (vocabularies, merges, scores) holds a few million elements in total.
pub const MAX_METADATA_ELEMENTS: u64 = 16 * 1024 * 1024;

/// Value types of GGUF key/value pairs (`gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Integer value of any integer type, for keys whose writers disagree on the width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::String(v) => json!(v),
            Value::Array(_, items) => serde_json::Value::Array(items.iter().map(Value::to_json).collect()),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F64(v) => json!(v),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(t, items) => write!(f, "[{}; {}]", t.name(), items.len()),
            other => write!(f, "{}", other.to_json()),
        }
    }
}

/// Where a tensor lives in a GGUF file and how it is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying axis (`ne[0]`).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies, from its type's block layout.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn type_name(&self) -> String {
        ggml_type::type_info(self.ggml_type).map(|t| t.name.to_string()).unwrap_or_else(|| format!("type#{}", self.ggml_type))
    }
}

/// A parsed GGUF file: header, metadata and tensor directory, data memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    bytes: Bytes,
}

/// The bytes behind a [`GgufFile`]: a file mapping, or a buffer handed in by the caller.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Array elements read so far, against [`MAX_METADATA_ELEMENTS`].
    metadata_elements: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Format { path: self.path.to_path_buf(), field: field.into(), reason: reason.into() }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(field, format!("truncated: needs {n} bytes at offset {}, file has {} left", self.pos, self.remaining())));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, field)?.try_into().expect("length checked"))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str, cap: u64) -> Result<String> {
        let len = self.u64(field)?;
        if len > cap {
            return Err(self.err(field, format!("string length {len} exceeds the limit of {cap} bytes")));
        }
        let raw = self.take(len, field)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err(field, "string is not valid UTF-8"))
    }

    fn value(&mut self, ty: ValueType, field: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(field)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(field)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(self.u32(field)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::Bool => {
                let b = self.array::<1>(field)?[0];
                if b > 1 {
                    return Err(self.err(field, format!("bool value {b} is neither 0 nor 1")));
                }
                Value::Bool(b == 1)
            }
            ValueType::String => Value::String(self.string(field, MAX_STRING_LEN)?),
            ValueType::U64 => Value::U64(self.u64(field)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Array => {
                // ggml itself refuses nested arrays.
                if depth > 0 {
                    return Err(self.err(field, "nested arrays are not allowed"));
                }
                let raw_ty = self.u32(field)?;
                let elem_ty = ValueType::from_u32(raw_ty).ok_or_else(|| self.err(field, format!("unknown array element type {raw_ty}")))?;
                if elem_ty == ValueType::Array {
                    return Err(self.err(field, "nested arrays are not allowed"));
                }
                let n = self.u64(field)?;
                if n > MAX_ARRAY_LEN {
                    return Err(self.err(field, format!("array length {n} exceeds the limit of {MAX_ARRAY_LEN}")));
                }
                // Every element takes at least one byte (strings at least eight), so a count larger
                // than what is left in the file is a lie: refuse it before reserving memory.
                let min_elem = if elem_ty == ValueType::String { 8 } else { 1 };
                if n.saturating_mul(min_elem) > self.remaining() {
                    return Err(self.err(field, format!("array length {n} does not fit in the rest of the file")));
                }
                self.metadata_elements = self.metadata_elements.saturating_add(n);
                if self.metadata_elements > MAX_METADATA_ELEMENTS {
                    return Err(self.err(field, format!("arrays hold more than {MAX_METADATA_ELEMENTS} elements in total")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, field, depth + 1)?);
                }
                Value::Array(elem_ty, items)
            }
        })
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bytes of a tensor of `dims` in ggml type `ggml_type`, or why it cannot be laid out.
pub fn tensor_bytes(ggml_type: u32, dims: &[u64]) -> std::result::Result<u64, String> {
    let info = ggml_type::type_info(ggml_type).ok_or_else(|| format!("unknown or removed ggml type {ggml_type}"))?;
    let ne0 = *dims.first().unwrap_or(&1);
    if ne0 % info.block_size != 0 {
        return Err(format!("row length {ne0} is not a multiple of the {} block size {}", info.name, info.block_size));
    }
    let rows: u64 = dims.iter().skip(1).product();
    Ok(ne0 / info.block_size * info.type_size * rows)
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let map = crate::map::map_file(&file).map_err(|e| Error::io(path, e))?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parses a GGUF image already in memory, with exactly the checks [`GgufFile::open`] makes;
    /// `path` only names the source in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.as_ref(), Bytes::Owned(bytes))
    }

    fn parse(path: &Path, map: Bytes) -> Result<Self> {
        let mut c = Cursor { bytes: &map, pos: 0, path, metadata_elements: 0 };
        let magic = c.take(4, "magic").map_err(|_| c.err("magic", "not a GGUF file (shorter than its 4-byte magic)"))?;
        if magic != GGUF_MAGIC {
            return Err(c.err("magic", format!("not a GGUF file (starts with {:?})", String::from_utf8_lossy(magic))));
        }
        let version = c.u32("version")?;
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(c.err("version", format!("GGUF version {version} is not supported (expected 2 or 3)")));
        }
        let n_tensors = c.u64("tensor_count")?;
        if n_tensors > MAX_TENSOR_COUNT {
            return Err(c.err("tensor_count", format!("{n_tensors} tensors exceeds the limit of {MAX_TENSOR_COUNT}")));
        }
        let n_kv = c.u64("metadata_kv_count")?;
        if n_kv > MAX_KV_COUNT {
            return Err(c.err("metadata_kv_count", format!("{n_kv} keys exceeds the limit of {MAX_KV_COUNT}")));
        }

        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv.min(1024) as usize);
        // A set, not a scan of `metadata`: 65536 keys compared pairwise is a denial of service.
        let mut keys_seen = std::collections::HashSet::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"), MAX_KEY_LEN)?;
            if !keys_seen.insert(key.clone()) {
                return Err(c.err(key, "duplicate metadata key"));
            }
            let raw_ty = c.u32(&key)?;
            let ty = ValueType::from_u32(raw_ty).ok_or_else(|| c.err(&key, format!("unknown value type {raw_ty}")))?;
            let value = c.value(ty, &key, 0)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => {
                let a = match v {
                    Value::U32(a) => *a as u64,
                    other => return Err(c.err("general.alignment", format!("must be u32, found {}", other.value_type().name()))),
                };
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(c.err("general.alignment", format!("{a} is not a power of two up to {MAX_ALIGNMENT}")));
                }
                a
            }
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(65536) as usize);
        let mut seen = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"), MAX_KEY_LEN)?;
            if name.len() > MAX_TENSOR_NAME_LEN {
                return Err(c.err(format!("tensor {name}"), format!("name is {} bytes, ggml allows at most {MAX_TENSOR_NAME_LEN}", name.len())));
            }
            if !seen.insert(name.clone()) {
                return Err(c.err(format!("tensor {name}"), "duplicate tensor name"));
            }
            let field = format!("tensor {name}");
            let n_dims = c.u32(&field)?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(c.err(&field, format!("{n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut n_elements: u64 = 1;
            for _ in 0..n_dims {
                let d = c.u64(&field)?;
                if d == 0 {
                    return Err(c.err(&field, "a dimension is zero"));
                }
                n_elements = n_elements
                    .checked_mul(d)
                    .filter(|n| *n <= MAX_TENSOR_ELEMENTS)
                    .ok_or_else(|| c.err(&field, format!("more than {MAX_TENSOR_ELEMENTS} elements")))?;
                dims.push(d);
            }
            let ggml_type = c.u32(&field)?;
            let n_bytes = tensor_bytes(ggml_type, &dims).map_err(|reason| c.err(&field, reason))?;
            let offset = c.u64(&field)?;
            if offset % alignment != 0 {
                return Err(c.err(&field, format!("data offset {offset} is not aligned to {alignment}")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
        }

        let data_offset = align_up(c.pos as u64, alignment);
        let file_len = map.len() as u64;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::Format {
                        path: path.to_path_buf(),
                        field: format!("tensor {}", t.name),
                        reason: format!(
                            "data (offset {} + {} bytes) lies outside the file ({file_len} bytes): truncated or corrupt",
                            t.offset, t.n_bytes
                        ),
                    })
                }
            }
        }
        // Overlapping tensors would let one write alias another in tools that trust the layout.
        let mut spans: Vec<(u64, u64, &str)> = tensors.iter().map(|t| (t.offset, t.offset + t.n_bytes, t.name.as_str())).collect();
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    field: format!("tensor {}", w[1].2),
                    reason: format!("data overlaps tensor {}", w[0].2),
                });
            }
        }

        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, alignment, data_offset, bytes: map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.bytes[start..start + t.n_bytes as usize]
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A tensor to be written: ggml-order dims and already-encoded bytes.
pub struct TensorOut {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory order and writes it atomically.
#[derive(Default)]
pub struct GgufWriter {
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorOut>,
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_string(w, s),
        Value::Array(t, items) => {
            w.write_all(&(*t as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn set(&mut self, key: &str, value: Value) {
        self.metadata.insert(key.to_string(), value);
    }

    /// Serialises the whole file. Keys are written in sorted order and tensors in insertion
    /// order so that the same content always gives the same bytes (manifest hashes rely on it).
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<u64> {
        let alignment = DEFAULT_ALIGNMENT;
        let mut header: Vec<u8> = Vec::new();
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut header, k)?;
            header.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            write_value(&mut header, v)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut header, &t.name)?;
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + t.data.len() as u64, alignment);
        }
        let pad = align_up(header.len() as u64, alignment) - header.len() as u64;
        header.resize(header.len() + pad as usize, 0);
        out.write_all(&header)?;
        let mut written = header.len() as u64;
        for t in &self.tensors {
            out.write_all(&t.data)?;
            let pad = align_up(t.data.len() as u64, alignment) - t.data.len() as u64;
            out.write_all(&vec![0u8; pad as usize])?;
            written += t.data.len() as u64 + pad;
        }
        Ok(written)
    }

    /// Writes to `path` through a temporary file in the same directory and a rename, so a
    /// crash or a full disk never leaves a half-written adapter under the final name.
    /// Returns the number of bytes written.
    pub fn write_atomic(&self, path: &Path, inputs: &[&Path]) -> Result<u64> {
        crate::fsutil::write_atomic(path, inputs, |f| {
            let mut w = BufWriter::new(f);
            let n = self.write_to(&mut w)?;
            w.flush()?;
            Ok(n)
        })
    }
}
