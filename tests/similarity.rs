//! Cosine similarity of adapters' deltas from the factors, against dense deltas computed here.

mod common;

use d2c_gguf::adapter::{DType, LoraAdapter, LoraTarget};
use d2c_gguf::similarity::{self, similarity_matrix};
use d2c_gguf::synth;

fn adapter(alpha: f32, targets: &[(&str, usize, usize, usize)], seed: u64) -> LoraAdapter {
    let mut rng = synth::rng(seed);
    let mut a = LoraAdapter::new("llama", alpha);
    for &(name, n_out, n_in, rank) in targets {
        let fa = synth::matrix(&mut rng, rank, n_in, 1.0 / (n_in as f32).sqrt());
        let fb = synth::matrix(&mut rng, n_out, rank, 0.1);
        a.targets.insert(name.to_string(), LoraTarget::new(fa, fb, rank, n_in, n_out));
    }
    a
}

/// The whole delta of an adapter as one vector over `names` (zeros where it lacks a target).
fn flat_delta(a: &LoraAdapter, names: &[(&str, usize, usize)]) -> Vec<f64> {
    let mut v = Vec::new();
    for &(name, n_out, n_in) in names {
        match a.targets.get(name) {
            Some(t) => {
                let s = a.scale(t) as f64;
                for o in 0..n_out {
                    for i in 0..n_in {
                        let x: f64 = (0..t.rank).map(|k| t.b[o * t.rank + k] as f64 * t.a[k * n_in + i] as f64).sum();
                        v.push(s * x);
                    }
                }
            }
            None => v.extend(std::iter::repeat_n(0.0, n_out * n_in)),
        }
    }
    v
}

fn cosine(x: &[f64], y: &[f64]) -> f64 {
    let dot: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    let nx: f64 = x.iter().map(|a| a * a).sum::<f64>().sqrt();
    let ny: f64 = y.iter().map(|a| a * a).sum::<f64>().sqrt();
    dot / (nx * ny)
}

const NAMES: [(&str, usize, usize); 3] = [("blk.0.attn_q.weight", 48, 40), ("blk.0.ffn_up.weight", 96, 40), ("blk.1.attn_q.weight", 48, 40)];

/// Adapters with different ranks, alphas and target sets, some correlated (shared factors).
fn inputs() -> Vec<LoraAdapter> {
    let all = |r: usize| NAMES.map(|(n, o, i)| (n, o, i, r));
    let mut v = vec![
        adapter(16.0, &all(4), 1),
        adapter(0.0, &all(8), 2),
        adapter(6.0, &all(6)[..2], 3), // lacks blk.1.attn_q
    ];
    // Correlated with the first: its factors plus a little of the second's.
    let mut c = v[0].clone();
    for (name, t) in c.targets.iter_mut() {
        let other = &v[1].targets[name];
        for (x, y) in t.b.iter_mut().zip(&other.b) {
            *x += 0.3 * y;
        }
    }
    c.alpha = 3.0;
    v.push(c);
    // Negated copy of the second: similarity -1 with it.
    let mut neg = v[1].clone();
    neg.targets.values_mut().for_each(|t| t.b.iter_mut().for_each(|x| *x = -*x));
    v.push(neg);
    v
}

#[test]
fn similarity_equals_dense_cosine() {
    let inputs = inputs();
    let refs: Vec<&LoraAdapter> = inputs.iter().collect();
    let m = similarity_matrix(&refs);
    let flats: Vec<Vec<f64>> = inputs.iter().map(|a| flat_delta(a, &NAMES)).collect();
    let n = inputs.len();
    assert_eq!(m.len(), n);
    for i in 0..n {
        assert_eq!(m[i].len(), n);
        assert_eq!(m[i][i], 1.0);
        for j in 0..n {
            let want = cosine(&flats[i], &flats[j]);
            assert!((m[i][j] - want).abs() < 1e-5, "[{i}][{j}] {} vs dense {want}", m[i][j]);
            assert_eq!(m[i][j], m[j][i]);
        }
    }
    // Sanity of the fixture: a strongly correlated pair and an exact negation.
    assert!(m[0][3] > 0.8, "{}", m[0][3]);
    assert!((m[1][4] + 1.0).abs() < 1e-6);
    // The inner product itself, not only the cosine.
    let dot: f64 = flats[0].iter().zip(&flats[2]).map(|(a, b)| a * b).sum();
    assert!((similarity::inner(&inputs[0], &inputs[2]) - dot).abs() < 1e-5 * dot.abs().max(1e-3));
}

#[test]
fn scale_does_not_change_similarity_but_alpha_counts_per_target() {
    // Doubling alpha doubles the delta: cosine unchanged.
    let a = adapter(8.0, &NAMES.map(|(n, o, i)| (n, o, i, 4)), 1);
    let mut b = a.clone();
    b.alpha = 16.0;
    let m = similarity_matrix(&[&a, &b]);
    assert!((m[0][1] - 1.0).abs() < 1e-6);
    // A zero adapter is orthogonal to everything (and still has a unit diagonal).
    let mut z = a.clone();
    z.targets.values_mut().for_each(|t| t.b.iter_mut().for_each(|x| *x = 0.0));
    let m = similarity_matrix(&[&a, &z]);
    assert_eq!(m, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
}

#[test]
fn mismatched_inputs_are_reported() {
    let a = adapter(8.0, &[("blk.0.attn_q.weight", 16, 8, 2)], 1);
    let b = adapter(8.0, &[("blk.0.attn_q.weight", 8, 16, 2)], 2);
    let e = similarity::check_compatible(&[&a, &b]).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("8 x 16"), "{e}");
}

#[test]
fn cli_similarity_json() {
    let inputs = inputs();
    let dir = common::tempdir();
    let files: Vec<std::path::PathBuf> = inputs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let p = dir.path().join(format!("a{i}.gguf"));
            a.write(&p, DType::F32, &[]).unwrap();
            p
        })
        .collect();
    let mut args = vec!["similarity", "--json"];
    args.extend(files.iter().map(|p| common::path_str(p)));
    let (code, out, err) = common::run_cli(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got_files: Vec<&str> = v["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(got_files, files.iter().map(|p| common::path_str(p)).collect::<Vec<_>>());
    let refs: Vec<&LoraAdapter> = inputs.iter().collect();
    let want = similarity_matrix(&refs);
    let matrix = v["matrix"].as_array().unwrap();
    assert_eq!(matrix.len(), inputs.len());
    for (row, want_row) in matrix.iter().zip(&want) {
        let row: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(row.len(), want_row.len());
        for (g, w) in row.iter().zip(want_row) {
            assert!((g - w).abs() < 1e-12);
        }
    }
    // Plain table, and a clear error for a file that is not an adapter.
    let (code, out, _) = common::run_cli(&["similarity", common::path_str(&files[0]), common::path_str(&files[1])]);
    assert_eq!(code, 0);
    assert!(out.contains("[1]") && out.contains("1.0000"), "{out}");
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"not a gguf").unwrap();
    let (code, _, err) = common::run_cli(&["similarity", common::path_str(&files[0]), common::path_str(&bogus)]);
    assert_ne!(code, 0);
    assert!(err.contains("bogus.gguf"), "{err}");
}
