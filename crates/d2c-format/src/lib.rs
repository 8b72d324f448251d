//! d2c-gguf's file formats, in pure Rust: the GGUF container, LoRA adapters in llama.cpp's
//! format and PEFT's, ggml's tensor types, example files, manifests and staged writes.
//!
//! Nothing here links llama.cpp: the proxy (`d2c-serve`) and the fuzz targets build on this
//! crate alone. The one `unsafe` block (a read-only memory map) is in [`map`].
#![deny(unsafe_code)]

pub mod adapter;
pub mod base;
pub mod convert;
pub mod error;
pub mod fsutil;
pub mod ggml_type;
pub mod gguf;
pub mod manifest;
pub mod map;
pub mod progress;
pub mod samples;
pub mod synth;
pub mod validate;

pub use error::{Error, Result};
