//! `convert`: PEFT LoRA adapters (`adapter_model.safetensors` + `adapter_config.json`) to
//! llama.cpp GGUF adapters, with nothing but the GGUF base model the user already deploys.
//!
//! llama.cpp's own converter needs torch, transformers and the Hugging Face base directory; it
//! learns names, head counts and shapes from there. We take the same facts from the base GGUF:
//! its architecture picks the HF -> GGUF name table, `attention.head_count(_kv)` drive the
//! rotary row permutation of llama-family q/k, and its tensor shapes check every factor.
//!
//! What the reference converter leaves out is handled here: `use_rslora` (alpha / sqrt r),
//! `rank_pattern` and `alpha_pattern` are folded into `lora_b`, because a GGUF adapter has one
//! alpha per file (the file then says alpha = 0, i.e. scale 1). When every target shares one
//! plain alpha the file keeps `lora_alpha`, exactly as the reference writes it.
//!
//! Everything that cannot be represented faithfully is refused before anything is written:
//! DoRA, LoRA biases, full weights (`modules_to_save`), modules the architecture lacks, a base
//! of another model, an embedding LoRA on a tied-embedding base. Each output is checked with
//! [`crate::validate`] in a temporary file before it is renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::adapter::{DType, LoraAdapter, LoraTarget, KEY_ALORA_TOKENS, KEY_TASK_NAME, TOKEN_EMBD};
use crate::base::BaseModel;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::gguf::{GgufWriter, Value, ValueType};
use crate::validate;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// adapter_config.json is a few KiB even with a rank_pattern entry for every module of a
/// 100-layer model; it is read whole and parsed twice, so anything past 4 MiB is refused.
pub const MAX_ADAPTER_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// The safetensors JSON header (names, dtypes, shapes, offsets) takes ~150 bytes per tensor:
/// 16 MiB is 100k tensors, far above any adapter. The format's own ceiling (100 MB) would let
/// one file make us parse that much JSON before a single check of ours.
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 16 * 1024 * 1024;
const OUTPUT: &str = "output.weight";

/// GGUF architectures we can convert to, with what each needs.
struct ArchSpec {
    name: &'static str,
    /// llama.cpp's llama graph uses the interleaved rotary layout; convert_hf_to_gguf.py
    /// permutes the rows of q_proj and k_proj for it, so lora_B of q and k must follow.
    permute_qk: bool,
    /// Per-layer PEFT module suffix (after `layers.N.`) -> GGUF tensor stem.
    layer_modules: &'static [(&'static str, &'static str)],
}

const SEPARATE_PROJECTIONS: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Phi-3 keeps q/k/v fused and gate+up fused; llama.cpp keeps them fused too (`ffn_up` holds
/// gate and up), so its LoRA maps one to one.
const PHI3_PROJECTIONS: &[(&str, &str)] =
    &[("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")];

const ARCHS: &[ArchSpec] = &[
    ArchSpec { name: "llama", permute_qk: true, layer_modules: SEPARATE_PROJECTIONS },
    ArchSpec { name: "qwen2", permute_qk: false, layer_modules: SEPARATE_PROJECTIONS },
    ArchSpec { name: "qwen3", permute_qk: false, layer_modules: SEPARATE_PROJECTIONS },
    ArchSpec { name: "gemma2", permute_qk: false, layer_modules: SEPARATE_PROJECTIONS },
    ArchSpec { name: "gemma3", permute_qk: false, layer_modules: SEPARATE_PROJECTIONS },
    ArchSpec { name: "phi3", permute_qk: false, layer_modules: PHI3_PROJECTIONS },
];

/// The GGUF architectures `convert` supports.
pub fn supported_architectures() -> Vec<&'static str> {
    ARCHS.iter().map(|a| a.name).collect()
}

/// What we use of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In file order: PEFT takes the first pattern that matches a module.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
}

impl PeftConfig {
    /// Reads and checks `adapter_config.json`; refuses what cannot be converted faithfully.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = fsutil::read_capped(path, MAX_ADAPTER_CONFIG_BYTES, "file size")?;
        Self::parse(path, &bytes)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let inv = |field: &str, reason: String| Error::invalid(path, field, reason);
        if bytes.len() as u64 > MAX_ADAPTER_CONFIG_BYTES {
            return Err(Error::Format {
                path: path.to_path_buf(),
                field: "file size".into(),
                reason: format!("{} bytes exceeds the limit of {MAX_ADAPTER_CONFIG_BYTES} bytes", bytes.len()),
            });
        }
        let json: Json = serde_json::from_slice(bytes).map_err(|e| inv("json", format!("not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| inv("json", "expected a JSON object".into()))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());

        if let Some(t) = get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(inv("peft_type", format!("is {t}: only LoRA adapters (\"LORA\") can be converted")));
            }
        }
        let flag = |key: &str| -> Result<bool> {
            match get(key) {
                None => Ok(false),
                Some(Json::Bool(b)) => Ok(*b),
                Some(v) => Err(inv(key, format!("expected true or false, found {v}"))),
            }
        };
        if flag("use_dora")? {
            return Err(inv("use_dora", "DoRA adapters carry magnitude vectors that llama.cpp cannot apply".into()));
        }
        if flag("lora_bias")? {
            return Err(inv("lora_bias", "LoRA biases (lora_B.bias) are not supported by llama.cpp adapters".into()));
        }
        if get("layer_replication").is_some() {
            return Err(inv("layer_replication", "replicated layers change the base model's structure; llama.cpp cannot apply that".into()));
        }
        if get("target_parameters").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(inv("target_parameters", "LoRA on raw parameters (e.g. MoE experts) has no llama.cpp adapter form".into()));
        }
        if get("trainable_token_indices").is_some() {
            return Err(inv("trainable_token_indices", "trainable tokens replace embedding rows; llama.cpp adapters cannot carry them".into()));
        }

        let positive_int = |key: &str, v: &Json| -> Result<usize> {
            v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| inv(key, format!("expected a positive integer, found {v}")))
        };
        let finite = |key: &str, v: &Json| -> Result<f64> {
            v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| inv(key, format!("expected a number, found {v}")))
        };
        let r = positive_int("r", get("r").ok_or_else(|| inv("r", "missing (the LoRA rank)".into()))?)?;
        let lora_alpha = finite("lora_alpha", get("lora_alpha").ok_or_else(|| inv("lora_alpha", "missing".into()))?)?;
        let use_rslora = flag("use_rslora")?;

        // serde_json's map is sorted; PEFT's first-match rule needs the file's key order.
        #[derive(Deserialize)]
        struct PatternOrder {
            #[serde(default)]
            rank_pattern: Option<KeyOrder>,
            #[serde(default)]
            alpha_pattern: Option<KeyOrder>,
        }
        let pattern = |key: &str, order: Option<KeyOrder>| -> Result<Vec<(String, Json)>> {
            let Some(v) = get(key) else { return Ok(Vec::new()) };
            let map = v.as_object().ok_or_else(|| inv(key, format!("expected an object, found {v}")))?;
            let order = order.map(|o| o.0).unwrap_or_default();
            let mut out = Vec::with_capacity(map.len());
            for k in order {
                check_pattern(&k).map_err(|reason| inv(key, reason))?;
                out.push((k.clone(), map[&k].clone()));
            }
            Ok(out)
        };
        let order: PatternOrder = serde_json::from_slice(bytes).map_err(|e| inv("rank_pattern/alpha_pattern", format!("unreadable: {e}")))?;
        let rank_pattern = pattern("rank_pattern", order.rank_pattern)?
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), positive_int(&format!("rank_pattern.{k}"), &v)?)))
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = pattern("alpha_pattern", order.alpha_pattern)?
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), finite(&format!("alpha_pattern.{k}"), &v)?)))
            .collect::<Result<Vec<_>>>()?;

        let alora_invocation_tokens = match get("alora_invocation_tokens") {
            None => None,
            Some(Json::Array(items)) => Some(
                items
                    .iter()
                    .map(|t| t.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| inv("alora_invocation_tokens", "expected a list of token ids".into()))?,
            ),
            Some(v) => return Err(inv("alora_invocation_tokens", format!("expected a list of token ids, found {v}"))),
        };
        if alora_invocation_tokens.is_none() && get("invocation_string").is_some() {
            return Err(inv(
                "invocation_string",
                "an activated LoRA needs its invocation tokens: set alora_invocation_tokens (tokenize the string with the base tokenizer)".into(),
            ));
        }
        Ok(PeftConfig { r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, alora_invocation_tokens })
    }

    /// The rank PEFT gives `module` (its full name, e.g. `model.layers.0.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern.iter().find(|(p, _)| pattern_matches(p, module)).map_or(self.r, |(_, r)| *r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, module)).map_or(self.lora_alpha, |(_, a)| *a)
    }

    /// The factor PEFT multiplies `B A` by for `module` at rank `rank`.
    pub fn scale_for(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// Keys of a JSON object in file order (values skipped).
struct KeyOrder(Vec<String>);

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// PEFT treats pattern keys as regular expressions matched as `(.*\.)?(KEY)$`. Module names
/// only need literal names where `.` matches any character; anything richer is refused rather
/// than matched differently from PEFT.
fn check_pattern(pattern: &str) -> std::result::Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern key".into());
    }
    match pattern.chars().find(|c| "\\^$*+?()[]{}|".contains(*c)) {
        Some(c) => Err(format!("pattern key {pattern:?} uses the regular-expression character '{c}'; only module names are supported")),
        None => Ok(()),
    }
}

/// `re.match(r"(.*\.)?(PATTERN)$", module)` for a pattern without regex operators other than `.`.
pub fn pattern_matches(pattern: &str, module: &str) -> bool {
    let (p, m) = (pattern.as_bytes(), module.as_bytes());
    let fits = |start: usize| m.len() - start == p.len() && p.iter().zip(&m[start..]).all(|(pc, mc)| *pc == b'.' || pc == mc);
    if m.len() < p.len() {
        return false;
    }
    fits(0) || (1..=m.len() - p.len()).any(|s| m[s - 1] == b'.' && fits(s))
}

/// Which factor a safetensors entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Linear,
    Embedding,
}

/// What a safetensors tensor name means, after `base_model.model.`.
enum Entry<'n> {
    Factor {
        module: &'n str,
        half: Half,
        layer: Layer,
    },
    /// PEFT's copy of a targeted embedding/lm_head's frozen weight (`save_embedding_layers`).
    FrozenBase {
        module: &'n str,
    },
}

fn classify(name: &str) -> std::result::Result<Entry<'_>, String> {
    let local = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (suffix, half, layer) in [
        (".lora_A.weight", Half::A, Layer::Linear),
        (".lora_B.weight", Half::B, Layer::Linear),
        (".lora_embedding_A", Half::A, Layer::Embedding),
        (".lora_embedding_B", Half::B, Layer::Embedding),
    ] {
        if let Some(module) = local.strip_suffix(suffix) {
            return Ok(Entry::Factor { module, half, layer });
        }
    }
    if local.contains("lora_magnitude_vector") {
        return Err("DoRA magnitude vector: llama.cpp adapters cannot apply DoRA".into());
    }
    if local.ends_with(".lora_A.bias") || local.ends_with(".lora_B.bias") {
        return Err("LoRA bias: llama.cpp adapters have no bias term".into());
    }
    if let Some(module) = local.strip_suffix(".base_layer.weight") {
        return Ok(Entry::FrozenBase { module });
    }
    if local.ends_with(".bias") {
        return Err("trained bias of a base module (PEFT bias=\"all\"/\"lora_only\"): llama.cpp adapters cannot carry it".into());
    }
    if local.contains(".modules_to_save.") || local.ends_with(".weight") {
        return Err("full weight, not a LoRA factor (modules_to_save or resized embeddings): llama.cpp adapters carry only lora_a/lora_b".into());
    }
    Err("not a LoRA factor (expected lora_A/lora_B or lora_embedding_A/B)".into())
}

/// Where a PEFT module goes in the GGUF base.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    gguf_name: String,
    permute_heads: Option<&'static str>,
}

fn place(arch: &ArchSpec, module: &str) -> std::result::Result<Placement, String> {
    let plain = |name: &str| Placement { gguf_name: name.to_string(), permute_heads: None };
    if matches!(module, "lm_head" | "language_model.lm_head") {
        return Ok(plain(OUTPUT));
    }
    let body = ["model.language_model.", "language_model.model.", "model."].iter().find_map(|p| module.strip_prefix(p)).unwrap_or(module);
    if body == "embed_tokens" {
        return Ok(plain(TOKEN_EMBD));
    }
    let supported = || {
        let mut names: Vec<&str> = arch.layer_modules.iter().map(|(hf, _)| hf.rsplit('.').next().unwrap_or(hf)).collect();
        names.extend(["embed_tokens", "lm_head"]);
        names.join(", ")
    };
    let Some(rest) = body.strip_prefix("layers.") else {
        return Err(format!("module {module} has no counterpart in llama.cpp's {} models (supported: {})", arch.name, supported()));
    };
    let (layer, proj) = rest.split_once('.').ok_or_else(|| format!("module {module}: no projection after the layer index"))?;
    let layer: usize = layer.parse().map_err(|_| format!("module {module}: layer index {layer:?} is not a number"))?;
    let Some((_, stem)) = arch.layer_modules.iter().find(|(hf, _)| *hf == proj) else {
        return Err(format!("module {module}: {proj} has no counterpart in llama.cpp's {} models (supported: {})", arch.name, supported()));
    };
    let permute_heads = match (arch.permute_qk, *stem) {
        (true, "attn_q") => Some("attention.head_count"),
        (true, "attn_k") => Some("attention.head_count_kv"),
        _ => None,
    };
    Ok(Placement { gguf_name: format!("blk.{layer}.{stem}.weight"), permute_heads })
}

/// convert_hf_to_gguf.py's rotary permutation of output rows, applied to lora_B (`out x r`):
/// within each of `n_groups` heads, row `half * j + i` moves to `2 * i + j`.
fn permute_rows(b: &[f32], n_out: usize, rank: usize, n_groups: usize) -> std::result::Result<Vec<f32>, String> {
    if n_groups == 0 || n_out % n_groups != 0 || (n_out / n_groups) % 2 != 0 {
        return Err(format!("{n_out} rows do not split into {n_groups} heads of even size"));
    }
    let head = n_out / n_groups;
    let half = head / 2;
    let mut out = vec![0f32; b.len()];
    for g in 0..n_groups {
        for j in 0..2 {
            for i in 0..half {
                let src = g * head + j * half + i;
                let dst = g * head + 2 * i + j;
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    Ok(out)
}

/// The GGUF type that holds a safetensors tensor's values without loss (f64 has none: f32).
fn stored_as(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

fn decode_tensor(view: &safetensors::tensor::TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16, f64)")),
    };
    let expect: usize = view.shape().iter().product();
    if values.len() != expect {
        return Err(format!("holds {} values for shape {:?}", values.len(), view.shape()));
    }
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value #{bad} is {}", values[bad]));
    }
    Ok(values)
}

/// One PEFT module's two factors, before conversion.
struct ModuleFactors<'a> {
    module: String,
    layer: Layer,
    a: Option<(String, safetensors::tensor::TensorView<'a>)>,
    b: Option<(String, safetensors::tensor::TensorView<'a>)>,
}

/// How a converted adapter was scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaleMode {
    /// One plain alpha for every target: the file keeps it (`scale = alpha / r` per tensor).
    FileAlpha(f32),
    /// rsLoRA or per-module alphas: each target's PEFT scale is folded into lora_b, alpha = 0.
    FoldedIntoB,
}

/// An adapter converted in memory, ready to be written.
#[derive(Debug, Clone)]
pub struct Converted {
    pub adapter: LoraAdapter,
    pub scale_mode: ScaleMode,
    /// Frozen embedding/lm_head copies PEFT saved alongside the LoRA (identical to the base).
    pub skipped_frozen: Vec<String>,
}

/// Converts the PEFT adapter in `peft_dir` for `base`, in memory. The task name is the
/// directory's name.
pub fn convert_in_memory(peft_dir: &Path, base: &BaseModel) -> Result<Converted> {
    let config_path = peft_dir.join(ADAPTER_CONFIG);
    let weights_path = peft_dir.join(ADAPTER_WEIGHTS);
    if !peft_dir.is_dir() {
        return Err(Error::io(peft_dir, std::io::Error::new(std::io::ErrorKind::NotFound, "PEFT adapter directory not found")));
    }
    if !config_path.is_file() {
        return Err(Error::invalid(&config_path, "file", "missing: a PEFT adapter directory needs adapter_config.json (lora_alpha, r)"));
    }
    if !weights_path.is_file() {
        let hint = if peft_dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin is a pickle; re-save the adapter with safe_serialization=True)"
        } else {
            ""
        };
        return Err(Error::invalid(&weights_path, "file", format!("missing{hint}")));
    }
    let config = PeftConfig::read(&config_path)?;
    check_arch(base)?;
    let file = File::open(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
    let map = crate::map::map_file(&file).map_err(|e| Error::io(&weights_path, e))?;
    convert_parsed(&config, &weights_path, &map, base, task_name_of(peft_dir))
}

/// [`convert_in_memory`] for file contents already in memory, with the same checks in the same
/// order; the paths only name the sources in errors, `task_name` is what the directory name
/// would give.
pub fn convert_from_bytes(
    config_path: &Path,
    config: &[u8],
    weights_path: &Path,
    weights: &[u8],
    base: &BaseModel,
    task_name: Option<String>,
) -> Result<Converted> {
    let config = PeftConfig::parse(config_path, config)?;
    check_arch(base)?;
    convert_parsed(&config, weights_path, weights, base, task_name)
}

fn check_arch(base: &BaseModel) -> Result<&'static ArchSpec> {
    ARCHS.iter().find(|a| a.name == base.architecture).ok_or_else(|| {
        Error::invalid(
            &base.path,
            "general.architecture",
            format!("{} is not supported by convert (supported: {})", base.architecture, supported_architectures().join(", ")),
        )
    })
}

/// Checks the safetensors header length (the file's first 8 bytes, little-endian) against our
/// cap and the file before the JSON behind it is parsed.
fn check_safetensors_header(weights_path: &Path, weights: &[u8]) -> Result<()> {
    let fail = |reason: String| Error::Format { path: weights_path.to_path_buf(), field: "header size".into(), reason };
    let Some(prefix) = weights.get(..8) else {
        return Err(fail(format!("the file is {} bytes, shorter than its 8-byte header size", weights.len())));
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_SAFETENSORS_HEADER_BYTES {
        return Err(fail(format!("{n} bytes exceeds the limit of {MAX_SAFETENSORS_HEADER_BYTES} bytes")));
    }
    if n > weights.len() as u64 - 8 {
        return Err(fail(format!("{n} bytes do not fit in the file ({} bytes): truncated or not safetensors", weights.len())));
    }
    Ok(())
}

fn convert_parsed(config: &PeftConfig, weights_path: &Path, weights: &[u8], base: &BaseModel, task_name: Option<String>) -> Result<Converted> {
    let arch = check_arch(base)?;
    check_safetensors_header(weights_path, weights)?;
    let weights_path = weights_path.to_path_buf();
    let st =
        SafeTensors::deserialize(weights).map_err(|e| Error::Format { path: weights_path.clone(), field: "header".into(), reason: e.to_string() })?;
    let inv = |field: &str, reason: String| Error::invalid(&weights_path, field, reason);

    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut modules: BTreeMap<String, ModuleFactors<'_>> = BTreeMap::new();
    let mut skipped_frozen = Vec::new();
    for name in &names {
        let view = st.tensor(name).map_err(|e| inv(&format!("tensor {name}"), e.to_string()))?;
        match classify(name).map_err(|reason| inv(&format!("tensor {name}"), reason))? {
            Entry::Factor { module, half, layer } => {
                let entry =
                    modules.entry(module.to_string()).or_insert_with(|| ModuleFactors { module: module.to_string(), layer, a: None, b: None });
                if entry.layer != layer {
                    return Err(inv(&format!("tensor {name}"), format!("module {module} mixes linear and embedding LoRA factors")));
                }
                let slot = if half == Half::A { &mut entry.a } else { &mut entry.b };
                if slot.is_some() {
                    return Err(inv(&format!("tensor {name}"), format!("a second lora_{half:?} for module {module}")));
                }
                *slot = Some((name.clone(), view));
            }
            Entry::FrozenBase { module } => {
                // Safe to drop only if it is the base's own weight: same shape (vocabulary not resized).
                let placement = place(arch, module).map_err(|r| inv(&format!("tensor {name}"), r))?;
                let is_embedding_layer = placement.gguf_name == TOKEN_EMBD || placement.gguf_name == OUTPUT;
                let base_dims =
                    base.tensor_dims(&placement.gguf_name).or_else(|| base.tensor_dims(TOKEN_EMBD).filter(|_| placement.gguf_name == OUTPUT));
                let fits = base_dims.is_some_and(|d| d.len() == 2 && view.shape() == [d[1] as usize, d[0] as usize]);
                if !is_embedding_layer || !fits {
                    return Err(inv(
                        &format!("tensor {name}"),
                        format!(
                            "full weight of shape {:?} that differs from the base's {} {:?} (resized vocabulary or trained weights): llama.cpp adapters carry only lora_a/lora_b",
                            view.shape(),
                            placement.gguf_name,
                            base_dims.unwrap_or(&[])
                        ),
                    ));
                }
                skipped_frozen.push(name.clone());
            }
        }
    }
    if modules.is_empty() {
        return Err(inv("tensors", "no LoRA factors (lora_A/lora_B) in the file".into()));
    }

    let modules: Vec<ModuleFactors<'_>> = modules.into_values().collect();
    // Collected in full before looking for errors, so the one reported is the first by name
    // whatever the thread timing.
    let converted: Vec<Result<(String, LoraTarget, f64)>> =
        modules.par_iter().map(|m| convert_module(m, arch, base, config, &weights_path)).collect();
    let converted = converted.into_iter().collect::<Result<Vec<_>>>()?;

    let mut adapter = LoraAdapter::new(base.architecture.clone(), 0.0);
    let mut alphas: Vec<f64> = Vec::new();
    let mut scales: HashMap<String, f64> = HashMap::new();
    for (gguf_name, target, scale) in converted {
        if adapter.targets.contains_key(&gguf_name) {
            return Err(inv("tensors", format!("two PEFT modules map to {gguf_name}")));
        }
        alphas.push(scale * target.rank as f64);
        scales.insert(gguf_name.clone(), scale);
        adapter.targets.insert(gguf_name, target);
    }
    // One file alpha reproduces PEFT exactly when every target's scale is alpha / r with the
    // same alpha (ranks may differ: llama.cpp divides by each tensor's own rank).
    let uniform_alpha = config.lora_alpha as f32;
    let uniform =
        !config.use_rslora && uniform_alpha != 0.0 && alphas.iter().all(|&a| (a - config.lora_alpha).abs() <= 1e-9 * config.lora_alpha.abs());
    let scale_mode = if uniform {
        adapter.alpha = uniform_alpha;
        ScaleMode::FileAlpha(uniform_alpha)
    } else {
        for (name, t) in adapter.targets.iter_mut() {
            // For token_embd our `b` is the file's lora_a; the delta scales all the same.
            let s = scales[name] as f32;
            t.b.iter_mut().for_each(|v| *v *= s);
        }
        adapter.alpha = 0.0;
        ScaleMode::FoldedIntoB
    };

    if let Some(task) = task_name {
        adapter.metadata.insert(KEY_TASK_NAME.into(), Value::String(task));
    }
    if let Some(tokens) = &config.alora_invocation_tokens {
        adapter.metadata.insert(KEY_ALORA_TOKENS.into(), Value::Array(ValueType::U32, tokens.iter().map(|t| Value::U32(*t)).collect()));
    }
    Ok(Converted { adapter, scale_mode, skipped_frozen })
}

fn task_name_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name().and_then(|n| n.to_str()).map(str::to_string)
}

/// Decodes, checks and transforms one module into (GGUF base name, target, PEFT scale).
fn convert_module(
    m: &ModuleFactors<'_>,
    arch: &ArchSpec,
    base: &BaseModel,
    config: &PeftConfig,
    weights_path: &Path,
) -> Result<(String, LoraTarget, f64)> {
    let inv = |field: &str, reason: String| Error::invalid(weights_path, field, reason);
    let (a_name, a_view) = match &m.a {
        Some(a) => a,
        None => {
            let b = &m.b.as_ref().expect("a module has at least one factor").0;
            return Err(inv(&format!("tensor {b}"), format!("lone lora_B: module {} has no lora_A", m.module)));
        }
    };
    let Some((b_name, b_view)) = &m.b else {
        return Err(inv(&format!("tensor {a_name}"), format!("lone lora_A: module {} has no lora_B", m.module)));
    };
    let field_a = format!("tensor {a_name}");
    let field_b = format!("tensor {b_name}");

    let placement = place(arch, &m.module).map_err(|r| inv(&field_a, r))?;
    let gguf_name = placement.gguf_name.clone();
    let is_embedding = gguf_name == TOKEN_EMBD;
    if (m.layer == Layer::Embedding) != is_embedding {
        return Err(inv(&field_a, format!("module {} is not an embedding but has embedding factors (or the reverse)", m.module)));
    }
    if is_embedding && base.tied_embeddings {
        return Err(inv(
            &field_a,
            format!("embedding LoRA on {}, whose output reuses token_embd (tied embeddings): llama.cpp aborts on it", base.path.display()),
        ));
    }
    let Some(w) = base.tensor_dims(&gguf_name) else {
        let why = if gguf_name == OUTPUT && base.tied_embeddings {
            "the base ties its output to token_embd, so there is no output.weight for an lm_head LoRA".to_string()
        } else if let Some(n) = base.hparam("block_count").filter(|_| gguf_name.starts_with("blk.")) {
            format!("the base has no such tensor ({n} layers): adapter made for another model?")
        } else {
            "the base has no such tensor: adapter made for another model?".to_string()
        };
        return Err(inv(&field_a, format!("maps to {gguf_name}, but {}: {why}", base.path.display())));
    };
    if w.len() != 2 {
        return Err(inv(&field_a, format!("base tensor {gguf_name} has {} dimensions, expected 2", w.len())));
    }
    let (a_shape, b_shape) = (a_view.shape(), b_view.shape());
    if a_shape.len() != 2 {
        return Err(inv(&field_a, format!("shape {a_shape:?}: a LoRA factor has 2 dimensions")));
    }
    if b_shape.len() != 2 {
        return Err(inv(&field_b, format!("shape {b_shape:?}: a LoRA factor has 2 dimensions")));
    }
    let rank = a_shape[0];
    if b_shape[1] != rank || rank == 0 {
        return Err(inv(&field_b, format!("shape {b_shape:?} does not pair with lora_A {a_shape:?} (rank {rank})")));
    }
    // Linear: A (r, in), B (out, r) against W ne = [in, out].
    // Embedding: A (r, vocab), B (hidden, r) against token_embd ne = [hidden, vocab].
    let (want_a, want_b) = if is_embedding { (w[1] as usize, w[0] as usize) } else { (w[0] as usize, w[1] as usize) };
    if a_shape[1] != want_a || b_shape[0] != want_b {
        return Err(inv(
            &field_a,
            format!(
                "shape mismatch: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit {gguf_name} ne={w:?} of {} (expected [r, {want_a}] and [{want_b}, r]): adapter made for another model?",
                base.path.display()
            ),
        ));
    }
    let expected_rank = config.rank_for(&m.module);
    if rank != expected_rank {
        return Err(inv(&field_a, format!("rank {rank}, but adapter_config.json gives module {} rank {expected_rank} (r / rank_pattern)", m.module)));
    }
    let a = decode_tensor(a_view).map_err(|r| inv(&field_a, r))?;
    let b = decode_tensor(b_view).map_err(|r| inv(&field_b, r))?;
    let (a_dtype, b_dtype) = (stored_as(a_view.dtype()), stored_as(b_view.dtype()));
    let scale = config.scale_for(&m.module, rank);

    let target = if is_embedding {
        // Common form (see adapter.rs): n_out = vocab, n_in = hidden; delta = (B A)^T.
        let (vocab, hidden) = (a_shape[1], b_shape[0]);
        let mut t = LoraTarget::new(crate::adapter::transpose(&b, hidden, rank), crate::adapter::transpose(&a, rank, vocab), rank, hidden, vocab);
        (t.a_dtype, t.b_dtype) = (b_dtype, a_dtype);
        t
    } else {
        let (n_in, n_out) = (a_shape[1], b_shape[0]);
        let b = match placement.permute_heads {
            Some(key) => {
                let heads = base
                    .hparam(key)
                    .or_else(|| (key == "attention.head_count_kv").then(|| base.hparam("attention.head_count")).flatten())
                    .ok_or_else(|| {
                        Error::invalid(&base.path, format!("{}.{key}", base.architecture), "missing (needed for the rotary permutation)")
                    })?;
                permute_rows(&b, n_out, rank, heads as usize).map_err(|r| inv(&field_b, format!("rotary permutation with {key} = {heads}: {r}")))?
            }
            None => b,
        };
        let mut t = LoraTarget::new(a, b, rank, n_in, n_out);
        (t.a_dtype, t.b_dtype) = (a_dtype, b_dtype);
        t
    };
    Ok((gguf_name, target, scale))
}

/// Encodes in `dtype`; a tensor whose rows do not fit 32-value blocks falls back to F16, as
/// llama.cpp's converter does ([`LoraAdapter::to_gguf`]).
pub fn encode(adapter: &LoraAdapter, dtype: DType) -> Result<GgufWriter> {
    adapter.to_gguf(dtype)
}

/// The result of one conversion.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub peft_dir: PathBuf,
    pub output: PathBuf,
    pub targets: usize,
    pub max_rank: usize,
    pub scale_mode: ScaleMode,
    pub bytes: u64,
}

impl std::fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scale = match self.scale_mode {
            ScaleMode::FileAlpha(a) => format!("alpha {a}"),
            ScaleMode::FoldedIntoB => "per-module scales folded into lora_b, alpha 0".to_string(),
        };
        write!(
            f,
            "wrote {} from {} ({} targets, max rank {}, {scale}, {} bytes)",
            self.output.display(),
            self.peft_dir.display(),
            self.targets,
            self.max_rank,
            self.bytes
        )
    }
}

/// A converted file written under a temporary name, checked, waiting to be renamed.
struct Staged {
    file: fsutil::StagedFile,
    summary: ConvertSummary,
}

/// Converts, writes to a temporary file next to `output`, and checks it as llama.cpp would.
fn stage(peft_dir: &Path, base: &BaseModel, output: &Path, dtype: Option<DType>) -> Result<Staged> {
    let inputs = [peft_dir.join(ADAPTER_WEIGHTS), peft_dir.join(ADAPTER_CONFIG), base.path.clone()];
    let mut file = fsutil::StagedFile::create(output, &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let converted = convert_in_memory(peft_dir, base)?;
    let dtype = dtype.unwrap_or_else(|| LoraAdapter::stored_dtype(&[&converted.adapter]));
    let writer = encode(&converted.adapter, dtype)?;
    let bytes = {
        let mut w = BufWriter::new(file.file_mut());
        let n = writer.write_to(&mut w).map_err(|e| Error::io(output, e))?;
        w.flush().map_err(|e| Error::io(output, e))?;
        n
    };
    drop(writer);
    let problems = validate::validate_adapter(base, file.staged_path());
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
        return Err(Error::invalid(output, "converted adapter", format!("fails validation against the base: {}", list.join("; "))));
    }
    let adapter = &converted.adapter;
    let summary = ConvertSummary {
        peft_dir: peft_dir.to_path_buf(),
        output: output.to_path_buf(),
        targets: adapter.targets.len(),
        max_rank: adapter.max_rank(),
        scale_mode: converted.scale_mode,
        bytes,
    };
    Ok(Staged { file, summary })
}

fn commit(staged: Staged) -> Result<ConvertSummary> {
    staged.file.commit()?;
    Ok(staged.summary)
}

/// `d2c-gguf convert --peft DIR --base MODEL -o OUT`: one PEFT adapter to one GGUF adapter.
/// Nothing is written unless the whole conversion and its validation succeed. `dtype` None
/// writes the type the PEFT tensors are stored in (f16, bf16; f32 for f32 and f64).
pub fn convert_peft(peft_dir: &Path, base_path: &Path, output: &Path, dtype: Option<DType>) -> Result<ConvertSummary> {
    let base = BaseModel::open(base_path)?;
    commit(stage(peft_dir, &base, output, dtype)?)
}

/// The PEFT adapter directories directly under `root` (those holding adapter_config.json or
/// adapter_model.safetensors), sorted by name.
pub fn find_peft_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let path = entry.map_err(|e| Error::io(root, e))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
        if path.is_dir() && !hidden && (path.join(ADAPTER_CONFIG).exists() || path.join(ADAPTER_WEIGHTS).exists()) {
            dirs.push(path);
        }
    }
    dirs.sort();
    if dirs.is_empty() {
        return Err(Error::invalid(root, "directory", format!("no PEFT adapter directories (with {ADAPTER_CONFIG}) inside")));
    }
    Ok(dirs)
}

/// `d2c-gguf convert --peft-dir DIRS --base MODEL -o OUTDIR`: every PEFT adapter directory in
/// `root` becomes `out_dir/<its name>.gguf`. All or nothing: if any adapter is refused, every
/// problem is reported and no file is written.
pub fn convert_peft_dir(root: &Path, base_path: &Path, out_dir: &Path, dtype: Option<DType>, progress: bool) -> Result<Vec<ConvertSummary>> {
    let base = BaseModel::open(base_path)?;
    let dirs = find_peft_dirs(root)?;
    let created_out_dir = !out_dir.exists();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let bar = crate::progress::bar(progress && dirs.len() > 1, dirs.len() as u64, "converting");
    let mut staged = Vec::new();
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("adapter");
        let output = out_dir.join(format!("{name}.gguf"));
        match stage(dir, &base, &output, dtype) {
            Ok(s) => staged.push(s),
            Err(e) => failures.push(e.to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !failures.is_empty() {
        drop(staged);
        if created_out_dir {
            let _ = std::fs::remove_dir(out_dir);
        }
        return Err(Error::Usage(format!(
            "{} of {} adapters cannot be converted; nothing was written:\n  {}",
            failures.len(),
            dirs.len(),
            failures.join("\n  ")
        )));
    }
    staged.into_iter().map(commit).collect()
}

/// Where a task's adapter comes from in an adapters directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterSource {
    /// `DIR/<task>.gguf`.
    Gguf(PathBuf),
    /// `DIR/<task>/` holding `adapter_config.json` (and `adapter_model.safetensors`).
    Peft(PathBuf),
}

impl AdapterSource {
    /// The file or directory the user gave.
    pub fn path(&self) -> &Path {
        let (AdapterSource::Gguf(p) | AdapterSource::Peft(p)) = self;
        p
    }
}

/// The task adapters of `dir` by task name: `<task>.gguf` files and PEFT adapter directories
/// `<task>/`. A task given both ways is refused (which one was meant cannot be guessed).
pub fn task_adapters(dir: &Path) -> Result<BTreeMap<String, AdapterSource>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if name.starts_with('.') {
            continue;
        }
        let (task, source) = if path.is_file() && path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            (stem.to_string(), AdapterSource::Gguf(path.clone()))
        } else if path.is_dir() && path.join(ADAPTER_CONFIG).is_file() {
            (name.to_string(), AdapterSource::Peft(path.clone()))
        } else {
            continue;
        };
        if let Some(other) = out.insert(task.clone(), source) {
            return Err(Error::invalid(
                dir,
                format!("task {task}"),
                format!("given twice, as {} and {}: keep one", other.path().display(), path.display()),
            ));
        }
    }
    Ok(out)
}

/// Where PEFT adapters given as inputs are converted for one run: a temporary directory,
/// created only when a PEFT directory comes along and removed when this is dropped, so that
/// nothing but the run's outputs is left behind.
#[derive(Default)]
pub struct PeftScratch {
    dir: Option<tempfile::TempDir>,
}

impl PeftScratch {
    /// A GGUF adapter file for `source`: the file itself, or the PEFT directory converted into
    /// `<scratch>/<task>.gguf` exactly as `convert --peft` writes it (validated against the base,
    /// in the type its tensors are stored in), so that a run on PEFT directories equals one on
    /// their converted files. The file lives as long as `self`.
    pub fn file(&mut self, task: &str, source: &AdapterSource, base_path: &Path) -> Result<PathBuf> {
        let AdapterSource::Peft(peft_dir) = source else { return Ok(source.path().to_path_buf()) };
        let dir = match &mut self.dir {
            Some(d) => d,
            empty => empty.insert(tempfile::Builder::new().prefix("d2c-peft-").tempdir().map_err(|e| Error::io(&std::env::temp_dir(), e))?),
        };
        let output = dir.path().join(format!("{task}.gguf"));
        convert_peft(peft_dir, base_path, &output, None)?;
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching_follows_peft() {
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"));
        assert!(pattern_matches("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.q_proj"));
        assert!(!pattern_matches("layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj"));
        assert!(!pattern_matches("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj2"));
        // `.` is a regex wildcard in PEFT.
        assert!(pattern_matches("layers.1.mlp.down_proj", "model.layers_1_mlp_down_proj"));
    }

    #[test]
    fn rotary_permutation_interleaves_halves() {
        // Two heads of 4 rows, rank 1: rows [0 1 2 3 | 4 5 6 7] -> [0 2 1 3 | 4 6 5 7].
        let b: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(permute_rows(&b, 8, 1, 2).unwrap(), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert!(permute_rows(&b, 8, 1, 3).is_err());
    }

    #[test]
    fn config_patterns_keep_file_order() {
        let json = br#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"z_first": 2, "a_second": 3}, "alpha_pattern": {}}"#;
        let c = PeftConfig::parse(Path::new("adapter_config.json"), json).unwrap();
        assert_eq!(c.rank_pattern, vec![("z_first".to_string(), 2), ("a_second".to_string(), 3)]);
        let bad = br#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"^model.*q_proj": 2}}"#;
        assert!(PeftConfig::parse(Path::new("adapter_config.json"), bad).is_err());
    }
}
