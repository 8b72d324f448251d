//! Merge speed: `svd` merge of 8 rank-16 adapters over all 7 projections, on SmolLM2's shapes
//! and on a 1B-class shape; and `regmean` of the same 8 on SmolLM2's shapes, with each task's
//! input rows shared by the projections that read them (as `merge` captures them: q/k/v, and
//! gate/up) against one copy per projection (every Gram and Cholesky made per target).
//! Not a timed test: it prints what it measures.
//!
//!   cargo bench --bench merge                 our svd merges on both shapes, then regmean
//!   merge gen smollm2|1b DIR [--layers N]     write the 8 inputs (DIR/input_K.gguf, f32)
//!   merge error DIR MERGED.gguf               relative error of MERGED against the average of
//!                                             DIR's inputs, and the optimal (Eckart-Young) one
//!
//! `scripts/bench-merge.sh` uses `gen` and `error` to compare the CLI against PEFT's
//! `add_weighted_adapter(combination_type="svd")` and a dense numpy SVD on the same inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use d2c_gguf::adapter::{DType, LoraAdapter, LoraTarget};
use d2c_gguf::base::BaseModel;
use d2c_gguf::linalg::{factor_inner, factor_norm2};
use d2c_gguf::merge::{self, MergeOptions, Method};
use d2c_gguf::synth;

const N_INPUTS: usize = 8;
const RANK: usize = 16;
const ALPHA: f32 = 32.0;

/// The 8 inputs of one configuration.
fn inputs(config: &str, layers: Option<usize>) -> Vec<LoraAdapter> {
    let modules: Vec<&str> = synth::ATTENTION.iter().chain(synth::MLP.iter()).copied().collect();
    match config {
        "smollm2" => {
            let path = d2c_test_assets::base_model();
            let base = BaseModel::open(&path).unwrap_or_else(|e| panic!("{e} (run scripts/setup.sh)"));
            (0..N_INPUTS as u64)
                .map(|seed| {
                    let mut a = synth::random_adapter(&base, &modules, RANK, ALPHA, 0.01, seed).unwrap();
                    if let Some(l) = layers {
                        a.targets.retain(|name, _| layer_of(name) < l);
                    }
                    a
                })
                .collect()
        }
        "1b" => {
            // hidden 2048, ffn 8192, 8 KV heads x 64 = 512; (out, in) per module.
            let shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)];
            (0..N_INPUTS as u64)
                .map(|seed| {
                    let mut rng = synth::rng(1000 + seed);
                    let mut a = LoraAdapter::new("llama", ALPHA);
                    for layer in 0..layers.unwrap_or(16) {
                        for (m, &(n_out, n_in)) in modules.iter().zip(&shapes) {
                            let fa = synth::matrix(&mut rng, RANK, n_in, 1.0 / (n_in as f32).sqrt());
                            let fb = synth::matrix(&mut rng, n_out, RANK, 0.01);
                            a.targets.insert(format!("blk.{layer}.{m}.weight"), LoraTarget::new(fa, fb, RANK, n_in, n_out));
                        }
                    }
                    a
                })
                .collect()
        }
        other => panic!("unknown configuration {other} (smollm2 or 1b)"),
    }
}

fn layer_of(name: &str) -> usize {
    name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn read_inputs(dir: &Path) -> Vec<LoraAdapter> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("input_") && n.ends_with(".gguf")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no input_*.gguf in {}", dir.display());
    files.iter().map(|f| LoraAdapter::read(f).unwrap()).collect()
}

/// (relative error of `merged`, optimal relative error at `merged`'s rank) against the average
/// of `inputs`, all in factor space (no dense delta).
fn errors(inputs: &[LoraAdapter], merged: &LoraAdapter) -> (f64, f64) {
    let refs: Vec<&LoraAdapter> = inputs.iter().collect();
    let exact = merge::merge(&refs, &MergeOptions { method: Method::Cat, ..Default::default() }).unwrap();
    let (mut ref2, mut err2) = (0f64, 0f64);
    for (name, d) in &exact.targets {
        let dn2 = factor_norm2(&d.b, &d.a, d.rank, d.n_in, d.n_out) * (exact.scale(d) as f64).powi(2);
        ref2 += dn2;
        err2 += match merged.targets.get(name) {
            Some(m) => {
                let s = merged.scale(m) as f64;
                let mn2 = s * s * factor_norm2(&m.b, &m.a, m.rank, m.n_in, m.n_out);
                let cross = s * exact.scale(d) as f64 * factor_inner(&d.b, &d.a, d.rank, &m.b, &m.a, m.rank, d.n_in, d.n_out);
                (dn2 - 2.0 * cross + mn2).max(0.0)
            }
            None => dn2,
        };
    }
    let rank = merged.max_rank();
    let (_, report) = merge::merge_with_report(&refs, &MergeOptions { rank: Some(rank), ..Default::default() }).unwrap();
    ((err2 / ref2).sqrt(), report.relative_error())
}

fn arg_layers(args: &[String]) -> Option<usize> {
    args.iter().position(|a| a == "--layers").map(|i| args[i + 1].parse().expect("--layers N"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("gen") => {
            let (config, dir) = (&args[1], PathBuf::from(&args[2]));
            std::fs::create_dir_all(&dir).unwrap();
            for (k, a) in inputs(config, arg_layers(&args)).iter().enumerate() {
                a.write(&dir.join(format!("input_{k}.gguf")), DType::F32, &[]).unwrap();
            }
            eprintln!("wrote {N_INPUTS} rank-{RANK} {config} adapters to {}", dir.display());
        }
        Some("error") => {
            let inputs = read_inputs(Path::new(&args[1]));
            let merged = LoraAdapter::read(&args[2]).unwrap();
            let (err, optimal) = errors(&inputs, &merged);
            println!("{{\"relative_error\": {err:.6e}, \"optimal_relative_error\": {optimal:.6e}, \"rank\": {}}}", merged.max_rank());
        }
        None => {
            for config in ["smollm2", "1b"] {
                let inputs = inputs(config, None);
                let refs: Vec<&LoraAdapter> = inputs.iter().collect();
                let bytes: usize = inputs.iter().map(|a| a.n_params() * 4).sum();
                let opts = MergeOptions { rank: Some(RANK), ..Default::default() };
                let t = Instant::now();
                let (merged, report) = merge::merge_with_report(&refs, &opts).unwrap();
                let secs = t.elapsed().as_secs_f64();
                let (err, optimal) = errors(&inputs, &merged);
                println!(
                    "{config:8} svd merge of {N_INPUTS} x rank {RANK} ({} targets, {:.0} MB of f32 factors): {secs:.3} s, \
                     relative error {err:.4e} (reported {:.4e}, optimal {optimal:.4e})",
                    merged.targets.len(),
                    bytes as f64 / 1e6,
                    report.relative_error()
                );
            }
            regmean_sharing();
        }
        Some(other) => panic!("unknown subcommand {other} (gen, error, or none)"),
    }
}

/// Rows per task and input, as `merge` keeps them: 16 positions of each of 10 examples.
const REGMEAN_ROWS: usize = 160;

fn regmean_sharing() {
    for attention_only in [false, true] {
        let mut inputs = inputs("smollm2", None);
        if attention_only {
            // The quality benchmark's adapters: q, k, v and o.
            for a in &mut inputs {
                a.targets.retain(|name, _| name.contains(".attn_"));
            }
        }
        regmean_sharing_on(&inputs, if attention_only { "q/k/v/o only" } else { "all 7 projections" });
    }
}

fn regmean_sharing_on(inputs: &[LoraAdapter], what: &str) {
    use d2c_gguf::interference::InputRows;
    let refs: Vec<&LoraAdapter> = inputs.iter().collect();
    // The tensor each projection reads: q/k/v the attention norm's output, gate/up the FFN
    // norm's; the output and down projections their own.
    let source = |name: &str| -> String {
        let (block, module) = name.rsplit_once('.').unwrap().0.rsplit_once('.').unwrap();
        let shared = match module {
            "attn_q" | "attn_k" | "attn_v" => "attn_in",
            "ffn_gate" | "ffn_up" => "ffn_in",
            m => m,
        };
        format!("{block}.{shared}")
    };
    let mut rng = synth::rng(7);
    // Per task: one buffer per source tensor; and one copy per target.
    let mut shared: Vec<std::collections::BTreeMap<String, Vec<f32>>> = Vec::new();
    for a in inputs {
        let mut by_source = std::collections::BTreeMap::new();
        for (name, t) in &a.targets {
            by_source.entry(source(name)).or_insert_with(|| synth::matrix(&mut rng, REGMEAN_ROWS, t.n_in, 1.0));
        }
        shared.push(by_source);
    }
    let copies: Vec<std::collections::BTreeMap<String, Vec<f32>>> =
        inputs.iter().zip(&shared).map(|(a, s)| a.targets.keys().map(|n| (n.clone(), s[&source(n)].clone())).collect()).collect();
    let opts = MergeOptions { method: Method::Regmean, rank: Some(RANK), ..Default::default() };
    let mut secs = Vec::new();
    for (label, per_task) in [("one copy per projection", &copies), ("rows shared (as merge keeps them)", &shared)] {
        let task_inputs: Vec<merge::TaskInputs> = inputs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.targets
                    .iter()
                    .map(|(n, t)| {
                        // `copies` is keyed by target, `shared` by the tensor read.
                        let data = per_task[i].get(n).unwrap_or_else(|| &per_task[i][&source(n)]);
                        (n.clone(), InputRows { rows: REGMEAN_ROWS, n_in: t.n_in, data: data.as_slice() })
                    })
                    .collect()
            })
            .collect();
        let t = Instant::now();
        let (merged, _) = merge::merge_with_inputs(&refs, &task_inputs.iter().collect::<Vec<_>>(), &opts).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "smollm2  regmean merge of {N_INPUTS} x rank {RANK}, {what}, {REGMEAN_ROWS} rows per task and input, {label}: {s:.3} s ({} targets)",
            merged.targets.len()
        );
        secs.push(s);
    }
    println!("smollm2  regmean, {what}: sharing the rows' Grams is {:.2}x as fast", secs[0] / secs[1]);
}
