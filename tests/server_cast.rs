//! Files from `cast` load in a real llama-server and change what it generates.

mod common;

use d2c_gguf::adapter::DType;
use d2c_gguf::base::BaseModel;
use d2c_gguf::synth;
use serde_json::json;

#[test]
fn cast_outputs_load_and_act_in_llama_server() {
    let model = common::base_model();
    let base = BaseModel::open(&model).unwrap();
    let dir = common::tempdir();
    // Rank 32 so that Q8_0 (32-wide blocks) applies to lora_b too.
    let src = dir.path().join("src.gguf");
    synth::random_adapter(&base, &["attn_q", "attn_v", "ffn_down"], 32, 32.0, 0.05, 11).unwrap().write(&src, DType::F32, &[]).unwrap();
    let mut casts = Vec::new();
    for dtype in DType::ALL {
        let out = dir.path().join(format!("cast-{dtype}.gguf"));
        let (code, _, stderr) = common::run_cli(&["cast", "--dtype", &dtype.to_string(), common::path_str(&src), "-o", common::path_str(&out)]);
        assert_eq!(code, 0, "{stderr}");
        casts.push(out);
    }
    let refs: Vec<&std::path::Path> = casts.iter().map(|p| p.as_path()).collect();
    let server = common::LlamaServer::start(&model, &refs, &[]);
    let listed = server.get_json("/lora-adapters");
    let listed = listed.as_array().expect("adapter list");
    assert_eq!(listed.len(), casts.len(), "{listed:?}");
    for (i, p) in casts.iter().enumerate() {
        assert_eq!(listed[i]["id"], i);
        assert!(listed[i]["path"].as_str().unwrap().ends_with(p.file_name().unwrap().to_str().unwrap()));
    }
    let ask = |lora: serde_json::Value| -> String {
        let body = json!({"prompt": "The capital of France is", "n_predict": 3, "temperature": 0.0, "top_k": 1, "seed": 1, "lora": lora, "cache_prompt": false});
        server.post_json("/completion", &body)["content"].as_str().unwrap().to_string()
    };
    let all_off: Vec<_> = (0..casts.len()).map(|i| json!({"id": i, "scale": 0.0})).collect();
    let plain = ask(json!(all_off));
    let mut outputs = Vec::new();
    for i in 0..casts.len() {
        let lora: Vec<_> = (0..casts.len()).map(|j| json!({"id": j, "scale": if i == j { 1.0 } else { 0.0 }})).collect();
        outputs.push(ask(json!(lora)));
    }
    // Every encoding steers generation away from the base, and with the f32 file the server
    // generates what libllama in this process generates (same llama.cpp). Only a few tokens,
    // and f32 only: a strong random adapter makes near-ties, and the 16-bit types round the
    // activations in kernels whose choice depends on batch layout, so they may flip one.
    assert!(outputs.iter().all(|o| o != &plain), "adapters did not change the output: {plain:?} vs {outputs:?}");
    let mut m = d2c_gguf::llama::Model::load(&model).unwrap();
    let first = m.load_adapter(&casts[0]).unwrap();
    let mut session = m.session(512, 512, 1, Some(2)).unwrap();
    session.set_adapter(Some((first, 1.0))).unwrap();
    let ours = d2c_gguf::generate::greedy(&m, &mut session, "The capital of France is", 3).unwrap();
    assert_eq!(ours, outputs[0], "{}", casts[0].display());
}

/// The lower-bit storage types on real adapters (the demo set's four PEFT adapters, rank 8, so
/// `lora_a` is block-quantised and `lora_b` stays f16): cast files answer their held-out tests
/// in llama-server nearly as the f16 originals do. Measured, then held to a tolerance per
/// type (the figures are printed; docs/results.md has them).
#[test]
fn real_adapters_in_lower_bit_types_answer_their_tests_as_f16_does() {
    let model = common::base_model();
    let set = common::demo_set();
    let dir = common::tempdir();
    let tasks = ["arith-add", "arith-mul", "case-kebab", "case-snake"];
    let types = [DType::F16, DType::Q8_0, DType::Q5_0, DType::Q4_0];
    let mut files = Vec::new();
    for task in tasks {
        for dtype in types {
            let out = dir.path().join(format!("{task}-{dtype}.gguf"));
            let src = set.join("adapters").join(format!("{task}.gguf"));
            let (code, _, stderr) = common::run_cli(&["cast", "--dtype", &dtype.to_string(), common::path_str(&src), "-o", common::path_str(&out)]);
            assert_eq!(code, 0, "{stderr}");
            files.push(out);
        }
    }
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let server = common::LlamaServer::start(&model, &refs, &[]);
    let mut agree = vec![0usize; types.len()];
    let mut correct = vec![0usize; types.len()];
    let mut total = 0;
    for (ti, task) in tasks.iter().enumerate() {
        let tests = std::fs::read_to_string(set.join("test").join(format!("{task}.jsonl"))).unwrap();
        for line in tests.lines().filter(|l| !l.trim().is_empty()) {
            let t: serde_json::Value = serde_json::from_str(line).unwrap();
            let (prompt, want) = (t["prompt"].as_str().unwrap(), t["completion"].as_str().unwrap());
            total += 1;
            let mut answers = Vec::new();
            for di in 0..types.len() {
                let id = ti * types.len() + di;
                let lora: Vec<_> = (0..files.len()).map(|j| json!({"id": j, "scale": if j == id { 1.0 } else { 0.0 }})).collect();
                let body =
                    json!({"prompt": prompt, "n_predict": 12, "temperature": 0.0, "top_k": 1, "lora": lora, "stop": ["\n"], "cache_prompt": false});
                let got = server.post_json("/completion", &body)["content"].as_str().unwrap().to_string();
                correct[di] += usize::from(got.trim() == want.trim());
                answers.push(got);
            }
            for di in 0..types.len() {
                agree[di] += usize::from(answers[di] == answers[0]);
            }
        }
    }
    for (di, dtype) in types.iter().enumerate() {
        eprintln!("{dtype}: {}/{total} correct, {}/{total} answers as f16", correct[di], agree[di]);
    }
    assert!(correct[0] > total / 2, "the f16 adapters themselves: {}/{total}", correct[0]);
    // Measured on the development machine (Zen 4 kernels): f16 138/160, q8_0 137, q5_0 138,
    // q4_0 139; 156-158 of 160 answers identical to f16's. Allowed here: a few tests lost,
    // more for the coarser types, and nine in ten answers unchanged.
    for (di, allowed) in [(1, 3), (2, 4), (3, 6)] {
        assert!(correct[di] + allowed >= correct[0], "{}: {} correct vs f16 {}", types[di], correct[di], correct[0]);
        assert!(agree[di] * 10 >= total * 9, "{}: only {}/{total} answers as f16", types[di], agree[di]);
    }
}
