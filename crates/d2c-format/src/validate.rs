//! `validate`: every check llama.cpp's adapter loader makes, plus what it would only trip over
//! later (a `token_embd` pair on a tied-embedding model aborts at the first decode) and values
//! that would poison every output (NaN/Inf). All problems are collected, not just the first.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::adapter::{DType, KEY_ADAPTER_TYPE, KEY_ALORA_TOKENS, KEY_ALPHA, KEY_ARCHITECTURE, KEY_GENERAL_TYPE, SUFFIX_A, SUFFIX_B, TOKEN_EMBD};
use crate::base::BaseModel;
use crate::ggml_type;
use crate::gguf::{GgufFile, TensorInfo, Value, ValueType};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// The tensor or key at fault (or `file` for the container itself).
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
    }
}

/// Checks one adapter file against a base model. An empty list means llama.cpp will load it
/// and run it.
pub fn validate_adapter(base: &BaseModel, path: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut report = |field: &str, message: String| problems.push(Problem { file: path.to_path_buf(), field: field.to_string(), message });
    let file = match GgufFile::open(path) {
        Ok(f) => f,
        Err(e) => {
            let (field, message) = match &e {
                crate::Error::Format { field, reason, .. } | crate::Error::Invalid { field, reason, .. } => (field.clone(), reason.clone()),
                crate::Error::Io { error, .. } => ("file".to_string(), error.to_string()),
                other => ("file".to_string(), other.to_string()),
            };
            report(&field, message);
            return problems;
        }
    };

    let expect_str = |key: &str, want: &str| -> Option<String> {
        match file.get(key) {
            Some(Value::String(s)) if s == want => None,
            Some(v) => Some(format!("expected \"{want}\", found {v}")),
            None => Some(format!("missing (llama.cpp requires \"{want}\")")),
        }
    };
    if let Some(m) = expect_str(KEY_GENERAL_TYPE, "adapter") {
        report(KEY_GENERAL_TYPE, m);
    }
    if let Some(m) = expect_str(KEY_ADAPTER_TYPE, "lora") {
        report(KEY_ADAPTER_TYPE, m);
    }
    if let Some(m) = expect_str(KEY_ARCHITECTURE, &base.architecture) {
        report(KEY_ARCHITECTURE, format!("{m}: the base model {} is {}", base.path.display(), base.architecture));
    }
    match file.get(KEY_ALPHA) {
        None | Some(Value::F32(_)) => {}
        Some(v) => report(KEY_ALPHA, format!("must be f32, found {}", v.value_type().name())),
    }
    if let Some(Value::F32(a)) = file.get(KEY_ALPHA) {
        if !a.is_finite() {
            report(KEY_ALPHA, format!("is {a}"));
        }
    }
    match file.get(KEY_ALORA_TOKENS) {
        None | Some(Value::Array(ValueType::U32, _)) => {}
        Some(Value::Array(t, _)) => report(KEY_ALORA_TOKENS, format!("must be an array of u32, found an array of {}", t.name())),
        Some(v) => report(KEY_ALORA_TOKENS, format!("must be an array of u32, found {}", v.value_type().name())),
    }

    let mut pairs: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in &file.tensors {
        if let Some(b) = t.name.strip_suffix(SUFFIX_A) {
            pairs.entry(b.to_string()).or_default().0 = Some(t);
        } else if let Some(b) = t.name.strip_suffix(SUFFIX_B) {
            pairs.entry(b.to_string()).or_default().1 = Some(t);
        } else if !t.name.ends_with("_norm.weight") {
            report(&t.name, "unexpected suffix: llama.cpp accepts only .lora_a and .lora_b (and skips *_norm.weight)".into());
        }
    }
    if pairs.is_empty() {
        report("tensors", "no lora_a/lora_b pairs: the adapter would change nothing".into());
    }

    for (name, (a, b)) in &pairs {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (*a, *b),
            (Some(a), None) => {
                report(&a.name, format!("lone half: {name}{SUFFIX_B} is missing"));
                continue;
            }
            (None, Some(b)) => {
                report(&b.name, format!("lone half: {name}{SUFFIX_A} is missing"));
                continue;
            }
            (None, None) => continue,
        };
        let mut ok = true;
        for t in [a, b] {
            if DType::from_ggml(t.ggml_type).is_none() {
                report(&t.name, format!("type {} is not one adapters are written in (f32, f16, bf16, q8_0)", t.type_name()));
                ok = false;
            }
            if t.dims.len() != 2 {
                report(&t.name, format!("has {} dimensions, a LoRA factor has 2", t.dims.len()));
                ok = false;
            }
        }
        let Some(w) = base.tensor_dims(name) else {
            let hint = if name == "output.weight" && base.tied_embeddings {
                " (the base ties its output to token_embd; llama.cpp refuses output.weight pairs on it)"
            } else {
                " (wrong base model?)"
            };
            report(&a.name, format!("base tensor {name} does not exist in {}{hint}", base.path.display()));
            continue;
        };
        if !ok {
            continue;
        }
        let (a_ne, b_ne) = (&a.dims, &b.dims);
        let w1 = w.get(1).copied().unwrap_or(1);
        if name.ends_with(TOKEN_EMBD) {
            if base.tied_embeddings {
                report(&a.name, "token_embd LoRA on a model with tied embeddings: llama.cpp aborts at the first decode".into());
            }
            if w[0] != b_ne[1] || w1 != a_ne[1] {
                report(&a.name, format!("shape a.ne={a_ne:?} b.ne={b_ne:?} does not fit {name} ne={w:?} (expected a.ne[1]={w1}, b.ne[1]={})", w[0]));
            } else if a_ne[0] != b_ne[0] {
                report(&a.name, format!("rank of lora_a ({}) differs from lora_b ({})", a_ne[0], b_ne[0]));
            }
        } else {
            if w[0] != a_ne[0] {
                report(&a.name, format!("ne[0]={} but base {name} has ne[0]={} (input size)", a_ne[0], w[0]));
            }
            if w1 != b_ne[1] {
                report(&b.name, format!("ne[1]={} but base {name} has ne[1]={w1} (output size)", b_ne[1]));
            }
            if a_ne[1] != b_ne[0] {
                report(&a.name, format!("rank mismatch: lora_a ne[1]={} but lora_b ne[0]={} (lora_a transposed?)", a_ne[1], b_ne[0]));
            }
        }
        for t in [a, b] {
            match ggml_type::decode_to_f32(t.ggml_type, file.tensor_data(t), t.n_elements() as usize) {
                Ok(values) => {
                    let bad = values.iter().filter(|v| !v.is_finite()).count();
                    if bad > 0 {
                        report(&t.name, format!("{bad} NaN/Inf values"));
                    }
                }
                Err(e) => report(&t.name, e),
            }
        }
    }
    problems
}
