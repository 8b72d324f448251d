//! Hostile inputs through the normal (stable, file-based) readers: every input the fuzzers
//! (fuzz/, scripts/fuzz.sh) found a problem with, plus hand-made ones for each cap. Each must
//! give a clean `Err` (or `Ok`), never a panic, an abort or an allocation the size a header
//! claims.
//!
//! Inputs live in tests/fixtures/fuzz/<target>/, one file each, in the fuzz target's format:
//! - gguf_adapter: a GGUF file;
//! - samples: a JSONL samples file;
//! - peft: byte 0 picks the base (llama, qwen2, phi3, gemma2 under tests/fixtures/convert),
//!   bytes 1..5 the length of adapter_config.json (u32 LE), then its bytes, then
//!   adapter_model.safetensors.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use d2c_gguf::adapter::LoraAdapter;
use d2c_gguf::base::BaseModel;
use d2c_gguf::convert;
use d2c_gguf::gguf::{self, GgufWriter, Value, ValueType};
use d2c_gguf::samples;
use d2c_gguf::Error;

const PEFT_BASES: [&str; 4] = ["llama", "qwen2", "phi3", "gemma2"];

fn fixtures(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "no regression inputs in {}", dir.display());
    files
}

/// Runs `read` on every input; collects the panics instead of stopping at the first.
fn run_all<T>(target: &str, read: impl Fn(&Path, &[u8]) -> Result<T, Error>) {
    let mut panics = Vec::new();
    let mut outcomes = Vec::new();
    for input in fixtures(target) {
        let bytes = std::fs::read(&input).unwrap();
        match catch_unwind(AssertUnwindSafe(|| read(&input, &bytes))) {
            Ok(Ok(_)) => outcomes.push(format!("{}: ok", input.display())),
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(!msg.trim().is_empty(), "{}: empty error message", input.display());
                outcomes.push(format!("{}: {msg}", input.display()));
            }
            Err(_) => panics.push(input.display().to_string()),
        }
    }
    assert!(panics.is_empty(), "readers panicked on: {panics:?}");
    eprintln!("{}", outcomes.join("\n"));
}

#[test]
fn gguf_inputs_are_clean_errors_through_the_file_reader() {
    let dir = common::tempdir();
    run_all("gguf_adapter", |input, bytes| {
        let path = dir.path().join(input.file_name().unwrap());
        std::fs::write(&path, bytes).unwrap();
        let from_file = LoraAdapter::read(&path);
        // The in-memory entry point the fuzzer drives must agree with the file reader.
        let from_bytes = LoraAdapter::from_bytes(&path, bytes.to_vec());
        match (&from_file, &from_bytes) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{}", input.display()),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{}", input.display()),
            _ => panic!("{}: file and bytes readers disagree: {from_file:?} vs {from_bytes:?}", input.display()),
        }
        from_file
    });
}

#[test]
fn samples_inputs_are_clean_errors_through_the_file_reader() {
    let dir = common::tempdir();
    run_all("samples", |input, bytes| {
        let path = dir.path().join(input.file_name().unwrap());
        std::fs::write(&path, bytes).unwrap();
        samples::read_sample_file(&path)
    });
}

fn peft_base(selector: u8) -> BaseModel {
    let family = PEFT_BASES[selector as usize % PEFT_BASES.len()];
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convert").join(family).join("base.gguf");
    BaseModel::open(p).unwrap()
}

#[test]
fn peft_inputs_are_clean_errors_through_the_directory_reader() {
    let root = common::tempdir();
    run_all("peft", |input, bytes| {
        assert!(bytes.len() >= 5, "{}: not in the peft fuzz format", input.display());
        let base = peft_base(bytes[0]);
        let n = u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize;
        let rest = &bytes[5..];
        let (config, weights) = rest.split_at(n.min(rest.len()));
        let dir = root.path().join(input.file_name().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(convert::ADAPTER_CONFIG), config).unwrap();
        std::fs::write(dir.join(convert::ADAPTER_WEIGHTS), weights).unwrap();
        convert::convert_in_memory(&dir, &base)
    });
}

/// `err` is a format/invalid error that names `path` and mentions `field`.
fn assert_names(err: Error, path: &Path, field: &str) {
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. } | Error::Invalid { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
    assert!(msg.contains(field), "error does not name the field {field:?}: {msg}");
}

fn gguf_header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v
}

fn gguf_key(v: &mut Vec<u8>, key: &str, ty: ValueType) {
    v.extend_from_slice(&(key.len() as u64).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(&(ty as u32).to_le_bytes());
}

#[test]
fn gguf_caps_are_checked_before_allocating() {
    let dir = common::tempdir();
    let path = dir.path().join("hostile.gguf");
    let read = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        LoraAdapter::read(&path).unwrap_err()
    };

    // Counts far above the caps.
    assert_names(read(&gguf_header(u64::MAX, 0)), &path, "tensor_count");
    assert_names(read(&gguf_header(0, gguf::MAX_KV_COUNT + 1)), &path, "metadata_kv_count");

    // A string that claims more than the cap, and one that claims more than the file.
    let mut v = gguf_header(0, 1);
    gguf_key(&mut v, "general.name", ValueType::String);
    v.extend_from_slice(&(gguf::MAX_STRING_LEN + 1).to_le_bytes());
    assert_names(read(&v), &path, "general.name");
    let mut v = gguf_header(0, 1);
    gguf_key(&mut v, "general.name", ValueType::String);
    v.extend_from_slice(&1000u64.to_le_bytes());
    assert_names(read(&v), &path, "general.name");

    // Arrays: above the cap, and longer than the rest of the file.
    for n in [gguf::MAX_ARRAY_LEN + 1, 1 << 20] {
        let mut v = gguf_header(0, 1);
        gguf_key(&mut v, "tokenizer.ggml.tokens", ValueType::Array);
        v.extend_from_slice(&(ValueType::U8 as u32).to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        assert_names(read(&v), &path, "tokenizer.ggml.tokens");
    }

    // The total number of array elements: one element, then an array that alone fits its own
    // cap and the file but takes the total past MAX_METADATA_ELEMENTS.
    let mut v = gguf_header(0, 2);
    gguf_key(&mut v, "a.one", ValueType::Array);
    v.extend_from_slice(&(ValueType::U8 as u32).to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.push(7);
    gguf_key(&mut v, "a.many", ValueType::Array);
    v.extend_from_slice(&(ValueType::U8 as u32).to_le_bytes());
    v.extend_from_slice(&gguf::MAX_METADATA_ELEMENTS.to_le_bytes());
    v.resize(v.len() + gguf::MAX_METADATA_ELEMENTS as usize, 0);
    let err = LoraAdapter::from_bytes(&path, v).unwrap_err();
    assert!(err.to_string().contains("in total"), "{err}");
    assert_names(err, &path, "a.many");

    // Tensor dims: too many, zero, an element count past the cap, data outside the file.
    let tensor = |dims: &[u64], offset: u64| {
        let mut v = gguf_header(1, 0);
        let name = "blk.0.attn_q.weight.lora_a";
        v.extend_from_slice(&(name.len() as u64).to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        v
    };
    assert_names(read(&tensor(&[1, 1, 1, 1, 1], 0)), &path, "blk.0.attn_q.weight.lora_a");
    assert_names(read(&tensor(&[4, 0], 0)), &path, "blk.0.attn_q.weight.lora_a");
    assert_names(read(&tensor(&[1 << 21, 1 << 21], 0)), &path, "blk.0.attn_q.weight.lora_a");
    assert_names(read(&tensor(&[64, 4], 1 << 40)), &path, "blk.0.attn_q.weight.lora_a");

    // A well-formed writer output with a hostile alignment.
    let mut w = GgufWriter::default();
    w.set("general.alignment", Value::U32(1 << 30));
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    assert_names(read(&bytes), &path, "general.alignment");
}

#[test]
fn safetensors_header_size_is_capped_before_parsing() {
    let base = peft_base(0);
    let config = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convert/llama/lora/peft/adapter_config.json")).unwrap();
    let dir = common::tempdir();
    let peft = dir.path().join("hostile");
    std::fs::create_dir_all(&peft).unwrap();
    std::fs::write(peft.join(convert::ADAPTER_CONFIG), &config).unwrap();
    let weights = peft.join(convert::ADAPTER_WEIGHTS);
    for header in [
        (convert::MAX_SAFETENSORS_HEADER_BYTES + 1).to_le_bytes().to_vec(),
        u64::MAX.to_le_bytes().to_vec(),
        // Claims 100 bytes, the file has 2 after the size.
        [100u64.to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
        b"\x01\x02".to_vec(),
    ] {
        std::fs::write(&weights, &header).unwrap();
        let err = convert::convert_in_memory(&peft, &base).unwrap_err();
        assert_names(err, &weights, "header size");
    }
}

#[test]
fn oversized_config_and_samples_are_refused_before_reading() {
    let dir = common::tempdir();
    // Sparse files: the size is checked from the metadata, nothing this big is read.
    let config = dir.path().join("adapter_config.json");
    std::fs::File::create(&config).unwrap().set_len(convert::MAX_ADAPTER_CONFIG_BYTES + 1).unwrap();
    assert_names(convert::PeftConfig::read(&config).unwrap_err(), &config, "file size");

    let jsonl = dir.path().join("task.jsonl");
    std::fs::File::create(&jsonl).unwrap().set_len(samples::MAX_SAMPLES_FILE_BYTES + 1).unwrap();
    assert_names(samples::read_sample_file(&jsonl).unwrap_err(), &jsonl, "file size");

    // One line longer than the cap, after a good one: the line is named.
    let long = format!(
        "{{\"prompt\": \"p\", \"completion\": \"c\"}}\n{{\"prompt\": \"{}\", \"completion\": \"c\"}}\n",
        "x".repeat(samples::MAX_SAMPLE_LINE_BYTES)
    );
    std::fs::write(&jsonl, long).unwrap();
    assert_names(samples::read_sample_file(&jsonl).unwrap_err(), &jsonl, "line 2");
}
