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
        let (code, _, stderr) = common::run_cli(&["cast", "--dtype", dtype.name(), common::path_str(&src), "-o", common::path_str(&out)]);
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
    let mut loaded: Vec<_> = casts.iter().map(|p| m.load_adapter(p).unwrap()).collect();
    let mut session = m.session(512, 512, 1, Some(2), &mut loaded).unwrap();
    session.set_adapter(Some((0, 1.0))).unwrap();
    let ours = d2c_gguf::generate::greedy(&m, &mut session, "The capital of France is", 3).unwrap();
    assert_eq!(ours, outputs[0], "{}", casts[0].display());
}
