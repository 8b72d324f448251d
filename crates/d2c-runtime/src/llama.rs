//! llama.cpp at run time, through the safe `llama-cpp-2` wrapper: one backend per process, a
//! model, its adapters, and evaluation sessions. Errors carry the file they concern.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use d2c_format::error::{Error, Result};

static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();

/// The process-wide llama.cpp backend. llama.cpp's own log lines are silenced unless
/// `D2C_LLAMA_LOG=1`, so our output stays readable; its errors still reach us as return codes.
pub fn backend() -> Result<&'static LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            let quiet = std::env::var_os("D2C_LLAMA_LOG").is_none_or(|v| v != "1");
            if quiet {
                crate::ffi::silence_llama_logs();
            }
            #[cfg(feature = "cpu-variants")]
            load_cpu_variants()?;
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            if quiet {
                b.void_logs();
            }
            Ok(b)
        })
        .as_ref()
        .map_err(|e| Error::Llama(format!("backend init failed: {e}")))
}

/// Env var naming the directory of ggml's CPU variant modules (`libggml-cpu-<level>.so`),
/// for a deployment that keeps them somewhere other than beside the binary.
#[cfg(feature = "cpu-variants")]
pub const BACKENDS_DIR_ENV: &str = "D2C_GGML_BACKENDS";

/// Registers ggml's CPU kernels: of the variant modules found, ggml keeps the best one this
/// CPU can run, so one binary serves every x86-64 (or Arm) level. Looked for in
/// `$D2C_GGML_BACKENDS`, then beside the executable (a copied deployment), then where the
/// build put them.
#[cfg(feature = "cpu-variants")]
fn load_cpu_variants() -> std::result::Result<(), String> {
    let has_variants =
        |d: &Path| std::fs::read_dir(d).is_ok_and(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libggml-cpu")));
    let from_env = std::env::var_os(BACKENDS_DIR_ENV).map(PathBuf::from);
    let beside_exe = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let built = llama_cpp_sys_2::BACKENDS_DIR.map(PathBuf::from);
    let dir = match from_env {
        Some(d) => d,
        None => [beside_exe, built].into_iter().flatten().find(|d| has_variants(d)).ok_or_else(|| {
            format!("no ggml CPU variant (libggml-cpu-*.so) beside the executable or in the build's backends directory; set {BACKENDS_DIR_ENV}")
        })?,
    };
    if !has_variants(&dir) {
        return Err(format!("{BACKENDS_DIR_ENV}={}: no libggml-cpu-*.so there", dir.display()));
    }
    llama_cpp_2::llama_backend::load_backends_from_path(&dir);
    if !llama_cpp_2::list_llama_ggml_backend_devices().iter().any(|d| d.backend == "CPU") {
        return Err(format!("{}: no ggml CPU variant loads on this CPU", dir.display()));
    }
    Ok(())
}

/// The CPU kernels llama.cpp runs in this process, as the features of ggml's loaded CPU
/// backend (`SSE3,SSSE3,AVX,AVX2,...`). Scores are bit-for-bit reproducible for one kernel set
/// but differ by up to ~0.02 nats per token between sets (other summation orders), so this is
/// part of every score cache key and of the manifest.
pub fn cpu_kernels() -> Result<String> {
    backend()?;
    Ok(crate::ffi::cpu_backend_features()
        .into_iter()
        .map(|(name, value)| if value == "1" { name } else { format!("{name}={value}") })
        .collect::<Vec<_>>()
        .join(","))
}

/// A loaded base model and the adapters loaded into it.
///
/// The model owns its adapters: llama.cpp frees them when the model is freed, and llama-cpp-2
/// offers no way to free one earlier (its adapter type has no `Drop` and hides the pointer), so
/// an adapter is named by an [`AdapterId`] rather than held apart from the model. Sessions
/// borrow the model, so none outlives it, and adapters are loaded through `&mut self`, so
/// never while a session runs. Loading the same file twice costs its memory twice.
///
/// A session cannot outlive its model:
/// ```compile_fail,E0515
/// # fn f(path: &std::path::Path) -> d2c_runtime::llama::Session<'static> {
/// let model = d2c_runtime::llama::Model::load(path).unwrap();
/// model.session_with(Default::default()).unwrap() // `model` is dropped here
/// # }
/// ```
/// Nor can an adapter be loaded while a session on the model is alive:
/// ```compile_fail,E0502
/// # fn f(path: &std::path::Path) {
/// let mut model = d2c_runtime::llama::Model::load(path).unwrap();
/// let session = model.session_with(Default::default()).unwrap();
/// model.load_adapter(path).unwrap();
/// drop(session);
/// # }
/// ```
/// An adapter's details borrow the model too:
/// ```compile_fail,E0505
/// # fn f(path: &std::path::Path) {
/// let mut model = d2c_runtime::llama::Model::load(path).unwrap();
/// let id = model.load_adapter(path).unwrap();
/// let adapter_path = model.adapter_path(id).unwrap();
/// drop(model);
/// println!("{}", adapter_path.display());
/// # }
/// ```
/// An id from another model is refused at run time (see `tests/score.rs`).
pub struct Model {
    pub path: PathBuf,
    inner: LlamaModel,
    /// Tells this model's [`AdapterId`]s from other models'.
    serial: u64,
    adapters: Vec<LoadedAdapter>,
}

struct LoadedAdapter {
    path: PathBuf,
    /// llama-cpp-2 wants `&mut` to apply an adapter, although llama.cpp only reads it; the lock
    /// lets sessions (which share the model) take turns at that.
    inner: Mutex<LlamaLoraAdapter>,
}

/// An adapter loaded into a [`Model`], valid with that model only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId {
    model: u64,
    index: usize,
}

static NEXT_MODEL_SERIAL: AtomicU64 = AtomicU64::new(1);

impl Model {
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "model file not found")));
        }
        let inner = LlamaModel::load_from_file(backend()?, path, &LlamaModelParams::default())
            .map_err(|e| Error::Llama(format!("{}: failed to load model: {e}", path.display())))?;
        Ok(Model { path: path.to_path_buf(), inner, serial: NEXT_MODEL_SERIAL.fetch_add(1, Ordering::Relaxed), adapters: Vec::new() })
    }

    pub fn n_vocab(&self) -> usize {
        self.inner.n_vocab() as usize
    }

    pub fn n_ctx_train(&self) -> u32 {
        self.inner.n_ctx_train()
    }

    /// Whether the model's tokenizer wants a BOS token in front of a sequence.
    pub fn adds_bos(&self) -> bool {
        self.inner.vocab().should_add_bos()
    }

    pub fn bos(&self) -> LlamaToken {
        self.inner.vocab().bos()
    }

    /// Tokenises `text` without special tokens added; `parse_special` turns chat markers such as
    /// `<|im_start|>` into their single tokens, as llama-server does for prompts.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Vec<LlamaToken> {
        self.inner.vocab().tokenize(text.as_bytes(), false, parse_special)
    }

    /// A sequence as it is fed to the model: BOS first if the tokenizer wants one, then `text`
    /// with special tokens parsed (how the scorer, generation and eval all tokenise prompts).
    pub fn tokenize_sequence(&self, text: &str) -> Vec<LlamaToken> {
        let mut tokens = Vec::new();
        if self.adds_bos() {
            tokens.push(self.bos());
        }
        tokens.extend(self.tokenize(text, true));
        tokens
    }

    /// The token a chat turn ends with: end-of-turn where the vocabulary has one, else
    /// end-of-sequence.
    pub fn end_of_turn(&self) -> LlamaToken {
        let vocab = self.inner.vocab();
        let eot = vocab.eot();
        if eot.0 >= 0 {
            eot
        } else {
            vocab.eos()
        }
    }

    pub fn is_eog(&self, t: LlamaToken) -> bool {
        self.inner.vocab().is_eog(t)
    }

    /// The bytes a token stands for (special tokens render as nothing).
    pub fn token_bytes(&self, t: LlamaToken) -> Vec<u8> {
        self.inner.vocab().token_to_piece(t, false, None)
    }

    /// Loads an adapter file into this model. llama.cpp checks it against the model here.
    pub fn load_adapter(&mut self, path: impl AsRef<Path>) -> Result<AdapterId> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "adapter file not found")));
        }
        let inner =
            self.inner.lora_adapter_init(path).map_err(|e| Error::Llama(format!("{}: llama.cpp refused the adapter: {e}", path.display())))?;
        self.adapters.push(LoadedAdapter { path: path.to_path_buf(), inner: Mutex::new(inner) });
        Ok(AdapterId { model: self.serial, index: self.adapters.len() - 1 })
    }

    fn adapter(&self, id: AdapterId) -> Result<&LoadedAdapter> {
        match self.adapters.get(id.index) {
            Some(a) if id.model == self.serial => Ok(a),
            _ => Err(Error::Internal(format!("adapter #{} was not loaded into {}", id.index, self.path.display()))),
        }
    }

    /// The file an adapter of this model was loaded from.
    pub fn adapter_path(&self, id: AdapterId) -> Result<&Path> {
        Ok(&self.adapter(id)?.path)
    }

    /// A context for evaluation: `n_ctx` tokens of KV cache shared by up to `n_seq` sequences
    /// (sequence ids `0..n_seq`), decoding at most `n_batch` tokens per call, with the default
    /// [`SessionConfig`] otherwise. See [`Model::session_with`].
    pub fn session(&self, n_ctx: u32, n_batch: u32, n_seq: u32, threads: Option<i32>) -> Result<Session<'_>> {
        self.session_with(SessionConfig { n_ctx, n_batch, n_seq, threads, ..SessionConfig::default() })
    }

    /// A context for evaluation, which can switch between this model's adapters.
    pub fn session_with(&self, cfg: SessionConfig) -> Result<Session<'_>> {
        let SessionConfig { n_ctx, n_batch, n_seq, threads, flash_attention } = cfg;
        if n_seq == 0 || n_seq > MAX_SEQUENCES {
            return Err(Error::Internal(format!("{n_seq} sequences per context (llama.cpp allows 1 to {MAX_SEQUENCES})")));
        }
        let n_batch = n_batch.max(1);
        let threads = threads.unwrap_or_else(default_threads);
        let fa = if flash_attention { llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED };
        // One KV cache shared by all sequences: without it llama.cpp splits n_ctx evenly into
        // per-sequence streams padded to 256 cells each, so many short sequences would need a
        // huge context.
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx.max(n_batch).max(16)))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(n_seq)
            .with_kv_unified(true)
            .with_flash_attention_policy(fa)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx =
            self.inner.new_context(backend()?, params).map_err(|e| Error::Llama(format!("{}: cannot create a context: {e}", self.path.display())))?;
        Ok(Session { ctx, model: self, n_batch, n_seq, n_vocab: self.n_vocab(), active: None })
    }
}

/// How to set up an evaluation context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// KV cache cells, shared by all sequences.
    pub n_ctx: u32,
    /// Most tokens per decode call (also the physical batch).
    pub n_batch: u32,
    /// Sequence ids `0..n_seq` may be used.
    pub n_seq: u32,
    /// CPU threads; `None` uses every available core.
    pub threads: Option<i32>,
    pub flash_attention: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { n_ctx: 512, n_batch: 512, n_seq: 1, threads: None, flash_attention: false }
    }
}

/// llama.cpp's limit on sequences per context (`LLAMA_MAX_SEQ`, not exported by its headers).
pub const MAX_SEQUENCES: u32 = 256;

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
}

/// An evaluation context on a model, switching between the model's adapters.
pub struct Session<'m> {
    ctx: LlamaContext<'m>,
    model: &'m Model,
    pub n_batch: u32,
    pub n_seq: u32,
    pub n_vocab: usize,
    active: Option<(AdapterId, f32)>,
}

impl<'m> Session<'m> {
    /// The adapter (and its scale) now applied; `None` is the base model.
    pub fn active_adapter(&self) -> Option<(AdapterId, f32)> {
        self.active
    }

    /// Makes adapter `id` (at `scale`) the only active adapter, or none (the base model).
    /// The KV cache is cleared: what it holds was computed under the previous adapter set.
    pub fn set_adapter(&mut self, active: Option<(AdapterId, f32)>) -> Result<()> {
        if active == self.active {
            self.ctx.clear_kv_cache();
            return Ok(());
        }
        let lock = |a: &'m LoadedAdapter| a.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match active {
            Some((id, scale)) => {
                let a = self.model.adapter(id)?;
                self.ctx
                    .lora_adapter_set(&mut lock(a), scale)
                    .map_err(|e| Error::Llama(format!("{}: cannot apply adapter: {e}", a.path.display())))?;
            }
            None => {
                // llama-cpp-2's remove clears the whole set (its argument is not used); an
                // adapter was active, so there is one to pass.
                if let Some((id, _)) = self.active {
                    let a = self.model.adapter(id)?;
                    self.ctx.lora_adapter_remove(&mut lock(a)).map_err(|e| Error::Llama(format!("cannot clear adapters: {e}")))?;
                }
            }
        }
        self.active = active;
        self.ctx.clear_kv_cache();
        Ok(())
    }

    pub fn clear_kv(&mut self) {
        self.ctx.clear_kv_cache();
    }

    pub fn decode(&mut self, batch: &mut LlamaBatch) -> Result<()> {
        self.ctx.decode(batch).map_err(|e| Error::Llama(format!("decode failed: {e}")))
    }

    /// Logits predicting the token after batch position `i` (which must have requested logits).
    pub fn logits_ith(&self, i: i32) -> &[f32] {
        self.ctx.get_logits_ith(i)
    }

    pub fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }
}

/// The most likely next token; a tie goes to the lower id, so that the choice does not depend on
/// how the scan is ordered.
pub fn greedy_token(logits: &[f32]) -> Token {
    let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i).unwrap_or(0);
    Token(best as i32)
}

pub use llama_cpp_2::llama_batch::LlamaBatch as Batch;
pub use llama_cpp_2::token::LlamaToken as Token;
