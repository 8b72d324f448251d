//! Broken files get a clear error naming the file and the tensor or key, and a non-zero exit.

mod common;

use std::path::{Path, PathBuf};

use d2c_gguf::adapter::{DType, LoraAdapter, LoraTarget};
use d2c_gguf::base::BaseModel;
use d2c_gguf::ggml_type;
use d2c_gguf::gguf::{GgufWriter, TensorOut, Value};
use d2c_gguf::synth;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A hand-built adapter file: metadata overrides and raw tensors (ggml dims, f32 values).
fn raw_adapter(path: &Path, kv: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32)]) {
    let mut w = GgufWriter::default();
    w.set("general.type", Value::String("adapter".into()));
    w.set("general.architecture", Value::String("llama".into()));
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(16.0));
    for (k, v) in kv {
        w.set(k, v.clone());
    }
    for (name, dims, ty) in tensors {
        let n: u64 = dims.iter().product();
        let data = if *ty == ggml_type::F32 { f32_bytes(&vec![0.01; n as usize]) } else { vec![0u8; (n * 2) as usize] };
        w.tensors.push(TensorOut { name: name.to_string(), dims: dims.clone(), ggml_type: *ty, data });
    }
    let mut f = std::fs::File::create(path).unwrap();
    w.write_to(&mut f).unwrap();
}

const F32: u32 = ggml_type::F32;

fn q(name: &str, dims: &[u64]) -> (&'static str, Vec<u64>, u32) {
    (Box::leak(name.to_string().into_boxed_str()), dims.to_vec(), F32)
}

fn validate(file: &Path) -> (i32, String) {
    let base = common::base_model();
    let (code, stdout, stderr) = common::run_cli(&["validate", "--base", common::path_str(&base), common::path_str(file)]);
    (code, format!("{stdout}{stderr}"))
}

fn good_adapter(dir: &Path) -> PathBuf {
    let base = BaseModel::open(common::base_model()).unwrap();
    let a = synth::random_adapter(&base, &["attn_q", "attn_v"], 8, 16.0, 0.02, 3).unwrap();
    let p = dir.join("good.gguf");
    a.write(&p, DType::F16, &[]).unwrap();
    p
}

#[test]
fn a_good_adapter_validates() {
    let dir = common::tempdir();
    let p = good_adapter(dir.path());
    let (code, out) = validate(&p);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok "), "{out}");
}

#[test]
fn validate_names_every_problem() {
    let dir = common::tempdir();
    let p = dir.path().join("bad.gguf");
    // attn_q: 576 -> 576, attn_k: 576 -> 192 in SmolLM2.
    raw_adapter(
        &p,
        &[("general.architecture", Value::String("qwen2".into()))],
        &[
            q("blk.0.attn_q.weight.lora_a", &[576, 8]), // lone half
            q("blk.0.attn_k.weight.lora_a", &[576, 8]),
            q("blk.0.attn_k.weight.lora_b", &[8, 576]), // wrong output size
            q("blk.1.attn_q.weight.lora_a", &[8, 576]), // transposed
            q("blk.1.attn_q.weight.lora_b", &[8, 576]),
            q("blk.0.attn_q.weight.lora_x", &[576, 8]),  // bad suffix
            q("blk.99.attn_q.weight.lora_a", &[576, 8]), // no such base tensor
            q("blk.99.attn_q.weight.lora_b", &[8, 576]),
            q("token_embd.weight.lora_a", &[8, 49152]), // tied model
            q("token_embd.weight.lora_b", &[8, 576]),
            q("blk.0.attn_norm.weight", &[576]), // skipped by llama.cpp
        ],
    );
    let (code, out) = validate(&p);
    assert_eq!(code, 1, "{out}");
    let must = [
        ("general.architecture", "qwen2"),
        ("blk.0.attn_q.weight.lora_a", "lone half"),
        ("blk.0.attn_k.weight.lora_b", "output size"),
        ("blk.1.attn_q.weight.lora_a", "ne[0]=8"),
        ("blk.0.attn_q.weight.lora_x", "unexpected suffix"),
        ("blk.99.attn_q.weight.lora_a", "does not exist"),
        ("token_embd.weight.lora_a", "tied embeddings"),
    ];
    for (field, text) in must {
        assert!(
            out.lines().any(|l| l.contains(common::path_str(&p)) && l.contains(field) && l.contains(text)),
            "missing '{field}' / '{text}' in:\n{out}"
        );
    }
    assert!(!out.contains("attn_norm"), "norm tensors are skipped as llama.cpp does:\n{out}");
}

#[test]
fn validate_finds_nan_and_wrong_type_keys() {
    let dir = common::tempdir();
    let p = dir.path().join("nan.gguf");
    let mut a = LoraAdapter::new("llama", 16.0);
    let mut b = vec![0.0f32; 576 * 8];
    b[17] = f32::NAN;
    b[18] = f32::INFINITY;
    a.targets.insert("blk.0.attn_q.weight".into(), LoraTarget::new(vec![0.1; 8 * 576], b, 8, 576, 576));
    a.metadata.insert("adapter.alora.invocation_tokens".into(), Value::Array(d2c_gguf::gguf::ValueType::String, vec![Value::String("x".into())]));
    a.write(&p, DType::F32, &[]).unwrap();
    let (code, out) = validate(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("blk.0.attn_q.weight.lora_b") && out.contains("2 NaN/Inf"), "{out}");
    assert!(out.contains("adapter.alora.invocation_tokens"), "{out}");

    let p2 = dir.path().join("type.gguf");
    raw_adapter(
        &p2,
        &[("general.type", Value::String("model".into())), ("adapter.lora.alpha", Value::U32(16))],
        &[q("blk.0.attn_q.weight.lora_a", &[576, 8]), q("blk.0.attn_q.weight.lora_b", &[8, 576])],
    );
    let (code, out) = validate(&p2);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("general.type") && out.contains("\"model\""), "{out}");
    assert!(out.contains("adapter.lora.alpha") && out.contains("f32"), "{out}");
}

fn expect_error(args: &[&str], file: &Path, needles: &[&str]) {
    let (code, stdout, stderr) = common::run_cli(args);
    assert_eq!(code, 1, "expected failure; stdout {stdout} stderr {stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(all.contains(common::path_str(file)), "error must name the file:\n{all}");
    for n in needles {
        assert!(all.contains(n), "missing '{n}' in:\n{all}");
    }
    assert!(!all.contains("panicked"), "{all}");
}

#[test]
fn broken_containers_are_clear_errors_for_every_command() {
    let dir = common::tempdir();
    let good = good_adapter(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let base = common::base_model();
    let base_s = common::path_str(&base).to_string();

    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "hello, I am not a model\n").unwrap();
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let truncated = dir.path().join("trunc.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let header_cut = dir.path().join("header.gguf");
    std::fs::write(&header_cut, &bytes[..40]).unwrap();
    let mut v = bytes.clone();
    v[4..8].copy_from_slice(&99u32.to_le_bytes());
    let version = dir.path().join("version.gguf");
    std::fs::write(&version, &v).unwrap();
    let mut v = bytes.clone();
    v[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let tensors = dir.path().join("count.gguf");
    std::fs::write(&tensors, &v).unwrap();
    let mut v = bytes.clone();
    v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let kvs = dir.path().join("kv.gguf");
    std::fs::write(&kvs, &v).unwrap();
    let unknown_type = dir.path().join("type99.gguf");
    raw_adapter(&unknown_type, &[], &[("blk.0.attn_q.weight.lora_a", vec![576, 8], 99), ("blk.0.attn_q.weight.lora_b", vec![8, 576], F32)]);
    let huge_string = dir.path().join("string.gguf");
    let mut v = bytes.clone();
    // The first key's length field sits right after the 24-byte header.
    v[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    std::fs::write(&huge_string, &v).unwrap();

    let cases: Vec<(&Path, Vec<&str>)> = vec![
        (&not_gguf, vec!["not a GGUF"]),
        (&empty, vec!["not a GGUF"]),
        (&truncated, vec!["truncated"]),
        (&header_cut, vec!["truncated"]),
        (&version, vec!["version 99"]),
        (&tensors, vec!["tensor_count", "limit"]),
        (&kvs, vec!["metadata_kv_count", "limit"]),
        (&unknown_type, vec!["blk.0.attn_q.weight.lora_a", "unknown"]),
        (&huge_string, vec!["limit"]),
    ];
    let out = dir.path().join("out.gguf");
    for (file, needles) in &cases {
        let f = common::path_str(file);
        expect_error(&["inspect", f], file, needles);
        expect_error(&["validate", "--base", &base_s, f], file, needles);
        expect_error(&["cast", "--dtype", "f16", f, "-o", common::path_str(&out)], file, needles);
        assert!(!out.exists(), "cast of a broken input must write nothing");
    }
    let missing = dir.path().join("missing.gguf");
    expect_error(&["inspect", common::path_str(&missing)], &missing, &["No such file"]);
}
