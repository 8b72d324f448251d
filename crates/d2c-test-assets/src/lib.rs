//! The real assets `scripts/setup.sh` caches (base model, llama-server, a Python with gguf-py),
//! found the same way by every test, the plugin's tests and the benchmarks. A missing asset
//! fails loudly, naming what to run: tests never skip silently.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

/// `$D2C_CACHE`, else `~/.cache/d2c-gguf`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("D2C_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/d2c-gguf"),
    }
}

/// `$env` if set, else `rel` under the cache; panics when it does not exist.
pub fn asset(env: &str, rel: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| cache_dir().join(rel));
    assert!(p.exists(), "test asset {} is missing: run scripts/setup.sh (or set {env})", p.display());
    p
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, tied embeddings).
pub fn base_model() -> PathBuf {
    asset("D2C_BASE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A real llama-server binary (wrapper script that sets its library path).
pub fn llama_server() -> PathBuf {
    asset("D2C_LLAMA_SERVER", "llama-server/llama-server")
}

/// Python with gguf-py (the independent GGUF reader), numpy and the OpenAI SDK (a real client).
pub fn python() -> PathBuf {
    asset("D2C_PYTHON", "venv/bin/python")
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("tempdir")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
