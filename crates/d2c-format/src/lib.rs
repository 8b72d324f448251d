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

/// `Display` and `FromStr` for a `clap::ValueEnum`, from its value names: the command line,
/// manifests and messages then spell every value one way, and a bad one is answered with the
/// list of good ones.
#[macro_export]
macro_rules! value_names {
    ($ty:ty, $what:literal) => {
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                // `pad`, not `write_str`: tables align these with `{:>5}`.
                f.pad(::clap::ValueEnum::to_possible_value(self).expect("every value has a name").get_name())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> ::std::result::Result<Self, String> {
                <$ty as ::clap::ValueEnum>::from_str(s, true).map_err(|_| $crate::unknown_value::<$ty>($what, s))
            }
        }
    };
}

/// "unknown dtype 'x' (expected f32, f16 or bf16)".
pub fn unknown_value<T: clap::ValueEnum>(what: &str, given: &str) -> String {
    let names: Vec<String> = T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
    let list = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    };
    format!("unknown {what} '{given}' (expected {list})")
}
