//! adapter_config.json + adapter_model.safetensors -> converted adapter, through the same
//! checks `convert` applies to a PEFT directory, against small real base models.
//!
//! Input layout: byte 0 picks the base, bytes 1..5 are the config length (u32 LE), then the
//! config bytes, then the safetensors bytes (see scripts/fuzz.sh for how seeds are packed).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use d2c_format::base::BaseModel;
use d2c_format::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

const BASES: [(&str, &[u8]); 4] = [
    ("llama/base.gguf", include_bytes!("../../tests/fixtures/convert/llama/base.gguf")),
    ("qwen2/base.gguf", include_bytes!("../../tests/fixtures/convert/qwen2/base.gguf")),
    ("phi3/base.gguf", include_bytes!("../../tests/fixtures/convert/phi3/base.gguf")),
    ("gemma2/base.gguf", include_bytes!("../../tests/fixtures/convert/gemma2/base.gguf")),
];

fn bases() -> &'static Vec<BaseModel> {
    static B: OnceLock<Vec<BaseModel>> = OnceLock::new();
    B.get_or_init(|| {
        BASES
            .iter()
            .map(|(name, bytes)| {
                let file = GgufFile::from_bytes(name, bytes.to_vec()).expect("fixture base parses");
                BaseModel::from_gguf(&file).expect("fixture base is a base model")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let base = &bases()[data[0] as usize % BASES.len()];
    let config_len = u32::from_le_bytes(data[1..5].try_into().unwrap()) as usize;
    let rest = &data[5..];
    let (config, weights) = rest.split_at(config_len.min(rest.len()));
    let _ = d2c_format::convert::convert_from_bytes(
        Path::new("adapter_config.json"),
        config,
        Path::new("adapter_model.safetensors"),
        weights,
        base,
        Some("fuzz".into()),
    );
});
