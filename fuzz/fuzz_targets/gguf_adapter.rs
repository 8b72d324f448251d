//! Bytes -> LoraAdapter through the same parser `LoraAdapter::read` uses for files.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = d2c_format::adapter::LoraAdapter::from_bytes("fuzz.gguf", data.to_vec());
});
