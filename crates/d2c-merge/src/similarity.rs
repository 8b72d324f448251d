//! Cosine similarity of adapters' full weight deltas, over all targets, from the factors alone:
//! `<dW_i, dW_j>_F = s_i s_j trace((B_i^T B_j)(A_j A_i^T))`, two r x r products per shared
//! target; no out x in matrix is ever formed. Pairs are computed in parallel (rayon).

use rayon::prelude::*;

use crate::linalg;
use d2c_format::adapter::LoraAdapter;

pub use crate::merge::{check_compatible, check_compatible_named};

/// `<dW_a, dW_b>_F` summed over the targets both adapters have (with each one's scale).
/// Targets whose shapes differ are skipped (see [`check_compatible`]).
pub fn inner(a: &LoraAdapter, b: &LoraAdapter) -> f64 {
    let mut sum = 0f64;
    for (name, ta) in &a.targets {
        let Some(tb) = b.targets.get(name) else { continue };
        if (ta.n_in, ta.n_out) != (tb.n_in, tb.n_out) {
            continue;
        }
        let s = a.scale(ta) as f64 * b.scale(tb) as f64;
        sum += s * linalg::factor_inner(&ta.b, &ta.a, ta.rank, &tb.b, &tb.a, tb.rank, ta.n_in, ta.n_out);
    }
    sum
}

/// `||dW||_F^2` over all of the adapter's targets.
pub fn norm2(a: &LoraAdapter) -> f64 {
    a.targets
        .values()
        .map(|t| {
            let s = a.scale(t) as f64;
            s * s * linalg::factor_norm2(&t.b, &t.a, t.rank, t.n_in, t.n_out)
        })
        .sum()
}

/// N x N cosine similarities of the adapters' deltas: symmetric, unit diagonal. A target only
/// one of two adapters has counts in its norm but adds nothing to their inner product. An
/// all-zero adapter has similarity 0 with every other.
pub fn similarity_matrix(adapters: &[&LoraAdapter]) -> Vec<Vec<f64>> {
    let n = adapters.len();
    let norms: Vec<f64> = adapters.par_iter().map(|a| norm2(a).max(0.0).sqrt()).collect();
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect();
    let values: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| {
            let d = norms[i] * norms[j];
            if d > 0.0 {
                (inner(adapters[i], adapters[j]) / d).clamp(-1.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    let mut m = vec![vec![0f64; n]; n];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for (&(i, j), v) in pairs.iter().zip(values) {
        m[i][j] = v;
        m[j][i] = v;
    }
    m
}
