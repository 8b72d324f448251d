//! d2c-gguf's merge math on LoRA factors, never on dense deltas: inner products and norms in
//! factor space ([`linalg`], faer), the merge operators ([`merge`]), per-task truncation
//! ([`compress`]), weight-space similarity ([`similarity`]) and the clusterings ([`cluster`]).
#![deny(unsafe_code)]

pub mod cluster;
pub mod compress;
pub mod interference;
pub mod linalg;
pub mod merge;
pub mod similarity;
