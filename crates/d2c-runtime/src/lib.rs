//! d2c-gguf's llama.cpp runtime, the only crate that links llama.cpp: the backend, models,
//! adapters and sessions ([`llama`]), example scoring ([`score`]), held-out evaluation
//! ([`evaluate`]) and the synthetic demo set ([`generate`]).
//!
//! Every `unsafe` line is in [`ffi`], behind safe functions.
#![deny(unsafe_code)]

pub mod activations;
pub mod evaluate;
pub mod ffi;
pub mod generate;
pub mod llama;
pub mod score;
