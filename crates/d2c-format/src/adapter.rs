//! The in-memory LoRA adapter and its GGUF encoding (llama.cpp's adapter format).
//!
//! For every target weight `W` (out x in) an adapter holds `A` (r x in) and `B` (out x r), both
//! row-major f32, so that its delta is `scale * B A` with `scale = alpha / r` (or 1 when alpha
//! is 0, as llama.cpp does). In ggml order `lora_a.ne = [in, r]` and `lora_b.ne = [r, out]`,
//! which is the same memory as the row-major matrices above: no transposition on disk.
//!
//! `token_embd.weight` pairs are stored by llama.cpp the other way round (`a.ne = [r, n_vocab]`,
//! `b.ne = [r, n_embd]`); on read they are turned into the common form (out = n_vocab,
//! in = n_embd) so that every merge operator treats all targets alike, and turned back on write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ggml_type;
use crate::gguf::{GgufFile, GgufWriter, TensorOut, Value};

pub const KEY_GENERAL_TYPE: &str = "general.type";
pub const KEY_ARCHITECTURE: &str = "general.architecture";
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_ALPHA: &str = "adapter.lora.alpha";
pub const KEY_TASK_NAME: &str = "adapter.lora.task_name";
pub const KEY_PROMPT_PREFIX: &str = "adapter.lora.prompt_prefix";
pub const KEY_ALORA_TOKENS: &str = "adapter.alora.invocation_tokens";
pub const SUFFIX_A: &str = ".lora_a";
pub const SUFFIX_B: &str = ".lora_b";
pub const TOKEN_EMBD: &str = "token_embd.weight";

/// Storage types an adapter can be written in (all load and compute in llama.cpp, mixed
/// within a file; tests/server_cast.rs checks each in llama-server). The block types hold 32
/// values per block, so only tensors whose rows are whole blocks take them (`lora_a`, rows
/// `n_in` long); the others (`lora_b` below rank 32) fall back to F16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 8-bit blocks of 32 values with an f16 scale (8.5 bits per value).
    #[value(name = "q8_0")]
    Q8_0,
    /// 5-bit blocks (5.5 bits per value).
    #[value(name = "q5_0")]
    Q5_0,
    /// 4-bit blocks (4.5 bits per value).
    #[value(name = "q4_0")]
    Q4_0,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q5_0, DType::Q4_0];

    pub fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => ggml_type::F32,
            DType::F16 => ggml_type::F16,
            DType::BF16 => ggml_type::BF16,
            DType::Q8_0 => ggml_type::Q8_0,
            DType::Q5_0 => ggml_type::Q5_0,
            DType::Q4_0 => ggml_type::Q4_0,
        }
    }

    pub fn from_ggml(t: u32) -> Option<Self> {
        DType::ALL.into_iter().find(|d| d.ggml_type() == t)
    }

    fn layout(self) -> ggml_type::TypeInfo {
        ggml_type::type_info(self.ggml_type()).expect("every DType is a ggml type")
    }

    /// Encoded bytes of a row of `row_len` values (per 32 values: Q8_0 34 bytes, Q5_0 22,
    /// Q4_0 18: one f16 scale and the quants).
    pub fn row_bytes(self, row_len: usize) -> usize {
        let t = self.layout();
        row_len / t.block_size as usize * t.type_size as usize
    }

    /// Values per block of a block-quantised type.
    pub fn block_len(self) -> Option<usize> {
        let t = self.layout();
        (t.block_size > 1).then_some(t.block_size as usize)
    }

    /// Whether rows of this length can be stored in this type.
    pub fn fits_row(self, row_len: usize) -> bool {
        self.block_len().is_none_or(|b| row_len % b == 0)
    }
}

crate::value_names!(DType, "dtype");

/// One adapted weight: `delta = scale * B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTarget {
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    /// r x in, row-major.
    pub a: Vec<f32>,
    /// out x r, row-major.
    pub b: Vec<f32>,
    /// Storage types of the tensors this target was read from (F32 for targets built in memory).
    pub a_dtype: DType,
    pub b_dtype: DType,
}

impl LoraTarget {
    pub fn new(a: Vec<f32>, b: Vec<f32>, rank: usize, n_in: usize, n_out: usize) -> Self {
        assert_eq!(a.len(), rank * n_in, "A must be rank x n_in");
        assert_eq!(b.len(), n_out * rank, "B must be n_out x rank");
        LoraTarget { rank, n_in, n_out, a, b, a_dtype: DType::F32, b_dtype: DType::F32 }
    }

    pub fn n_params(&self) -> usize {
        self.a.len() + self.b.len()
    }

    /// Dense `B A` (out x in, row-major), without the scale. Only for tests and small checks:
    /// the pipeline never needs the dense delta.
    pub fn dense_ba(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.n_out * self.n_in];
        for o in 0..self.n_out {
            for k in 0..self.rank {
                let bk = self.b[o * self.rank + k];
                if bk == 0.0 {
                    continue;
                }
                let row = &self.a[k * self.n_in..(k + 1) * self.n_in];
                for (dst, av) in d[o * self.n_in..(o + 1) * self.n_in].iter_mut().zip(row) {
                    *dst += bk * av;
                }
            }
        }
        d
    }
}

/// A LoRA adapter for one base-model architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub architecture: String,
    /// One alpha for the whole file; 0 means "no alpha scaling" (scale 1) as in llama.cpp.
    pub alpha: f32,
    /// Keyed by base tensor name (`blk.3.attn_q.weight`), sorted so output is deterministic.
    pub targets: BTreeMap<String, LoraTarget>,
    /// Every other metadata key (task name, prompt prefix, provenance), kept as read.
    pub metadata: BTreeMap<String, Value>,
}

impl LoraAdapter {
    pub fn new(architecture: impl Into<String>, alpha: f32) -> Self {
        LoraAdapter { architecture: architecture.into(), alpha, targets: BTreeMap::new(), metadata: BTreeMap::new() }
    }

    /// The factor that multiplies `B A` for a target of rank `rank` in llama.cpp.
    pub fn scale_for_rank(&self, rank: usize) -> f32 {
        if self.alpha == 0.0 {
            1.0
        } else {
            self.alpha / rank as f32
        }
    }

    pub fn scale(&self, target: &LoraTarget) -> f32 {
        self.scale_for_rank(target.rank)
    }

    pub fn max_rank(&self) -> usize {
        self.targets.values().map(|t| t.rank).max().unwrap_or(0)
    }

    pub fn n_params(&self) -> usize {
        self.targets.values().map(LoraTarget::n_params).sum()
    }

    pub fn task_name(&self) -> Option<&str> {
        self.metadata.get(KEY_TASK_NAME).and_then(Value::as_str)
    }

    /// Multiplies each target's B by its current scale and sets alpha to 0 (scale 1), so the
    /// file says exactly `delta = B A` whatever the per-target ranks are.
    pub fn fold_scale_into_b(&mut self) {
        let alpha = self.alpha;
        for t in self.targets.values_mut() {
            let s = if alpha == 0.0 { 1.0 } else { alpha / t.rank as f32 };
            if s != 1.0 {
                t.b.iter_mut().for_each(|v| *v *= s);
            }
        }
        self.alpha = 0.0;
    }

    /// Reads an adapter file; every structural problem is an error naming the file and tensor.
    /// (Checks against a base model are `validate`'s job.)
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_gguf(&file)
    }

    /// [`LoraAdapter::read`] for a file image already in memory (same parser, same checks);
    /// `path` only names the source in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let file = GgufFile::from_bytes(path, bytes)?;
        Self::from_gguf(&file)
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = &file.path;
        let inv = |field: &str, reason: String| Error::invalid(path, field, reason);
        match file.get(KEY_GENERAL_TYPE) {
            Some(Value::String(s)) if s == "adapter" => {}
            Some(v) => return Err(inv(KEY_GENERAL_TYPE, format!("expected \"adapter\", found {v}"))),
            None => return Err(inv(KEY_GENERAL_TYPE, "missing (not a llama.cpp adapter)".into())),
        }
        match file.get(KEY_ADAPTER_TYPE) {
            Some(Value::String(s)) if s == "lora" => {}
            Some(v) => return Err(inv(KEY_ADAPTER_TYPE, format!("expected \"lora\", found {v}"))),
            None => return Err(inv(KEY_ADAPTER_TYPE, "missing".into())),
        }
        let architecture = match file.get(KEY_ARCHITECTURE) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(v) => return Err(inv(KEY_ARCHITECTURE, format!("expected a non-empty string, found {v}"))),
            None => return Err(inv(KEY_ARCHITECTURE, "missing".into())),
        };
        let alpha = match file.get(KEY_ALPHA) {
            None => 0.0,
            Some(Value::F32(a)) if a.is_finite() => *a,
            Some(v) => return Err(inv(KEY_ALPHA, format!("expected a finite f32, found {v}"))),
        };
        let mut metadata = BTreeMap::new();
        for (k, v) in &file.metadata {
            if ![KEY_GENERAL_TYPE, KEY_ADAPTER_TYPE, KEY_ARCHITECTURE, KEY_ALPHA, "general.alignment"].contains(&k.as_str()) {
                metadata.insert(k.clone(), v.clone());
            }
        }

        let mut halves: BTreeMap<String, (Option<usize>, Option<usize>)> = BTreeMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            if let Some(base) = t.name.strip_suffix(SUFFIX_A) {
                halves.entry(base.to_string()).or_default().0 = Some(i);
            } else if let Some(base) = t.name.strip_suffix(SUFFIX_B) {
                halves.entry(base.to_string()).or_default().1 = Some(i);
            } else if t.name.ends_with("_norm.weight") {
                // llama.cpp skips these silently; so do we (they are not part of the delta).
                continue;
            } else {
                return Err(inv(&format!("tensor {}", t.name), "unexpected suffix (expected .lora_a or .lora_b)".into()));
            }
        }

        let mut targets = BTreeMap::new();
        for (base, (ia, ib)) in halves {
            let (ia, ib) = match (ia, ib) {
                (Some(a), Some(b)) => (a, b),
                (Some(_), None) => return Err(inv(&format!("tensor {base}{SUFFIX_A}"), format!("has no matching {base}{SUFFIX_B}"))),
                (None, Some(_)) => return Err(inv(&format!("tensor {base}{SUFFIX_B}"), format!("has no matching {base}{SUFFIX_A}"))),
                (None, None) => unreachable!(),
            };
            let (ta, tb) = (&file.tensors[ia], &file.tensors[ib]);
            for t in [ta, tb] {
                if t.dims.len() != 2 {
                    return Err(inv(&format!("tensor {}", t.name), format!("has {} dimensions, a LoRA factor has 2", t.dims.len())));
                }
            }
            let dtype_of = |t: &crate::gguf::TensorInfo| {
                DType::from_ggml(t.ggml_type).ok_or_else(|| {
                    inv(
                        &format!("tensor {}", t.name),
                        format!("type {} is not supported for adapters (f32, f16, bf16, q8_0, q5_0, q4_0)", t.type_name()),
                    )
                })
            };
            let (a_dtype, b_dtype) = (dtype_of(ta)?, dtype_of(tb)?);
            let decode = |t: &crate::gguf::TensorInfo| {
                ggml_type::decode_to_f32(t.ggml_type, file.tensor_data(t), t.n_elements() as usize).map_err(|r| inv(&format!("tensor {}", t.name), r))
            };
            let (a_raw, b_raw) = (decode(ta)?, decode(tb)?);
            let is_embd = base.ends_with(TOKEN_EMBD);
            let target = if is_embd {
                // a.ne = [r, n_vocab] -> row-major (n_vocab x r) is our B;
                // b.ne = [r, n_embd]  -> row-major (n_embd x r), transposed is our A.
                let (r, n_vocab) = (ta.dims[0] as usize, ta.dims[1] as usize);
                let (rb, n_embd) = (tb.dims[0] as usize, tb.dims[1] as usize);
                if r != rb {
                    return Err(inv(&format!("tensor {base}"), format!("lora_a rank {r} differs from lora_b rank {rb}")));
                }
                let a = transpose(&b_raw, n_embd, r);
                LoraTarget { rank: r, n_in: n_embd, n_out: n_vocab, a, b: a_raw, a_dtype: b_dtype, b_dtype: a_dtype }
            } else {
                let (n_in, r) = (ta.dims[0] as usize, ta.dims[1] as usize);
                let (rb, n_out) = (tb.dims[0] as usize, tb.dims[1] as usize);
                if r != rb {
                    return Err(inv(
                        &format!("tensor {base}"),
                        format!("lora_a has rank {r} (ne[1]) but lora_b has rank {rb} (ne[0]); lora_a may be transposed"),
                    ));
                }
                LoraTarget { rank: r, n_in, n_out, a: a_raw, b: b_raw, a_dtype, b_dtype }
            };
            targets.insert(base, target);
        }
        if targets.is_empty() {
            return Err(inv("tensors", "the adapter has no lora_a/lora_b pairs".into()));
        }
        Ok(LoraAdapter { architecture, alpha, targets, metadata })
    }

    /// Encodes the adapter as GGUF with every tensor in `dtype`, except that under a block type
    /// a tensor whose rows are not whole 32-value blocks (`lora_b` of a rank below 32, say) is stored as
    /// F16, as llama.cpp's own converter does; F16 is the nearest type with no block constraint.
    pub fn to_gguf(&self, dtype: DType) -> Result<GgufWriter> {
        let mut w = GgufWriter::default();
        for (k, v) in &self.metadata {
            w.set(k, v.clone());
        }
        w.set(KEY_GENERAL_TYPE, Value::String("adapter".into()));
        w.set(KEY_ARCHITECTURE, Value::String(self.architecture.clone()));
        w.set(KEY_ADAPTER_TYPE, Value::String("lora".into()));
        w.set(KEY_ALPHA, Value::F32(self.alpha));
        let fail = |name: &str, reason: String| Error::Internal(format!("cannot write tensor {name} as {dtype}: {reason}"));
        // Tensors are encoded in parallel (quantising is the slow part of writing), in the
        // targets' order so that the file is the same whatever the thread count.
        let encoded: Vec<[TensorOut; 2]> = self
            .targets
            .par_iter()
            .map(|(base, t)| {
                // (row-major data, row length, ggml dims) of lora_a and lora_b as llama.cpp wants them.
                let (a_data, a_row, a_dims, b_data, b_row, b_dims) = if base.ends_with(TOKEN_EMBD) {
                    let b_file = transpose(&t.a, t.rank, t.n_in); // n_embd x r
                    (t.b.clone(), t.rank, vec![t.rank as u64, t.n_out as u64], b_file, t.rank, vec![t.rank as u64, t.n_in as u64])
                } else {
                    (t.a.clone(), t.n_in, vec![t.n_in as u64, t.rank as u64], t.b.clone(), t.rank, vec![t.rank as u64, t.n_out as u64])
                };
                let encode_one = |suffix: &str, data: Vec<f32>, row: usize, dims: Vec<u64>| -> Result<TensorOut> {
                    let name = format!("{base}{suffix}");
                    if name.len() > crate::gguf::MAX_TENSOR_NAME_LEN {
                        return Err(fail(&name, "name is longer than ggml's 63 bytes".into()));
                    }
                    let chosen = if dtype.fits_row(row) { dtype } else { DType::F16 };
                    let bytes = ggml_type::encode_from_f32(chosen.ggml_type(), &data, row).map_err(|r| fail(&name, r))?;
                    Ok(TensorOut { name, dims, ggml_type: chosen.ggml_type(), data: bytes })
                };
                Ok([encode_one(SUFFIX_A, a_data, a_row, a_dims)?, encode_one(SUFFIX_B, b_data, b_row, b_dims)?])
            })
            .collect::<Result<_>>()?;
        w.tensors.extend(encoded.into_iter().flatten());
        Ok(w)
    }

    /// The storage type these targets were read in, so that rewriting an adapter (cut, merged,
    /// converted) keeps its size class: the one type they share; a block type when they mix it
    /// with the F16 that block types fall back to for short rows; F32 for any other mix and
    /// for targets built in memory.
    pub fn stored_dtype(adapters: &[&LoraAdapter]) -> DType {
        let types: std::collections::BTreeSet<DType> =
            adapters.iter().flat_map(|a| a.targets.values()).flat_map(|t| [t.a_dtype, t.b_dtype]).collect();
        match types.into_iter().collect::<Vec<_>>().as_slice() {
            [one] => *one,
            [DType::F16, q] if q.block_len().is_some() => *q,
            _ => DType::F32,
        }
    }

    /// Writes the adapter atomically; refuses to replace any of `inputs`. Returns bytes written.
    pub fn write(&self, path: &Path, dtype: DType, inputs: &[&Path]) -> Result<u64> {
        self.to_gguf(dtype)?.write_atomic(path, inputs)
    }

    /// Encoded file size in `dtype` without writing it.
    pub fn encoded_bytes(&self, dtype: DType) -> Result<u64> {
        let w = self.to_gguf(dtype)?;
        let mut counter = ByteCounter(0);
        w.write_to(&mut counter).map_err(|e| Error::Internal(e.to_string()))
    }
}

struct ByteCounter(u64);
impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Row-major `rows x cols` -> row-major `cols x rows`.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Summary of one adapter file, as `inspect` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub name: String,
    pub rank: usize,
    #[serde(rename = "in")]
    pub n_in: usize,
    #[serde(rename = "out")]
    pub n_out: usize,
    pub dtype_a: DType,
    pub dtype_b: DType,
    pub bytes: u64,
    pub params: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub file: PathBuf,
    pub architecture: String,
    pub alpha: f32,
    pub task_name: Option<String>,
    pub file_bytes: u64,
    pub total_params: usize,
    pub max_rank: usize,
    pub targets: Vec<TargetSummary>,
    pub metadata: BTreeMap<String, serde_json::Value>,
}

pub fn summarize(path: &Path) -> Result<AdapterSummary> {
    let file = GgufFile::open(path)?;
    let adapter = LoraAdapter::from_gguf(&file)?;
    let bytes_of = |name: String| file.tensor(&name).map(|t| t.n_bytes).unwrap_or(0);
    let targets = adapter
        .targets
        .iter()
        .map(|(name, t)| TargetSummary {
            name: name.clone(),
            rank: t.rank,
            n_in: t.n_in,
            n_out: t.n_out,
            dtype_a: t.a_dtype,
            dtype_b: t.b_dtype,
            bytes: bytes_of(format!("{name}{SUFFIX_A}")) + bytes_of(format!("{name}{SUFFIX_B}")),
            params: t.n_params(),
        })
        .collect();
    Ok(AdapterSummary {
        file: path.to_path_buf(),
        architecture: adapter.architecture.clone(),
        alpha: adapter.alpha,
        task_name: adapter.task_name().map(str::to_string),
        file_bytes: file.file_len(),
        total_params: adapter.n_params(),
        max_rank: adapter.max_rank(),
        targets,
        metadata: adapter.metadata.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
    })
}
