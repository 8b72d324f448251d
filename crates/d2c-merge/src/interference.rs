//! Interference measured from activations: how each adapter's delta acts on each task's inputs.
//!
//! For task `m`, with `X` the inputs its examples give a projection (one row per scored
//! position, captured from the base model), every adapter `a` changes that projection's output
//! by `X Δ_aᵀ`. The task's output Gram `G_m[a][b] = Σ_targets <X Δ_aᵀ, X Δ_bᵀ>_F` holds all that
//! matters to a merge that averages deltas: the merged delta of a cluster `C` is
//! `Σ_{a∈C} Δ_a / |C|`, so its error on task m relative to m's own delta is
//! `(w - e_m)ᵀ G_m (w - e_m) / G_m[m][m]` with `w = 1_C / |C|`, exactly for a linear merge and as
//! a model of the rank-limited ones. Built in factor space (`X Aᵀ` is rows x r, `Bᵀ B` is r x r),
//! never forming a dense delta.

use std::collections::BTreeMap;

use faer::{Mat, Par};
use rayon::prelude::*;

use d2c_format::adapter::LoraAdapter;

use crate::linalg::{gram, mul, view_t};

/// One projection's inputs on a task's examples: `rows` x `n_in`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct InputRows<'a> {
    pub rows: usize,
    pub n_in: usize,
    pub data: &'a [f32],
}

/// Every adapter's factors per target, stacked so that one product per target gives a task's
/// whole output Gram.
pub struct FactorStack {
    n: usize,
    targets: BTreeMap<String, TargetStack>,
}

struct TargetStack {
    n_in: usize,
    /// `R x n_in`, row-major, `R` = the ranks summed: each adapter's A times its LoRA scale.
    a: Vec<f32>,
    /// (adapter, first row in `a`, rank), for the adapters that have this target.
    blocks: Vec<(usize, usize, usize)>,
    /// `R x R`: the inner products of the adapters' B columns.
    btb: Mat<f32>,
}

impl FactorStack {
    pub fn new(adapters: &[&LoraAdapter]) -> Self {
        let mut names: Vec<&String> = adapters.iter().flat_map(|a| a.targets.keys()).collect();
        names.sort();
        names.dedup();
        let targets = names
            .into_par_iter()
            .map(|name| {
                let mut blocks = Vec::new();
                let mut rows = 0;
                for (ai, a) in adapters.iter().enumerate() {
                    if let Some(t) = a.targets.get(name) {
                        blocks.push((ai, rows, t.rank));
                        rows += t.rank;
                    }
                }
                let first = &adapters[blocks[0].0].targets[name];
                let (n_in, n_out) = (first.n_in, first.n_out);
                let mut a_rows = Vec::with_capacity(rows * n_in);
                let mut b = Mat::<f32>::zeros(n_out, rows);
                for &(ai, row0, rank) in &blocks {
                    let t = &adapters[ai].targets[name];
                    let scale = adapters[ai].scale(t);
                    a_rows.extend(t.a.iter().map(|v| v * scale));
                    for o in 0..n_out {
                        for k in 0..rank {
                            b[(o, row0 + k)] = t.b[o * rank + k];
                        }
                    }
                }
                let btb = gram(b.as_ref(), Par::Seq);
                (name.clone(), TargetStack { n_in, a: a_rows, blocks, btb })
            })
            .collect();
        FactorStack { n: adapters.len(), targets }
    }

    /// `G[a][b]` (n x n, row-major) for one task from the inputs its examples give each target
    /// (targets without inputs add nothing).
    pub fn output_gram(&self, inputs: &BTreeMap<String, InputRows<'_>>) -> Vec<f64> {
        let n = self.n;
        self.targets
            .par_iter()
            .filter_map(|(name, t)| inputs.get(name).map(|x| (t, x)))
            .map(|(t, x)| {
                assert_eq!(x.n_in, t.n_in, "inputs and adapters disagree on a projection's width");
                let total_rank = t.a.len() / t.n_in;
                // U = X Aᵀ (rows x R); M = Uᵀ U; G[a][b] = Σ M ∘ BᵀB over a's and b's blocks.
                let u = mul(view_t(x.data, x.rows, x.n_in).transpose(), view_t(&t.a, total_rank, t.n_in), Par::Seq);
                let m = gram(u.as_ref(), Par::Seq);
                let mut g = vec![0f64; n * n];
                for &(a, ra, ka) in &t.blocks {
                    for &(b, rb, kb) in &t.blocks {
                        let mut sum = 0f64;
                        for k in ra..ra + ka {
                            for l in rb..rb + kb {
                                sum += (m[(k, l)] * t.btb[(k, l)]) as f64;
                            }
                        }
                        g[a * n + b] += sum;
                    }
                }
                g
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Summed in target order, not in rayon's split order: the same inputs give the
            // same bits, so a rerun polishes the same start.
            .fold(vec![0f64; n * n], |mut total, g| {
                total.iter_mut().zip(g).for_each(|(x, y)| *x += y);
                total
            })
    }
}

/// Every task's output Gram: the activation model of what merging does to each task.
#[derive(Debug, Clone)]
pub struct Interference {
    n: usize,
    /// Per task, its n x n Gram, row-major.
    grams: Vec<Vec<f64>>,
}

impl Interference {
    pub fn new(grams: Vec<Vec<f64>>) -> Self {
        let n = grams.len();
        assert!(grams.iter().all(|g| g.len() == n * n), "one n x n Gram per task");
        Interference { n, grams }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// `||X Δ_task ᵀ||²`: how much the task's own adapter changes its outputs.
    pub fn own_energy(&self, task: usize) -> f64 {
        self.grams[task][task * self.n + task]
    }

    /// Task `task`'s error under the average of `members`' deltas, relative to its own delta's
    /// effect (0: the merge acts on its inputs as its own adapter does; 1: as the base does).
    pub fn relative_error(&self, task: usize, members: &[usize]) -> f64 {
        let (n, g) = (self.n, &self.grams[task]);
        let own = g[task * n + task];
        if own <= 0.0 || members.is_empty() {
            return 0.0;
        }
        let w = 1.0 / members.len() as f64;
        // d = w·1_members - e_task, so dᵀGd expands over the members and the task.
        let mut quad = own;
        for &a in members {
            quad -= 2.0 * w * g[a * n + task];
            for &b in members {
                quad += w * w * g[a * n + b];
            }
        }
        quad.max(0.0) / own
    }

    /// `I[i][j]`: task i's relative error when merged with task j alone.
    pub fn pairwise(&self) -> Vec<Vec<f64>> {
        (0..self.n).map(|i| (0..self.n).map(|j| if i == j { 0.0 } else { self.relative_error(i, &[i, j]) }).collect()).collect()
    }

    /// The members' errors summed, each under the cluster's merge.
    fn cluster_error(&self, members: &[usize]) -> f64 {
        members.iter().map(|&m| self.relative_error(m, members)).sum()
    }

    /// Mean relative error over tasks, each under its cluster's merge.
    pub fn partition_error(&self, assign: &[usize], k: usize) -> f64 {
        crate::cluster::clusters_of(assign, k).iter().map(|c| self.cluster_error(c)).sum::<f64>() / self.n.max(1) as f64
    }

    /// The change of the summed error when `task` moves to cluster `to` (negative: better).
    pub fn move_change(&self, assign: &[usize], task: usize, to: usize) -> f64 {
        let from = assign[task];
        if from == to {
            return 0.0;
        }
        let members = |c: usize| -> Vec<usize> { (0..assign.len()).filter(|&i| assign[i] == c).collect() };
        let (old_from, old_to) = (members(from), members(to));
        let new_from: Vec<usize> = old_from.iter().copied().filter(|&i| i != task).collect();
        let mut new_to = old_to.clone();
        new_to.push(task);
        self.cluster_error(&new_from) + self.cluster_error(&new_to) - self.cluster_error(&old_from) - self.cluster_error(&old_to)
    }

    /// The change of the summed error when tasks `i` and `j` trade clusters.
    pub fn swap_change(&self, assign: &[usize], i: usize, j: usize) -> f64 {
        let (a, b) = (assign[i], assign[j]);
        if a == b {
            return 0.0;
        }
        let members = |c: usize| -> Vec<usize> { (0..assign.len()).filter(|&t| assign[t] == c).collect() };
        let (old_a, old_b) = (members(a), members(b));
        let new_a: Vec<usize> = old_a.iter().map(|&t| if t == i { j } else { t }).collect();
        let new_b: Vec<usize> = old_b.iter().map(|&t| if t == j { i } else { t }).collect();
        self.cluster_error(&new_a) + self.cluster_error(&new_b) - self.cluster_error(&old_a) - self.cluster_error(&old_b)
    }

    /// Best-improvement moves and swaps under the activation model until none helps (no
    /// cluster emptied): a partition that keeps interfering tasks apart, at no scoring cost.
    pub fn local_search(&self, start: &[usize], k: usize) -> Vec<usize> {
        let n = self.n;
        let mut assign = start.to_vec();
        // Each step lowers the error, so this bound is never reached in practice.
        for _ in 0..n * n {
            let mut sizes = vec![0usize; k];
            assign.iter().for_each(|&c| sizes[c] += 1);
            let mut best: Option<(f64, usize, usize, bool)> = None;
            for i in 0..n {
                if sizes[assign[i]] > 1 {
                    for to in (0..k).filter(|&c| c != assign[i]) {
                        let change = self.move_change(&assign, i, to);
                        if change < best.map_or(-1e-12, |b| b.0) {
                            best = Some((change, i, to, false));
                        }
                    }
                }
                for j in i + 1..n {
                    if assign[i] != assign[j] {
                        let change = self.swap_change(&assign, i, j);
                        if change < best.map_or(-1e-12, |b| b.0) {
                            best = Some((change, i, j, true));
                        }
                    }
                }
            }
            match best {
                Some((_, i, j, true)) => assign.swap(i, j),
                Some((_, i, to, false)) => assign[i] = to,
                None => break,
            }
        }
        assign
    }
}

/// Spearman's rank correlation (ties get their mean rank); NaN for fewer than two pairs or a
/// constant side.
pub fn spearman(xs: &[f64], ys: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for &t in &idx[i..=j] {
                r[t] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    assert_eq!(xs.len(), ys.len());
    if xs.len() < 2 {
        return f64::NAN;
    }
    let (rx, ry) = (ranks(xs), ranks(ys));
    let mean = (xs.len() - 1) as f64 / 2.0;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mean) * (b - mean);
        sxx += (a - mean) * (a - mean);
        syy += (b - mean) * (b - mean);
    }
    sxy / (sxx * syy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use d2c_format::adapter::LoraTarget;
    use d2c_format::synth;
    use rand::Rng;

    fn random_adapter(rng: &mut impl Rng, rank: usize, shapes: &[(&str, usize, usize)]) -> LoraAdapter {
        let mut a = LoraAdapter::new("llama", 2.0 * rank as f32);
        for &(name, n_in, n_out) in shapes {
            let fa: Vec<f32> = (0..rank * n_in).map(|_| rng.random::<f32>() - 0.5).collect();
            let fb: Vec<f32> = (0..n_out * rank).map(|_| rng.random::<f32>() - 0.5).collect();
            a.targets.insert(name.to_string(), LoraTarget::new(fa, fb, rank, n_in, n_out));
        }
        a
    }

    /// `X Δᵀ` densely: rows x n_out.
    fn dense_outputs(adapter: &LoraAdapter, name: &str, x: &[f32], rows: usize) -> Vec<f64> {
        let t = &adapter.targets[name];
        let d = t.dense_ba();
        let s = adapter.scale(t) as f64;
        let mut y = vec![0f64; rows * t.n_out];
        for r in 0..rows {
            for o in 0..t.n_out {
                y[r * t.n_out + o] = s * (0..t.n_in).map(|i| x[r * t.n_in + i] as f64 * d[o * t.n_in + i] as f64).sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn the_output_gram_equals_dense_products_and_predicts_a_linear_merge() {
        let mut rng = synth::rng(3);
        let shapes = [("blk.0.attn_q.weight", 12, 10), ("blk.0.ffn_down.weight", 20, 12)];
        let adapters: Vec<LoraAdapter> = (0..3).map(|i| random_adapter(&mut rng, 2 + i, &shapes)).collect();
        // The third adapter lacks one target: it contributes nothing there.
        let mut adapters = adapters;
        adapters[2].targets.remove("blk.0.ffn_down.weight");
        let refs: Vec<&LoraAdapter> = adapters.iter().collect();
        let rows = 7;
        let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, n_in, _)| (0..rows * n_in).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()).collect();
        let inputs: BTreeMap<String, InputRows<'_>> =
            shapes.iter().zip(&xs).map(|(&(name, n_in, _), x)| (name.to_string(), InputRows { rows, n_in, data: x })).collect();
        let g = FactorStack::new(&refs).output_gram(&inputs);
        let outputs = |a: usize, name: &str, x: &[f32]| -> Vec<f64> {
            if adapters[a].targets.contains_key(name) {
                dense_outputs(&adapters[a], name, x, rows)
            } else {
                vec![0.0; rows * shapes.iter().find(|s| s.0 == name).unwrap().2]
            }
        };
        for a in 0..3 {
            for b in 0..3 {
                let dense: f64 = shapes
                    .iter()
                    .zip(&xs)
                    .map(|(&(name, ..), x)| outputs(a, name, x).iter().zip(outputs(b, name, x)).map(|(p, q)| p * q).sum::<f64>())
                    .sum();
                assert!((g[a * 3 + b] - dense).abs() <= 1e-4 * dense.abs().max(1.0), "G[{a}][{b}] = {} but dense gives {dense}", g[a * 3 + b]);
            }
        }
        // Task 0's error under the average of adapters 0 and 1, against the dense outputs.
        let inter = Interference::new(vec![g.clone(), g.clone(), g]);
        let (mut err, mut own) = (0.0, 0.0);
        for (&(name, ..), x) in shapes.iter().zip(&xs) {
            let (y0, y1) = (outputs(0, name, x), outputs(1, name, x));
            err += y0.iter().zip(&y1).map(|(p, q)| ((p + q) / 2.0 - p).powi(2)).sum::<f64>();
            own += y0.iter().map(|p| p * p).sum::<f64>();
        }
        let model = inter.relative_error(0, &[0, 1]);
        assert!((model - err / own).abs() < 1e-6, "{model} vs {}", err / own);
        assert_eq!(inter.relative_error(0, &[0]), 0.0, "a task alone keeps its own delta");
    }

    #[test]
    fn local_search_separates_tasks_that_interfere() {
        // Tasks 0, 1 share a delta, as do 2, 3; the two pairs act against each other. Built
        // from explicit output vectors: y_a on every task's inputs.
        let y = [[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, -0.1]];
        let gram: Vec<f64> = (0..4).flat_map(|a| (0..4).map(move |b| y[a][0] * y[b][0] + y[a][1] * y[b][1])).collect();
        let inter = Interference::new(vec![gram; 4]);
        let mixed = vec![0, 1, 0, 1];
        let found = inter.local_search(&mixed, 2);
        assert_eq!(found[0], found[1]);
        assert_eq!(found[2], found[3]);
        assert_ne!(found[0], found[2]);
        assert!(inter.partition_error(&found, 2) < 0.01 && inter.partition_error(&mixed, 2) > 0.2);
        let moved = inter.move_change(&mixed, 2, 1);
        let mut after = mixed.clone();
        after[2] = 1;
        let exact = (inter.partition_error(&after, 2) - inter.partition_error(&mixed, 2)) * 4.0;
        assert!((moved - exact).abs() < 1e-12);
        assert!(inter.pairwise()[0][2] > inter.pairwise()[0][1]);
    }

    #[test]
    fn spearman_ranks() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert!(spearman(&[1.0], &[1.0]).is_nan());
        assert!((spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]) - 0.866_025_403_784_438_6).abs() < 1e-9);
    }
}
