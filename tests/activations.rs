//! The activation capture behind D2C's interference model, on the real base model: the
//! captured inputs against an independent computation from the GGUF file (gguf-py), the last
//! layer's rows all there, and the output Gram built from factors against dense products.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;

use d2c_gguf::activations::ActivationProbe;
use d2c_gguf::base::BaseModel;
use d2c_gguf::interference::{FactorStack, InputRows};
use d2c_gguf::samples::Sample;
use d2c_gguf::score::{ScoreOptions, Scorer};

fn samples() -> Vec<Sample> {
    [("Translate to French: cat\n", "chat"), ("The capital of Italy is", " Rome, a city of many hills.")]
        .iter()
        .map(|(p, c)| Sample { prompt: p.to_string(), completion: c.to_string() })
        .collect()
}

/// RMSNorm(token embedding) * attn_norm weight for layer 0, from the file by gguf-py.
const LAYER0_INPUT: &str = r#"
import json, sys
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
tokens = json.loads(sys.argv[2])
t = {x.name: x for x in r.tensors}
def tensor(name):
    x = t[name]
    return dequantize(x.data, x.tensor_type).reshape([int(d) for d in reversed(x.shape)]).astype(np.float64)
emb = tensor("token_embd.weight")
norm = tensor("blk.0.attn_norm.weight")
eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].parts[-1][0])
x = emb[tokens]
y = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm
print(json.dumps(y.tolist()))
"#;

#[test]
fn captured_inputs_are_the_base_models_and_every_position_reaches_the_last_layer() {
    let base = common::base_model();
    let info = BaseModel::open(&base).unwrap();
    let n_layer = info.hparam("block_count").unwrap();
    let last_down = format!("blk.{}.ffn_down.weight", n_layer - 1);
    let scorer = Scorer::new(&base, ScoreOptions::default()).unwrap();
    let tokenized: Vec<_> = samples().iter().map(|s| scorer.tokenize_sample(s).unwrap()).collect();
    let weights: HashSet<String> = ["blk.0.attn_q.weight".to_string(), last_down.clone()].into();
    let longest = tokenized.iter().map(|s| s.tokens.len()).max().unwrap();
    let mut probe = ActivationProbe::new(&base, weights, Some(2), longest).unwrap();
    let inputs = probe.inputs(&tokenized, 64).unwrap();

    // One row per scored position: the one before each completion token, and the last.
    let expected_rows: usize = tokenized.iter().map(|s| s.n_scored() + 1).sum();
    let q = &inputs["blk.0.attn_q.weight"];
    assert_eq!((q.rows, q.n_in), (expected_rows, info.tensor_dims("blk.0.attn_q.weight").unwrap()[0] as usize));
    let down = &inputs[&last_down];
    assert_eq!(down.rows, expected_rows, "the last layer sees every position, not only the logits row");
    assert_eq!(down.n_in, info.tensor_dims(&last_down).unwrap()[0] as usize);

    let positions: Vec<i32> = tokenized.iter().flat_map(|s| s.tokens[s.first_scored - 1..].iter().map(|t| t.0)).collect();
    let out = Command::new(common::python())
        .arg("-c")
        .arg(LAYER0_INPUT)
        .arg(&base)
        .arg(serde_json::to_string(&positions).unwrap())
        .output()
        .expect("run python");
    assert!(out.status.success(), "gguf-py: {}", String::from_utf8_lossy(&out.stderr));
    let reference: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reference.len(), q.rows);
    let mut worst = 0f64;
    for (r, want) in reference.iter().enumerate() {
        let got = &q.data[r * q.n_in..(r + 1) * q.n_in];
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((*g as f64 - w).abs() / scale);
        }
    }
    assert!(worst < 1e-4, "layer 0's captured input differs from RMSNorm(embedding) by {worst} of its scale");
    // A second take starts empty: captures never leak between tasks.
    assert!(probe.inputs(&[], 64).unwrap().is_empty());
}

#[test]
fn the_output_gram_from_factors_matches_dense_deltas_on_captured_inputs() {
    let base = common::base_model();
    let info = BaseModel::open(&base).unwrap();
    let adapters: Vec<_> = (0..3).map(|s| d2c_gguf::synth::random_adapter(&info, &["attn_v", "ffn_down"], 4, 8.0, 0.02, s).unwrap()).collect();
    let mut adapters = adapters;
    // Keep three layers so the dense reference stays small.
    for a in &mut adapters {
        a.targets.retain(|name, _| ["blk.0.", "blk.5.", "blk.9."].iter().any(|p| name.starts_with(p)));
    }
    let refs: Vec<_> = adapters.iter().collect();
    let scorer = Scorer::new(&base, ScoreOptions::default()).unwrap();
    let tokenized: Vec<_> = samples().iter().map(|s| scorer.tokenize_sample(s).unwrap()).collect();
    let weights: HashSet<String> = adapters[0].targets.keys().cloned().collect();
    let mut probe = ActivationProbe::new(&base, weights, Some(2), 64).unwrap();
    let inputs = probe.inputs(&tokenized, 64).unwrap();
    let rows: BTreeMap<String, InputRows<'_>> =
        inputs.iter().map(|(k, x)| (k.clone(), InputRows { rows: x.rows, n_in: x.n_in, data: &x.data })).collect();
    let gram = FactorStack::new(&refs).output_gram(&rows);

    // Dense: y_a = X (scale_a B_a A_a)ᵀ per target, G[a][b] = Σ <y_a, y_b>.
    let outputs: Vec<BTreeMap<&str, Vec<f64>>> = adapters
        .iter()
        .map(|a| {
            a.targets
                .iter()
                .map(|(name, t)| {
                    let (x, dense, s) = (&inputs[name], t.dense_ba(), a.scale(t) as f64);
                    let y: Vec<f64> = (0..x.rows)
                        .flat_map(|r| {
                            let row = &x.data[r * x.n_in..(r + 1) * x.n_in];
                            let dense = &dense;
                            (0..t.n_out).map(move |o| {
                                s * row.iter().zip(&dense[o * t.n_in..(o + 1) * t.n_in]).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>()
                            })
                        })
                        .collect();
                    (name.as_str(), y)
                })
                .collect()
        })
        .collect();
    for a in 0..3 {
        for b in 0..3 {
            let dense: f64 = outputs[a].iter().map(|(name, ya)| ya.iter().zip(&outputs[b][name]).map(|(p, q)| p * q).sum::<f64>()).sum();
            let got = gram[a * 3 + b];
            assert!((got - dense).abs() <= 1e-3 * dense.abs().max(1e-9), "G[{a}][{b}]: factors give {got}, dense {dense}");
        }
    }
    assert!(gram[0] > 0.0 && gram[4] > 0.0 && gram[8] > 0.0);
}
