//! What we need to know about a base model, read from its GGUF header alone (no weights loaded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

#[derive(Debug, Clone)]
pub struct BaseModel {
    pub path: PathBuf,
    pub architecture: String,
    /// Tensor name -> ggml dims (`ne`).
    pub tensors: HashMap<String, Vec<u64>>,
    /// No `output.weight`: the output projection reuses `token_embd.weight`.
    pub tied_embeddings: bool,
    /// `<arch>.*` hyper-parameters that converters need (head counts, sizes).
    pub hparams: HashMap<String, u64>,
}

impl BaseModel {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_gguf(&file)
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = &file.path;
        if file.get_str("general.type") == Some("adapter") {
            return Err(Error::invalid(path, "general.type", "this is an adapter, not a base model"));
        }
        let architecture =
            file.get_str("general.architecture").ok_or_else(|| Error::invalid(path, "general.architecture", "missing or not a string"))?.to_string();
        let tensors: HashMap<String, Vec<u64>> = file.tensors.iter().map(|t| (t.name.clone(), t.dims.clone())).collect();
        let tied_embeddings = tensors.contains_key("token_embd.weight") && !tensors.contains_key("output.weight");
        let prefix = format!("{architecture}.");
        let hparams = file
            .metadata
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix(&prefix)?;
                match v {
                    Value::Array(..) => None,
                    v => v.as_u64().map(|n| (key.to_string(), n)),
                }
            })
            .collect();
        Ok(BaseModel { path: path.clone(), architecture, tensors, tied_embeddings, hparams })
    }

    pub fn tensor_dims(&self, name: &str) -> Option<&[u64]> {
        self.tensors.get(name).map(Vec::as_slice)
    }

    pub fn hparam(&self, key: &str) -> Option<u64> {
        self.hparams.get(key).copied()
    }
}
