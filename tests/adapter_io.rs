//! Adapter GGUF round trips, checked by our reader and by gguf-py (an independent reader).

mod common;

use std::process::Command;

use d2c_gguf::adapter::{DType, LoraAdapter, LoraTarget, KEY_TASK_NAME};
use d2c_gguf::gguf::{GgufFile, Value};
use d2c_gguf::synth;

fn sample_adapter(rank: usize) -> LoraAdapter {
    let mut rng = synth::rng(42);
    let mut a = LoraAdapter::new("llama", 2.0 * rank as f32);
    for (name, n_in, n_out) in [("blk.0.attn_q.weight", 64, 64), ("blk.0.ffn_down.weight", 96, 64), ("blk.1.attn_v.weight", 64, 32)] {
        let t = LoraTarget::new(synth::matrix(&mut rng, rank, n_in, 0.5), synth::matrix(&mut rng, n_out, rank, 0.5), rank, n_in, n_out);
        a.targets.insert(name.to_string(), t);
    }
    a.metadata.insert(KEY_TASK_NAME.into(), Value::String("unit-test".into()));
    a
}

/// Worst error relative to the largest magnitude of each matrix (how quantisers bound error).
fn rel_to_max(x: &[f32], y: &[f32]) -> f32 {
    let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / m
}

#[test]
fn round_trip_every_dtype_within_its_precision() {
    let dir = common::tempdir();
    // Q8_0 needs rows that are multiples of 32, and lora_b rows are `rank` long.
    let adapter = sample_adapter(32);
    // Block types: within one quantisation step of the block's scale (max / 127, / 16, / 8),
    // relative to the block's largest value (at most the tensor's).
    let block_types = [(DType::Q8_0, 8e-3), (DType::Q5_0, 1.0 / 16.0), (DType::Q4_0, 1.0 / 8.0)];
    for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 1e-3), (DType::BF16, 8e-3)].into_iter().chain(block_types) {
        let path = dir.path().join(format!("a-{dtype}.gguf"));
        let written = adapter.write(&path, dtype, &[]).unwrap();
        assert_eq!(written, std::fs::metadata(&path).unwrap().len());
        let back = LoraAdapter::read(&path).unwrap();
        assert_eq!(back.architecture, "llama");
        assert_eq!(back.alpha, adapter.alpha);
        assert_eq!(back.task_name(), Some("unit-test"));
        assert_eq!(back.targets.len(), adapter.targets.len());
        for (name, t) in &adapter.targets {
            let b = &back.targets[name];
            assert_eq!((b.rank, b.n_in, b.n_out), (t.rank, t.n_in, t.n_out), "{name}");
            assert_eq!((b.a_dtype, b.b_dtype), (dtype, dtype));
            let (ea, eb) = (rel_to_max(&b.a, &t.a), rel_to_max(&b.b, &t.b));
            assert!(ea <= tol && eb <= tol, "{dtype} {name}: errors {ea} {eb} > {tol}");
        }
    }
}

/// Q8_0 blocks are 32 values: a rank-8 `lora_b` (rows of 8) cannot be Q8_0 and is stored as
/// F16 instead, while every `lora_a` (rows of 64 or 96) is Q8_0; both read back within their
/// type's error and load as the same adapter.
#[test]
fn q8_0_stores_rows_that_are_not_whole_blocks_as_f16() {
    let dir = common::tempdir();
    let path = dir.path().join("q8.gguf");
    let adapter = sample_adapter(8);
    adapter.write(&path, DType::Q8_0, &[]).unwrap();
    let back = LoraAdapter::read(&path).unwrap();
    for (name, t) in &adapter.targets {
        let b = &back.targets[name];
        assert_eq!((b.a_dtype, b.b_dtype), (DType::Q8_0, DType::F16), "{name}");
        assert!(rel_to_max(&b.a, &t.a) <= 1.0 / 127.0, "{name}: lora_a error");
        assert!(rel_to_max(&b.b, &t.b) <= 1e-3, "{name}: lora_b error");
    }
    // Rank 32: every row is whole blocks, so everything is Q8_0.
    let path32 = dir.path().join("q8-r32.gguf");
    sample_adapter(32).write(&path32, DType::Q8_0, &[]).unwrap();
    assert!(LoraAdapter::read(&path32).unwrap().targets.values().all(|t| (t.a_dtype, t.b_dtype) == (DType::Q8_0, DType::Q8_0)));
}

#[test]
fn token_embd_pairs_keep_llama_cpp_layout() {
    let mut rng = synth::rng(1);
    let (rank, n_vocab, n_embd) = (4, 40, 24);
    let mut a = LoraAdapter::new("llama", 0.0);
    a.targets.insert(
        "token_embd.weight".into(),
        LoraTarget::new(synth::matrix(&mut rng, rank, n_embd, 1.0), synth::matrix(&mut rng, n_vocab, rank, 1.0), rank, n_embd, n_vocab),
    );
    let dir = common::tempdir();
    let path = dir.path().join("embd.gguf");
    a.write(&path, DType::F32, &[]).unwrap();
    let file = GgufFile::open(&path).unwrap();
    // llama.cpp: a.ne = [r, n_vocab], b.ne = [r, n_embd].
    assert_eq!(file.tensor("token_embd.weight.lora_a").unwrap().dims, vec![rank as u64, n_vocab as u64]);
    assert_eq!(file.tensor("token_embd.weight.lora_b").unwrap().dims, vec![rank as u64, n_embd as u64]);
    let back = LoraAdapter::read(&path).unwrap();
    assert_eq!(back.targets["token_embd.weight"].dense_ba(), a.targets["token_embd.weight"].dense_ba());
}

#[test]
fn writing_never_replaces_an_input() {
    let dir = common::tempdir();
    let path = dir.path().join("in.gguf");
    sample_adapter(8).write(&path, DType::F32, &[]).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = sample_adapter(8).write(&path, DType::F16, &[&path]).unwrap_err().to_string();
    assert!(err.contains("refusing"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Through the CLI too.
    let p = common::path_str(&path);
    let (code, _, stderr) = common::run_cli(&["cast", "--dtype", "f16", p, "-o", p]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("refusing"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn same_content_gives_same_bytes() {
    let dir = common::tempdir();
    let (p1, p2) = (dir.path().join("1.gguf"), dir.path().join("2.gguf"));
    sample_adapter(8).write(&p1, DType::F16, &[]).unwrap();
    sample_adapter(8).write(&p2, DType::F16, &[]).unwrap();
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
}

const GGUF_PY_DUMP: &str = r#"
import json, sys
import numpy as np
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
out = {"kv": {}, "tensors": {}}
for f in r.fields.values():
    if f.name.startswith("GGUF."):
        continue
    v = f.contents()
    out["kv"][f.name] = v if isinstance(v, (str, int, float, list)) else str(v)
for t in r.tensors:
    from gguf.quants import dequantize
    data = dequantize(t.data, t.tensor_type)
    out["tensors"][t.name] = {
        "shape": [int(x) for x in t.shape],
        "type": t.tensor_type.name,
        "values": [float(x) for x in np.asarray(data, dtype=np.float32).reshape(-1)],
    }
print(json.dumps(out))
"#;

#[test]
fn gguf_py_reads_what_we_write() {
    let dir = common::tempdir();
    let adapter = sample_adapter(32);
    for dtype in DType::ALL {
        let path = dir.path().join(format!("py-{dtype}.gguf"));
        adapter.write(&path, dtype, &[]).unwrap();
        let out = Command::new(common::python()).arg("-c").arg(GGUF_PY_DUMP).arg(&path).output().expect("run python");
        assert!(out.status.success(), "gguf-py failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["kv"]["general.type"], "adapter");
        assert_eq!(v["kv"]["general.architecture"], "llama");
        assert_eq!(v["kv"]["adapter.type"], "lora");
        assert_eq!(v["kv"]["adapter.lora.alpha"].as_f64().unwrap() as f32, adapter.alpha);
        assert_eq!(v["kv"]["adapter.lora.task_name"], "unit-test");
        let ours = LoraAdapter::read(&path).unwrap();
        let tensors = v["tensors"].as_object().unwrap();
        assert_eq!(tensors.len(), 2 * adapter.targets.len());
        for (name, t) in &ours.targets {
            let a = &tensors[&format!("{name}.lora_a")];
            let b = &tensors[&format!("{name}.lora_b")];
            assert_eq!(a["type"], dtype.to_string().to_uppercase(), "{name}");
            // gguf-py reports shapes in ggml order (ne[0] first).
            assert_eq!(a["shape"], serde_json::json!([t.n_in, t.rank]), "{name}");
            assert_eq!(b["shape"], serde_json::json!([t.rank, t.n_out]), "{name}");
            let av: Vec<f32> = a["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let bv: Vec<f32> = b["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            // Both readers decode the same bytes: they must agree exactly.
            assert_eq!(av, t.a, "{dtype} {name}.lora_a");
            assert_eq!(bv, t.b, "{dtype} {name}.lora_b");
        }
    }
}

#[test]
fn inspect_json_lists_targets() {
    let dir = common::tempdir();
    let path = dir.path().join("i.gguf");
    sample_adapter(8).write(&path, DType::F16, &[]).unwrap();
    let (code, stdout, stderr) = common::run_cli(&["inspect", "--json", common::path_str(&path)]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["alpha"], 16.0);
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    assert!(targets.iter().all(|t| t["rank"] == 8 && t["name"].is_string()));
    let (code, stdout, _) = common::run_cli(&["inspect", "--json", common::path_str(&path), common::path_str(&path)]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}
