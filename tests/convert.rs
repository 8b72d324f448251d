//! `convert`: PEFT adapters -> llama.cpp GGUF, checked against llama.cpp's own converter.
//!
//! Fixtures (tests/fixtures/convert, made by scripts/make-convert-fixtures.sh): per family a tiny
//! random HF model converted by convert_hf_to_gguf.py (`base.gguf`), PEFT adapters made by real
//! PEFT (`<case>/peft`), the reference GGUF made by convert_lora_to_gguf.py
//! (`<case>/reference.gguf`), and PEFT's own scale of every module (`<case>/peft_scaling.json`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{path_str, run_cli, tempdir};
use d2c_gguf::adapter::{DType, LoraAdapter, KEY_TASK_NAME};
use d2c_gguf::base::BaseModel;
use d2c_gguf::convert::{self, ScaleMode};
use d2c_gguf::gguf::{GgufFile, GgufWriter, TensorOut, Value};
use d2c_gguf::llama::{Batch, Model, Token};
use d2c_gguf::validate;

const FAMILIES: [&str; 6] = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];
const THREADS: i32 = 2;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convert")
}

fn base_of(family: &str) -> PathBuf {
    fixtures().join(family).join("base.gguf")
}

fn case_dir(family: &str, case: &str) -> PathBuf {
    fixtures().join(family).join(case)
}

/// GGUF tensor name -> the scale PEFT itself applies to that module (read from the live PEFT
/// layers when the fixture was made; names from gguf-py's map, not ours).
fn peft_scales(case: &Path) -> BTreeMap<String, f32> {
    let text = std::fs::read_to_string(case.join("peft_scaling.json")).expect("peft_scaling.json");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    rows.iter().map(|r| (r["gguf"].as_str().unwrap().to_string(), r["scale"].as_f64().unwrap() as f32)).collect()
}

fn scaled_delta(adapter: &LoraAdapter, name: &str, scale: Option<f32>) -> Vec<f32> {
    let t = &adapter.targets[name];
    let s = scale.unwrap_or_else(|| adapter.scale(t));
    t.dense_ba().into_iter().map(|v| v * s).collect()
}

/// Largest |x - y| over the largest |y|: 1e-3 means equal to 0.1 % of the delta's size.
fn rel_diff(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "a zero delta proves nothing");
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

fn convert_to(dir: &Path, family_case: (&str, &str), dtype: DType) -> (PathBuf, convert::ConvertSummary) {
    let (family, case) = family_case;
    let out = dir.join(format!("{family}-{case}.gguf"));
    let summary = convert::convert_peft(&case_dir(family, case).join("peft"), &base_of(family), &out, Some(dtype))
        .unwrap_or_else(|e| panic!("{family}/{case}: {e}"));
    (out, summary)
}

/// Our deltas equal what PEFT applies, with the reference's tensors (names, layout, rotary
/// permutation) as the other side: delta = PEFT scale * B_ref A_ref.
fn assert_matches_peft(family: &str, case: &str, ours: &LoraAdapter) {
    assert_matches_peft_at(&case_dir(family, case), ours)
}

fn assert_matches_peft_at(dir: &Path, ours: &LoraAdapter) {
    let what = dir.strip_prefix(fixtures()).unwrap_or(dir).display().to_string();
    let reference = LoraAdapter::read(dir.join("reference.gguf")).unwrap();
    let scales = peft_scales(dir);
    assert_eq!(ours.architecture, reference.architecture, "{what}");
    assert_eq!(ours.targets.keys().collect::<Vec<_>>(), reference.targets.keys().collect::<Vec<_>>(), "{what}: tensor set");
    assert_eq!(scales.keys().collect::<Vec<_>>(), reference.targets.keys().collect::<Vec<_>>(), "{what}: fixture");
    for (name, t) in &ours.targets {
        let r = &reference.targets[name];
        assert_eq!((t.rank, t.n_in, t.n_out), (r.rank, r.n_in, r.n_out), "{what} {name}: shape");
        let expected = scaled_delta(&reference, name, Some(scales[name]));
        let err = rel_diff(&scaled_delta(ours, name, None), &expected);
        assert!(err < 1e-3, "{what} {name}: delta differs from PEFT's by {err}");
    }
}

#[test]
fn every_family_matches_the_reference_converter() {
    let dir = tempdir();
    for family in FAMILIES {
        let (out, summary) = convert_to(dir.path(), (family, "lora"), DType::F32);
        let ours = LoraAdapter::read(&out).unwrap();
        let reference = LoraAdapter::read(case_dir(family, "lora").join("reference.gguf")).unwrap();
        // One alpha for all targets: the file keeps lora_alpha exactly as the reference does.
        assert_eq!(summary.scale_mode, ScaleMode::FileAlpha(reference.alpha), "{family}");
        assert_eq!(ours.alpha, reference.alpha, "{family}");
        for name in reference.targets.keys() {
            let err = rel_diff(&scaled_delta(&ours, name, None), &scaled_delta(&reference, name, None));
            assert!(err < 1e-3, "{family} {name}: delta differs from the reference's by {err}");
        }
        assert_matches_peft(family, "lora", &ours);
        let base = BaseModel::open(base_of(family)).unwrap();
        assert!(validate::validate_adapter(&base, &out).is_empty(), "{family}");
        assert_eq!(ours.task_name(), Some("peft"), "{family}: the task is named after the PEFT directory");
    }
}

#[test]
fn llama_q_and_k_follow_the_rotary_permutation() {
    // Without the permutation the q/k deltas would still have the right shape: make sure ours is
    // not the identity layout, i.e. that the test above would catch a missing permutation.
    let dir = tempdir();
    let (out, _) = convert_to(dir.path(), ("llama", "lora"), DType::F32);
    let ours = LoraAdapter::read(&out).unwrap();
    let peft = safetensors_b(&case_dir("llama", "lora").join("peft"), "model.layers.0.self_attn.q_proj");
    assert_ne!(ours.targets["blk.0.attn_q.weight"].b, peft, "q lora_B must be permuted");
    let peft_v = safetensors_b(&case_dir("llama", "lora").join("peft"), "model.layers.0.self_attn.v_proj");
    assert_eq!(ours.targets["blk.0.attn_v.weight"].b, peft_v, "v lora_B is not permuted");
}

fn safetensors_b(peft_dir: &Path, module: &str) -> Vec<f32> {
    let bytes = std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(&format!("base_model.model.{module}.lora_B.weight")).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::F32);
    v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn rslora_and_patterns_fold_peft_scales_into_lora_b() {
    let dir = tempdir();
    for case in ["rslora", "patterns"] {
        let (out, summary) = convert_to(dir.path(), ("llama", case), DType::F32);
        assert_eq!(summary.scale_mode, ScaleMode::FoldedIntoB, "{case}");
        let ours = LoraAdapter::read(&out).unwrap();
        assert_eq!(ours.alpha, 0.0, "{case}: alpha 0 = scale 1 in llama.cpp");
        assert_matches_peft("llama", case, &ours);
        // The reference ignores these settings: its deltas are wrong for some module, which is
        // why the comparison above goes through PEFT's own scales.
        let reference = LoraAdapter::read(case_dir("llama", case).join("reference.gguf")).unwrap();
        let scales = peft_scales(&case_dir("llama", case));
        assert!(
            reference.targets.iter().any(|(n, t)| (reference.scale(t) - scales[n]).abs() > 1e-3 * scales[n]),
            "{case}: fixture does not exercise per-module scales"
        );
    }
}

#[test]
fn embeddings_half_precision_and_frozen_copies() {
    let dir = tempdir();
    // token_embd + output LoRA on an untied model; PEFT also saved frozen copies of both
    // embedding matrices, which equal the base and are dropped. Stored in bf16.
    let (out, summary) = convert_to(dir.path(), ("llama", "embed"), DType::F32);
    let ours = LoraAdapter::read(&out).unwrap();
    assert!(ours.targets.contains_key("token_embd.weight") && ours.targets.contains_key("output.weight"));
    assert_eq!(summary.targets, 4);
    assert_matches_peft("llama", "embed", &ours);
    // f16 safetensors input.
    let (out, _) = convert_to(dir.path(), ("llama", "f16"), DType::F32);
    assert_matches_peft("llama", "f16", &LoraAdapter::read(&out).unwrap());
}

#[test]
fn storage_types_follow_llama_cpp_converter() {
    let dir = tempdir();
    for dtype in DType::ALL {
        let (out, _) = convert_to(dir.path(), ("qwen2", "lora"), dtype);
        let file = GgufFile::open(&out).unwrap();
        for t in &file.tensors {
            // Block types need rows of 32: lora_b rows are rank 4, so they fall back to F16 as
            // in convert_lora_to_gguf.py.
            let want = if !dtype.fits_row(t.dims[0] as usize) { DType::F16 } else { dtype };
            assert_eq!(DType::from_ggml(t.ggml_type), Some(want), "{dtype}: {}", t.name);
        }
        let base = BaseModel::open(base_of("qwen2")).unwrap();
        assert!(validate::validate_adapter(&base, &out).is_empty(), "{dtype}");
        std::fs::remove_file(&out).unwrap();
    }
}

/// Logits of every position of `tokens` under the base model (`None`) and each adapter.
fn logits_per_adapter(model_path: &Path, adapters: &[&Path], tokens: &[i32]) -> Vec<Vec<f32>> {
    let mut model = Model::load(model_path).unwrap();
    let loaded: Vec<_> = adapters.iter().map(|p| model.load_adapter(p).unwrap()).collect();
    let mut session = model.session(64, 64, 1, Some(THREADS)).unwrap();
    let mut out = Vec::new();
    for active in std::iter::once(None).chain(loaded.iter().map(|&id| Some((id, 1.0f32)))) {
        session.set_adapter(active).unwrap();
        let mut batch = Batch::new(64, 1);
        for (i, t) in tokens.iter().enumerate() {
            batch.add(Token(*t), i as i32, &[0], true).unwrap();
        }
        session.decode(&mut batch).unwrap();
        out.push((0..tokens.len()).flat_map(|i| session.logits_ith(i as i32).to_vec()).collect());
    }
    out
}

fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

#[test]
fn llama_cpp_applies_ours_like_the_reference_on_every_family() {
    let dir = tempdir();
    let tokens = [2, 40, 41, 100, 7, 250, 300, 12];
    for (family, case) in FAMILIES.iter().map(|f| (*f, "lora")).chain([("llama", "embed")]) {
        let (ours, _) = convert_to(dir.path(), (family, case), DType::F32);
        let reference = case_dir(family, case).join("reference.gguf");
        let logits = logits_per_adapter(&base_of(family), &[&ours, &reference], &tokens);
        let (base, ours, reference) = (&logits[0], &logits[1], &logits[2]);
        let effect = max_abs_diff(reference, base);
        let diff = max_abs_diff(ours, reference);
        assert!(effect > 1e-2, "{family}/{case}: the adapter barely changes the output ({effect})");
        assert!(diff <= 1e-4 * effect.max(1.0), "{family}/{case}: ours differs from the reference by {diff} (adapter effect {effect})");
    }
}

#[test]
fn smollm2_output_changes_exactly_as_with_the_reference() {
    let base = common::base_model();
    let dir = tempdir();
    let case = fixtures().join("smollm2");
    let reference = case.join("reference.gguf");
    // The reference is F16: in F16 ours is the same bytes, tensor for tensor.
    let ours_f16 = dir.path().join("smollm2-f16.gguf");
    convert::convert_peft(&case.join("peft"), &base, &ours_f16, Some(DType::F16)).unwrap();
    let (a, b) = (GgufFile::open(&ours_f16).unwrap(), GgufFile::open(&reference).unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &b.tensors {
        let mine = a.tensor(&t.name).unwrap_or_else(|| panic!("missing {}", t.name));
        assert_eq!((mine.ggml_type, &mine.dims), (t.ggml_type, &t.dims), "{}", t.name);
        assert!(a.tensor_data(mine) == b.tensor_data(t), "{}: bytes differ from the reference", t.name);
    }
    // So llama.cpp (through d2c_gguf::llama) computes the very same logits with either file.
    let model = Model::load(&base).unwrap();
    let tokens: Vec<i32> = model.tokenize("The capital of France is Paris, and the capital of Italy is", false).iter().map(|t| t.0).collect();
    drop(model);
    let logits = logits_per_adapter(&base, &[&ours_f16, &reference], &tokens);
    let effect = max_abs_diff(&logits[2], &logits[0]);
    assert!(effect > 0.1, "the adapter barely changes SmolLM2's logits ({effect})");
    assert_eq!(logits[1], logits[2], "our adapter must change the output exactly as the reference does");
    // In F32 (llama.cpp then computes the LoRA product in another precision, so logits are not
    // comparable bit for bit) the deltas are PEFT's.
    let ours_f32 = dir.path().join("smollm2-f32.gguf");
    convert::convert_peft(&case.join("peft"), &base, &ours_f32, Some(DType::F32)).unwrap();
    assert_matches_peft_at(&case, &LoraAdapter::read(&ours_f32).unwrap());
}

/// Copies a fixture's PEFT directory so that a test can damage it.
fn copy_peft(family: &str, case: &str, to: &Path) -> PathBuf {
    let dst = to.join(format!("{family}-{case}"));
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(case_dir(family, case).join("peft")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites adapter_model.safetensors through `edit` (name -> (dtype, shape, bytes)).
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.iter().map(|(n, v)| (n.to_string(), (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        map.iter().map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

/// Converting must fail with a message that names `file_part` and says `reason_part`, and
/// leave the output directory exactly as it was (empty).
fn assert_refused(peft: &Path, base: &Path, out_dir: &Path, file_part: &str, reason_parts: &[&str]) {
    let out = out_dir.join("out.gguf");
    let err = convert::convert_peft(peft, base, &out, Some(DType::F32)).expect_err("conversion should be refused").to_string();
    assert!(err.contains(file_part), "error should name {file_part}: {err}");
    for part in reason_parts {
        assert!(err.contains(part), "error should say {part:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing may be written, found {left:?}");
}

#[test]
fn bad_inputs_are_refused_and_nothing_is_written() {
    let work = tempdir();
    let out_dir = tempdir();
    let llama = base_of("llama");

    let missing = copy_peft("llama", "lora", work.path());
    std::fs::remove_file(missing.join("adapter_config.json")).unwrap();
    assert_refused(&missing, &llama, out_dir.path(), "adapter_config.json", &["missing"]);

    let garbage = copy_peft("llama", "lora", work.path().join("g").as_path());
    std::fs::write(garbage.join("adapter_config.json"), "{ not json").unwrap();
    assert_refused(&garbage, &llama, out_dir.path(), "adapter_config.json", &["not valid JSON"]);

    let no_alpha = copy_peft("llama", "lora", work.path().join("na").as_path());
    edit_config(&no_alpha, |c| {
        c.remove("lora_alpha");
    });
    assert_refused(&no_alpha, &llama, out_dir.path(), "adapter_config.json", &["lora_alpha", "missing"]);

    let wrong_rank = copy_peft("llama", "lora", work.path().join("wr").as_path());
    edit_config(&wrong_rank, |c| {
        c.insert("r".into(), 8.into());
    });
    assert_refused(&wrong_rank, &llama, out_dir.path(), "adapter_model.safetensors", &["rank 4", "rank 8"]);

    // DoRA: by its config flag, and by its tensors if the flag is gone.
    let dora = case_dir("llama", "dora").join("peft");
    assert_refused(&dora, &llama, out_dir.path(), "adapter_config.json", &["use_dora", "DoRA"]);
    let dora_unflagged = copy_peft("llama", "dora", work.path());
    edit_config(&dora_unflagged, |c| {
        c.insert("use_dora".into(), false.into());
    });
    assert_refused(&dora_unflagged, &llama, out_dir.path(), "lora_magnitude_vector", &["DoRA"]);

    // LoRA biases, likewise.
    let bias = case_dir("llama", "lora-bias").join("peft");
    assert_refused(&bias, &llama, out_dir.path(), "adapter_config.json", &["lora_bias"]);
    let bias_unflagged = copy_peft("llama", "lora-bias", work.path());
    edit_config(&bias_unflagged, |c| {
        c.insert("lora_bias".into(), false.into());
    });
    assert_refused(&bias_unflagged, &llama, out_dir.path(), "lora_B.bias", &["bias"]);

    // modules_to_save: a full lm_head weight in the file.
    let mts = case_dir("llama", "modules-to-save").join("peft");
    assert_refused(&mts, &llama, out_dir.path(), "base_model.model.lm_head.weight", &["full weight", "modules_to_save"]);

    // Modules the architecture does not have / a base of another architecture / shapes.
    // (Both down_proj fit; the first fused/unfused projection is what gives the family away.)
    let phi3 = case_dir("phi3", "lora").join("peft");
    assert_refused(&phi3, &llama, out_dir.path(), "gate_up_proj", &["no counterpart in llama.cpp's llama"]);
    let llama_lora = case_dir("llama", "lora").join("peft");
    assert_refused(&llama_lora, &base_of("phi3"), out_dir.path(), "mlp.gate_proj", &["no counterpart in llama.cpp's phi3"]);
    let qwen2 = case_dir("qwen2", "lora").join("peft");
    assert_refused(&qwen2, &llama, out_dir.path(), "adapter_model.safetensors", &["shape mismatch", "another model"]);
    assert_refused(&llama_lora, &base_of("gemma2"), out_dir.path(), "adapter_model.safetensors", &["shape mismatch"]);
    assert_refused(&llama_lora, &common::base_model(), out_dir.path(), "adapter_model.safetensors", &["shape mismatch"]);
    let bert = work.path().join("bert.gguf");
    let mut w = GgufWriter::default();
    w.set("general.architecture", Value::String("bert".into()));
    w.tensors.push(TensorOut {
        name: "blk.0.attn_q.weight".into(),
        dims: vec![64, 64],
        ggml_type: DType::F32.ggml_type(),
        data: vec![0; 64 * 64 * 4],
    });
    w.write_atomic(&bert, &[]).unwrap();
    assert_refused(&llama_lora, &bert, out_dir.path(), "bert.gguf", &["bert is not supported", "llama, qwen2"]);

    // Embedding LoRA on a tied-embedding model (llama.cpp would abort), and lm_head LoRA there.
    let tied = case_dir("qwen2", "embed-tied").join("peft");
    assert_refused(&tied, &base_of("qwen2"), out_dir.path(), "embed_tokens.lora_embedding_A", &["tied embeddings"]);
    let lm_head_tied = copy_peft("qwen2", "lora", work.path());
    edit_tensors(&lm_head_tied, |m| {
        let a = m["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone();
        let b = (safetensors::Dtype::F32, vec![320, 4], vec![0u8; 320 * 4 * 4]);
        m.insert("base_model.model.lm_head.lora_A.weight".into(), a);
        m.insert("base_model.model.lm_head.lora_B.weight".into(), b);
    });
    assert_refused(&lm_head_tied, &base_of("qwen2"), out_dir.path(), "lm_head.lora_A.weight", &["ties its output"]);

    // A layer the base does not have, a lone factor, NaN values.
    let extra_layer = copy_peft("llama", "lora", work.path().join("el").as_path());
    edit_tensors(&extra_layer, |m| {
        for half in ["A", "B"] {
            let t = m[&format!("base_model.model.model.layers.1.self_attn.q_proj.lora_{half}.weight")].clone();
            m.insert(format!("base_model.model.model.layers.5.self_attn.q_proj.lora_{half}.weight"), t);
        }
    });
    assert_refused(&extra_layer, &llama, out_dir.path(), "layers.5", &["blk.5.attn_q.weight", "2 layers"]);
    let lone = copy_peft("llama", "lora", work.path().join("lone").as_path());
    edit_tensors(&lone, |m| {
        m.remove("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight");
    });
    assert_refused(&lone, &llama, out_dir.path(), "layers.0.mlp.up_proj.lora_A.weight", &["no lora_B"]);
    let nan = copy_peft("llama", "lora", work.path().join("nan").as_path());
    edit_tensors(&nan, |m| {
        let t = m.get_mut("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight").unwrap();
        t.2[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_refused(&nan, &llama, out_dir.path(), "v_proj.lora_A.weight", &["NaN"]);

    // A regex rank pattern cannot be matched exactly as PEFT does: refused, not guessed.
    let regex = copy_peft("llama", "patterns", work.path());
    edit_config(&regex, |c| {
        c.insert("rank_pattern".into(), serde_json::json!({"^model.*q_proj": 2}));
    });
    assert_refused(&regex, &llama, out_dir.path(), "adapter_config.json", &["rank_pattern", "regular-expression"]);
}

#[test]
fn cli_converts_one_and_a_directory_of_adapters() {
    let work = tempdir();
    let out = work.path().join("one.gguf");
    let peft = case_dir("gemma3", "lora").join("peft");
    let (code, _, stderr) =
        run_cli(&["convert", "--peft", path_str(&peft), "--base", path_str(&base_of("gemma3")), "-o", path_str(&out), "--dtype", "f16"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("wrote"), "{stderr}");
    let (code, stdout, _) = run_cli(&["validate", "--base", path_str(&base_of("gemma3")), path_str(&out)]);
    assert_eq!(code, 0, "{stdout}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o444, 0o444, "a server running as another user must be able to read the adapter");
    }

    // Batch: tasks/<name>/ -> out/<name>.gguf, named by task.
    let tasks = work.path().join("tasks");
    for (name, case) in [("summarize", "lora"), ("translate", "rslora"), ("classify", "patterns")] {
        let dst = copy_peft("llama", case, &tasks);
        std::fs::rename(&dst, tasks.join(name)).unwrap();
    }
    let out_dir = work.path().join("gguf");
    let (code, _, stderr) = run_cli(&["convert", "--peft-dir", path_str(&tasks), "--base", path_str(&base_of("llama")), "-o", path_str(&out_dir)]);
    assert_eq!(code, 0, "{stderr}");
    for name in ["summarize", "translate", "classify"] {
        let a = LoraAdapter::read(out_dir.join(format!("{name}.gguf"))).unwrap();
        assert_eq!(a.metadata.get(KEY_TASK_NAME).and_then(|v| v.as_str()), Some(name));
    }
    assert_matches_peft("llama", "rslora", &LoraAdapter::read(out_dir.join("translate.gguf")).unwrap());

    // One bad adapter in the batch: all refused, nothing written.
    let bad = copy_peft("llama", "dora", &tasks);
    std::fs::rename(&bad, tasks.join("zz-dora")).unwrap();
    let out_dir2 = work.path().join("gguf2");
    let (code, _, stderr) = run_cli(&["convert", "--peft-dir", path_str(&tasks), "--base", path_str(&base_of("llama")), "-o", path_str(&out_dir2)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("zz-dora") && stderr.contains("DoRA") && stderr.contains("nothing was written"), "{stderr}");
    assert!(!out_dir2.exists(), "the output directory must not be created");

    // Never overwrite an input.
    let inside = peft.join("adapter_model.safetensors");
    let (code, _, stderr) = run_cli(&["convert", "--peft", path_str(&peft), "--base", path_str(&base_of("gemma3")), "-o", path_str(&inside)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("refusing to write"), "{stderr}");
}

#[test]
fn without_dtype_the_output_keeps_the_inputs_storage_type() {
    let base = common::base_model();
    let dir = tempdir();
    let case = fixtures().join("smollm2");
    // The PEFT tensors are f16: converting without --dtype writes f16, the reference's bytes.
    let out = dir.path().join("default.gguf");
    let (code, _, stderr) = run_cli(&["convert", "--peft", path_str(&case.join("peft")), "--base", path_str(&base), "-o", path_str(&out)]);
    assert_eq!(code, 0, "{stderr}");
    let (a, b) = (GgufFile::open(&out).unwrap(), GgufFile::open(case.join("reference.gguf")).unwrap());
    for t in &b.tensors {
        let mine = a.tensor(&t.name).unwrap_or_else(|| panic!("missing {}", t.name));
        assert_eq!(mine.ggml_type, t.ggml_type, "{}", t.name);
    }
    let explicit = dir.path().join("explicit-f16.gguf");
    let (code, _, stderr) =
        run_cli(&["convert", "--peft", path_str(&case.join("peft")), "--base", path_str(&base), "-o", path_str(&explicit), "--dtype", "f16"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&explicit).unwrap(), "default differs from --dtype f16");
    // Merging or cutting f16 adapters without --dtype writes f16 too: a rank-1 cut of this
    // rank-2 adapter is about half its size (in f32 it would be about the same size).
    let cut = dir.path().join("cut.gguf");
    let (code, _, stderr) = run_cli(&["merge-adapters", "--method", "svd", "--rank", "1", path_str(&out), "-o", path_str(&cut)]);
    assert_eq!(code, 0, "{stderr}");
    let cut_file = GgufFile::open(&cut).unwrap();
    assert!(cut_file.tensors.iter().all(|t| t.ggml_type == d2c_gguf::ggml_type::F16), "cut adapter is not all f16");
    let (full, half) = (std::fs::metadata(&out).unwrap().len(), std::fs::metadata(&cut).unwrap().len());
    let rank = LoraAdapter::read(&out).unwrap().max_rank();
    assert_eq!(rank, 2);
    assert!(half < full * 3 / 5, "rank {rank} -> 1 in f16: {half} bytes of {full}");
    // An explicit --dtype still wins.
    let f32_out = dir.path().join("f32.gguf");
    let (code, _, stderr) =
        run_cli(&["convert", "--peft", path_str(&case.join("peft")), "--base", path_str(&base), "-o", path_str(&f32_out), "--dtype", "f32"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(GgufFile::open(&f32_out).unwrap().tensors.iter().all(|t| t.ggml_type == d2c_gguf::ggml_type::F32));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// `merge --adapters` and `eval --adapters` take PEFT directories as they are: the result is
/// the one a user gets by running `convert` first, to the byte.
#[test]
fn peft_directories_merge_and_evaluate_exactly_as_their_converted_files() {
    let dir = tempdir();
    let base = common::base_model();
    let peft = dir.path().join("peft");
    let samples = dir.path().join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    for (task, words) in [("upper", ["cat", "dog", "sun", "map", "pen"]), ("lower", ["Red", "Big", "Top", "Hat", "Sky"])] {
        copy_dir(&fixtures().join("smollm2/peft"), &peft.join(task));
        let lines: Vec<String> = words
            .iter()
            .map(|w| serde_json::json!({"prompt": format!("Word: {w}\nAnswer:"), "completion": format!(" {}", w.to_uppercase())}).to_string())
            .collect();
        std::fs::write(samples.join(format!("{task}.jsonl")), lines.join("\n") + "\n").unwrap();
    }
    let converted = dir.path().join("converted");
    let (code, _, e) = run_cli(&["convert", "--peft-dir", path_str(&peft), "--base", path_str(&base), "-o", path_str(&converted)]);
    assert_eq!(code, 0, "{e}");

    let merge = |adapters: &Path, out: &Path| {
        let args = ["merge", "--base", path_str(&base), "--adapters", path_str(adapters), "--samples", path_str(&samples)];
        let (code, o, e) =
            run_cli(&[&args[..], &["--budget", "1", "--strategy", "single", "--no-tune", "--threads", "2", "--out", path_str(out)]].concat());
        assert_eq!(code, 0, "{o}{e}");
        d2c_gguf::manifest::Manifest::read(&out.join("manifest.json")).unwrap()
    };
    let (from_peft, from_files) = (dir.path().join("from-peft"), dir.path().join("from-files"));
    let (mut a, mut b) = (merge(&peft, &from_peft), merge(&converted, &from_files));
    for (x, y) in a.adapters.iter().zip(&b.adapters) {
        assert_eq!(std::fs::read(from_peft.join(&x.file)).unwrap(), std::fs::read(from_files.join(&y.file)).unwrap(), "{}", x.file);
    }
    // The inputs name what the user gave (a PEFT directory, a file) and hash what was merged:
    // the same bytes either way.
    for (task, input) in &a.inputs {
        assert_eq!(input.adapter, peft.join(task).canonicalize().unwrap());
        assert_eq!(b.inputs[task].adapter, converted.join(format!("{task}.gguf")).canonicalize().unwrap());
        assert_eq!(input.adapter_blake3, b.inputs[task].adapter_blake3, "task {task}");
    }
    for m in [&mut a, &mut b] {
        m.timings.clear();
        m.peak_memory_mib.clear();
        m.inputs.values_mut().for_each(|input| input.adapter = Default::default());
    }
    assert_eq!(a, b);
    assert_eq!(std::fs::read_dir(peft.join("upper")).unwrap().count(), 2, "the PEFT inputs are left as they were");

    let eval = |adapters: &Path| {
        let (code, o, e) = run_cli(&[
            "eval",
            "--base",
            path_str(&base),
            "--tests",
            path_str(&samples),
            "--adapters",
            path_str(adapters),
            "--max-tokens",
            "4",
            "--json",
        ]);
        assert_eq!(code, 0, "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&o).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    let (mut ev_peft, mut ev_files) = (eval(&peft), eval(&converted));
    for (task, report) in ev_peft["tasks"].as_object_mut().unwrap() {
        // The report names what the user gave: the PEFT directory, or the file.
        assert_eq!(report["adapter"].as_str().unwrap(), path_str(&peft.join(task)));
        assert_eq!(ev_files["tasks"][task]["adapter"].as_str().unwrap(), path_str(&converted.join(format!("{task}.gguf"))));
        report.as_object_mut().unwrap().remove("adapter");
        ev_files["tasks"][task].as_object_mut().unwrap().remove("adapter");
    }
    assert_eq!(ev_peft["tasks"].as_object().unwrap().len(), 2);
    assert_eq!(ev_peft, ev_files);

    // A directory holding neither kind says what it expected.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("not-an-adapter")).unwrap();
    let (code, _, e) = run_cli(&[
        "merge",
        "--base",
        path_str(&base),
        "--adapters",
        path_str(&empty),
        "--samples",
        path_str(&empty),
        "--budget",
        "1",
        "--out",
        path_str(&dir.path().join("x")),
    ]);
    assert_eq!(code, 1);
    assert!(e.contains("PEFT directories") && e.contains("adapter_config.json"), "{e}");
}
