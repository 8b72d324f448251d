//! d2c-gguf: data-driven clustering and merging of LoRA adapters for llama.cpp.
//!
//! Pipeline, one module per stage: read adapters ([`adapter`]) -> similarity -> clusters ->
//! merge -> score -> refine -> write adapters + manifest.
//!
//! Contributors: read DEVELOPING.md at the repository root before building (always `--release`).

pub mod adapter;
mod allocate;
pub mod base;
pub mod cluster;
pub mod compress;
pub mod convert;
pub mod d2c;
pub mod error;
pub mod evaluate;
mod evaluator;
pub mod ffi;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod linalg;
pub mod llama;
pub mod manifest;
pub mod merge;
pub mod objective;
pub mod progress;
pub mod report;
pub mod samples;
pub mod score;
pub mod similarity;
pub mod synth;
pub mod validate;

pub use error::{Error, Result};
