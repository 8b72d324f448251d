//! Invariants of the merge operators and the similarity on random adapters (proptest): random
//! numbers of adapters, targets, shapes, ranks, alphas, weights and which adapter has which
//! target. Everything is compared in delta space (`scale * B A`, dense, f64), the only space
//! where two factorisations of one update can be told equal.

use std::collections::BTreeMap;

use d2c_gguf::adapter::{LoraAdapter, LoraTarget};
use d2c_gguf::merge::{self, MergeOptions, Method};
use d2c_gguf::similarity;
use d2c_gguf::synth;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// What one random adapter looks like: per target a rank or absent, and its alpha.
#[derive(Debug, Clone)]
struct AdapterSpec {
    ranks: Vec<Option<usize>>,
    alpha: f32,
}

#[derive(Debug, Clone)]
struct Scenario {
    /// (n_out, n_in) of each target.
    shapes: Vec<(usize, usize)>,
    adapters: Vec<AdapterSpec>,
    seed: u64,
}

fn target_name(i: usize) -> String {
    format!("blk.{i}.attn_q.weight")
}

impl Scenario {
    fn build(&self) -> Vec<LoraAdapter> {
        let mut rng = synth::rng(self.seed);
        self.adapters
            .iter()
            .map(|spec| {
                let mut a = LoraAdapter::new("llama", spec.alpha);
                for (i, (&(n_out, n_in), rank)) in self.shapes.iter().zip(&spec.ranks).enumerate() {
                    let Some(rank) = *rank else { continue };
                    let fa = synth::matrix(&mut rng, rank, n_in, 1.0 / (n_in as f32).sqrt());
                    let fb = synth::matrix(&mut rng, n_out, rank, 0.1);
                    a.targets.insert(target_name(i), LoraTarget::new(fa, fb, rank, n_in, n_out));
                }
                if a.targets.is_empty() {
                    // Every adapter adapts something: give it the first target at rank 1.
                    let (n_out, n_in) = self.shapes[0];
                    let fa = synth::matrix(&mut rng, 1, n_in, 1.0 / (n_in as f32).sqrt());
                    let fb = synth::matrix(&mut rng, n_out, 1, 0.1);
                    a.targets.insert(target_name(0), LoraTarget::new(fa, fb, 1, n_in, n_out));
                }
                a
            })
            .collect()
    }
}

fn scenario(adapters: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Scenario> {
    (prop::collection::vec((1usize..=12, 1usize..=12), 1..=3), adapters, any::<u64>()).prop_flat_map(|(shapes, n, seed)| {
        let spec = (prop::collection::vec(prop::option::weighted(0.8, 1usize..=4), shapes.len()), prop_oneof![Just(0.0f32), 0.5f32..32.0])
            .prop_map(|(ranks, alpha)| AdapterSpec { ranks, alpha });
        (Just(shapes), prop::collection::vec(spec, n), Just(seed)).prop_map(|(shapes, adapters, seed)| Scenario { shapes, adapters, seed })
    })
}

/// `scale * B A` of every target, dense row-major f64.
fn deltas(a: &LoraAdapter) -> BTreeMap<String, Vec<f64>> {
    a.targets
        .iter()
        .map(|(name, t)| {
            let s = a.scale(t) as f64;
            let mut d = vec![0f64; t.n_out * t.n_in];
            for o in 0..t.n_out {
                for k in 0..t.rank {
                    let bk = s * t.b[o * t.rank + k] as f64;
                    for i in 0..t.n_in {
                        d[o * t.n_in + i] += bk * t.a[k * t.n_in + i] as f64;
                    }
                }
            }
            (name.clone(), d)
        })
        .collect()
}

/// `|scale| |B| |A|` of every target: how large the terms are that the factor route adds up
/// (in f32 Gram products), which bounds its rounding error where they cancel.
fn abs_deltas(a: &LoraAdapter) -> BTreeMap<String, Vec<f64>> {
    let mut abs = a.clone();
    for t in abs.targets.values_mut() {
        t.a.iter_mut().for_each(|v| *v = v.abs());
        t.b.iter_mut().for_each(|v| *v = v.abs());
    }
    abs.alpha = abs.alpha.abs();
    deltas(&abs)
}

fn dot(x: &BTreeMap<String, Vec<f64>>, y: &BTreeMap<String, Vec<f64>>) -> f64 {
    x.iter().filter_map(|(name, u)| y.get(name).map(|v| u.iter().zip(v).map(|(a, b)| a * b).sum::<f64>())).sum()
}

/// How far the library's cosine of adapters i and j may be from the exact one: f32 rounding
/// (1e-6, a generous multiple of f32 epsilon) of the terms the inner product and both norms add
/// up, relative to the results.
fn cosine_tolerance(inputs: &[LoraAdapter], i: usize, j: usize, cos: f64) -> f64 {
    let (di, dj) = (deltas(&inputs[i]), deltas(&inputs[j]));
    let (ai, aj) = (abs_deltas(&inputs[i]), abs_deltas(&inputs[j]));
    let (ni2, nj2) = (dot(&di, &di), dot(&dj, &dj));
    1e-6 * (dot(&ai, &aj) / (ni2 * nj2).sqrt() + cos.abs() * (dot(&ai, &ai) / ni2 + dot(&aj, &aj) / nj2)) + 1e-9
}

fn frob(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Greatest Frobenius distance between two sets of deltas over every target (a target missing
/// on one side must be missing on the other), relative to `scale[target]`: the size of the
/// terms that were added up, so that a sum that cancels out does not turn rounding into error.
fn max_rel_diff(x: &BTreeMap<String, Vec<f64>>, y: &BTreeMap<String, Vec<f64>>, scale: &BTreeMap<String, f64>) -> Result<f64, TestCaseError> {
    prop_assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (name, dx) in x {
        let diff: Vec<f64> = dx.iter().zip(&y[name]).map(|(a, b)| a - b).collect();
        worst = worst.max(frob(&diff) / scale[name].max(1e-12));
    }
    Ok(worst)
}

/// Per target, `sum_i |w_i| || |s_i| |B_i| |A_i| ||_F`.
fn term_scale(inputs: &[LoraAdapter], weights: &[f32]) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (a, w) in inputs.iter().zip(weights) {
        for (name, d) in abs_deltas(a) {
            *out.entry(name).or_insert(0.0) += w.abs() as f64 * frob(&d);
        }
    }
    out
}

/// The weighted sum of the inputs' deltas (the reference of cat and full-rank svd).
fn weighted_sum(inputs: &[LoraAdapter], weights: &[f32]) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (a, &w) in inputs.iter().zip(weights) {
        for (name, d) in deltas(a) {
            let e = out.entry(name).or_insert_with(|| vec![0.0; d.len()]);
            e.iter_mut().zip(d).for_each(|(s, v)| *s += w as f64 * v);
        }
    }
    out
}

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config(256))]

    /// At rank >= the sum of the input ranks nothing has to be dropped, so svd is exact: it
    /// equals cat, which is the weighted sum by construction, and both equal the reference.
    #[test]
    fn svd_at_full_rank_equals_cat(s in scenario(1..=4), weight_seed in any::<u64>()) {
        let inputs = s.build();
        let refs: Vec<&LoraAdapter> = inputs.iter().collect();
        let mut rng = synth::rng(weight_seed);
        let weights: Vec<f32> = (0..inputs.len()).map(|_| 0.25 + synth::normal(&mut rng).abs()).collect();
        let full: usize = inputs.iter().map(LoraAdapter::max_rank).sum();
        let opts = |method, rank| MergeOptions { method, rank, weights: Some(weights.clone()), ..MergeOptions::default() };
        let cat = merge::merge(&refs, &opts(Method::Cat, None)).unwrap();
        let reference = weighted_sum(&inputs, &weights);
        let scale = term_scale(&inputs, &weights);
        prop_assert!(max_rel_diff(&deltas(&cat), &reference, &scale)? < 1e-5);
        for extra in [0, 3] {
            let svd = merge::merge(&refs, &opts(Method::Svd, Some(full + extra))).unwrap();
            let err = max_rel_diff(&deltas(&svd), &deltas(&cat), &scale)?;
            prop_assert!(err < 1e-4, "svd at rank {} vs cat: relative error {err}", full + extra);
            // Exact never needs more rank than cat has.
            for (name, t) in &svd.targets {
                prop_assert!(t.rank <= cat.targets[name].rank, "{name}: svd rank {} > cat rank {}", t.rank, cat.targets[name].rank);
            }
        }
    }

    /// Merging a single adapter (weight 1) gives it back in delta space, for every operator
    /// (ties and dare at density 1, where they keep every entry; svd, ties and dare at the
    /// adapter's own rank).
    #[test]
    fn merging_one_adapter_is_itself(s in scenario(1..=1), seed in any::<u64>()) {
        let input = s.build().remove(0);
        let want = deltas(&input);
        let scale = term_scale(std::slice::from_ref(&input), &[1.0]);
        for method in Method::FROM_WEIGHTS {
            let opts = MergeOptions { method, rank: None, weights: None, density: 1.0, seed };
            let merged = merge::merge(&[&input], &opts).unwrap();
            let err = max_rel_diff(&deltas(&merged), &want, &scale)?;
            let tol = if matches!(method, Method::Cat | Method::Linear) { 1e-5 } else { 1e-4 };
            prop_assert!(err < tol, "{method}: relative error {err}");
        }
    }

    /// Cosine similarity: symmetric, unit diagonal, within [-1, 1], and equal to the cosine of
    /// the dense deltas (shared targets in the inner product, all targets in the norms).
    #[test]
    fn similarity_is_a_symmetric_cosine(s in scenario(1..=5)) {
        let inputs = s.build();
        let refs: Vec<&LoraAdapter> = inputs.iter().collect();
        let m = similarity::similarity_matrix(&refs);
        let dense: Vec<_> = inputs.iter().map(deltas).collect();
        let norm = |d: &BTreeMap<String, Vec<f64>>| d.values().map(|v| frob(v).powi(2)).sum::<f64>().sqrt();
        prop_assert_eq!(m.len(), inputs.len());
        for i in 0..inputs.len() {
            prop_assert_eq!(m[i].len(), inputs.len());
            prop_assert_eq!(m[i][i], 1.0);
            for j in 0..inputs.len() {
                prop_assert_eq!(m[i][j], m[j][i]);
                prop_assert!((-1.0..=1.0).contains(&m[i][j]), "{}", m[i][j]);
                if i != j {
                    let cos = dot(&dense[i], &dense[j]) / (norm(&dense[i]) * norm(&dense[j]));
                    // The factor route forms its r x r Gram products in f32: where the rank-one
                    // terms of a delta nearly cancel (tiny targets, rank > size) it is ~1e-6 off.
                    let tol = cosine_tolerance(&inputs, i, j, cos);
                    prop_assert!((m[i][j] - cos).abs() < tol, "({i},{j}): {} vs dense {cos} (tolerance {tol})", m[i][j]);
                }
            }
        }
    }

    /// Scaling an adapter's delta (through B or through alpha) changes no similarity; a
    /// negative factor flips the signs of its row.
    #[test]
    fn scaling_an_adapter_keeps_its_similarities(s in scenario(2..=4), factor in 0.01f32..100.0, negative in any::<bool>(), which in any::<prop::sample::Index>()) {
        let inputs = s.build();
        let k = which.index(inputs.len());
        let sign = if negative { -1.0 } else { 1.0 };
        let refs: Vec<&LoraAdapter> = inputs.iter().collect();
        let before = similarity::similarity_matrix(&refs);

        let mut through_b = inputs.clone();
        through_b[k].targets.values_mut().for_each(|t| t.b.iter_mut().for_each(|v| *v *= sign * factor));
        let mut through_alpha = inputs.clone();
        through_alpha[k].alpha = if inputs[k].alpha == 0.0 { 0.0 } else { inputs[k].alpha * factor };
        for (scaled, flip) in [(through_b, sign as f64), (through_alpha, 1.0)] {
            let refs: Vec<&LoraAdapter> = scaled.iter().collect();
            let after = similarity::similarity_matrix(&refs);
            for j in 0..inputs.len() {
                if j == k {
                    continue;
                }
                let want = flip * before[k][j];
                // Both sides carry the factor route's f32 rounding.
                let tol = 2.0 * cosine_tolerance(&inputs, k, j, want);
                prop_assert!((after[k][j] - want).abs() < tol, "({k},{j}): {} vs {want} (tolerance {tol})", after[k][j]);
                prop_assert!((after[j][k] - want).abs() < tol);
            }
        }
    }
}
