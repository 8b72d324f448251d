//! d2c-gguf: data-driven clustering and merging of LoRA adapters for llama.cpp.
//!
//! The pipeline and CLI, on three crates that cargo keeps apart: file formats
//! (`d2c-format`, pure Rust), merge math (`d2c-merge`) and the llama.cpp runtime
//! (`d2c-runtime`, the only one that links llama.cpp). Their modules are re-exported here
//! under their old paths (`d2c_gguf::adapter`, `d2c_gguf::score`, ...).
//!
//! Pipeline, one module per stage: read adapters ([`adapter`]) -> similarity -> clusters ->
//! merge -> score -> refine -> write adapters + manifest ([`d2c`]).
//!
//! Contributors: read DEVELOPING.md at the repository root before building (always `--release`).
#![deny(unsafe_code)]

pub use d2c_format::{adapter, base, convert, error, fsutil, ggml_type, gguf, manifest, progress, samples, synth, validate};
pub use d2c_merge::{cluster, compress, interference, linalg, merge, similarity};
pub use d2c_runtime::{activations, evaluate, ffi, generate, llama, score};

pub mod d2c;
pub mod objective;
pub mod report;

pub use error::{Error, Result};
