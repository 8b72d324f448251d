//! Bytes -> sample file through the same parser `read_sample_file` uses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = d2c_format::samples::sample_file_from_bytes(std::path::Path::new("fuzz.jsonl"), data);
});
