//! Each task keeps its own adapter, made smaller: the byte-budget baselines that merging must
//! beat (`merge --strategy truncate` and `--strategy truncate-energy`).
//!
//! Truncation is the truncated SVD of every target's delta (`merge::truncate_target`, computed
//! from the factors: optimal in Frobenius norm at each rank). `truncate` gives every target of
//! every task the same rank, the largest whose files fit the bytes. `truncate-energy` chooses a
//! rank per target (llama.cpp takes one per tensor pair, and a target may be dropped): the
//! singular directions of all tasks compete for the bytes by the share of their task's squared
//! Frobenius norm that they carry, per byte they cost, so that no task is starved because its
//! delta happens to be small in absolute terms.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use rayon::prelude::*;

use crate::merge;
use d2c_format::adapter::{DType, LoraAdapter, LoraTarget};
use d2c_format::error::{Error, Result};

/// Rank per target name; a target absent (or at 0) is dropped.
pub type TargetRanks = BTreeMap<String, usize>;

/// `adapter` with every target cut to its rank in `ranks` (targets at 0 or absent dropped). A
/// target kept at or above its own rank is re-expressed exactly (up to f32 rounding). The
/// scales are folded into `B`; alpha says so (alpha = r when one rank remains, else 0).
pub fn truncate_to(adapter: &LoraAdapter, ranks: &TargetRanks) -> Result<LoraAdapter> {
    let kept: Vec<(&String, &LoraTarget, usize)> =
        adapter.targets.iter().filter_map(|(name, t)| ranks.get(name).copied().filter(|&k| k > 0).map(|k| (name, t, k))).collect();
    let targets = kept
        .par_iter()
        .map(|(name, t, k)| Ok(((*name).clone(), merge::truncate_target(t, adapter.scale(t), *k)?.0)))
        .collect::<Result<BTreeMap<String, LoraTarget>>>()?;
    let mut out = LoraAdapter::new(adapter.architecture.clone(), 0.0);
    out.metadata = adapter.metadata.clone();
    let distinct: std::collections::BTreeSet<usize> = targets.values().map(|t| t.rank).collect();
    if distinct.len() == 1 {
        out.alpha = *distinct.iter().next().unwrap() as f32;
    }
    out.targets = targets;
    Ok(out)
}

/// Every target at `rank` (or its own rank, if lower).
pub fn uniform_ranks(adapter: &LoraAdapter, rank: usize) -> TargetRanks {
    adapter.targets.iter().map(|(name, t)| (name.clone(), rank.min(t.rank))).collect()
}

/// `adapter` with every target cut to `rank`; an adapter already at or below it is returned
/// as it is (not re-expressed), exactly as `merge` ships its own adapters.
pub fn cut_to_rank(adapter: &LoraAdapter, rank: usize) -> Result<LoraAdapter> {
    if adapter.max_rank() <= rank {
        Ok(adapter.clone())
    } else {
        truncate_to(adapter, &uniform_ranks(adapter, rank))
    }
}

/// Squared singular values of every target's delta, non-increasing.
pub fn spectra(adapter: &LoraAdapter) -> Result<BTreeMap<String, Vec<f64>>> {
    adapter.targets.par_iter().map(|(name, t)| Ok((name.clone(), merge::truncate_target(t, adapter.scale(t), 1)?.1))).collect()
}

/// The largest rank `r` such that every adapter with every target cut to `r` fits in
/// `budget_bytes` as written in `dtype`; with the adapters at that rank ([`cut_to_rank`]).
pub fn largest_uniform_rank(adapters: &[&LoraAdapter], dtype: DType, budget_bytes: u64) -> Result<(usize, Vec<LoraAdapter>)> {
    let max_rank = adapters.iter().map(|a| a.max_rank()).max().unwrap_or(0);
    let mut smallest = 0;
    for r in (1..=max_rank).rev() {
        let cut: Vec<LoraAdapter> = adapters.iter().map(|a| cut_to_rank(a, r)).collect::<Result<_>>()?;
        let bytes = total_bytes(&cut, dtype)?;
        if bytes <= budget_bytes {
            return Ok((r, cut));
        }
        smallest = bytes;
    }
    Err(Error::Usage(format!(
        "--budget-bytes {budget_bytes} is too small for --strategy truncate: every adapter at rank 1 takes {smallest} bytes \
         (--strategy truncate-energy can drop targets)"
    )))
}

fn total_bytes(adapters: &[LoraAdapter], dtype: DType) -> Result<u64> {
    adapters.iter().map(|a| a.encoded_bytes(dtype)).sum()
}

/// Bytes one rank-1 component of an `n_out x n_in` target adds in `dtype` (a row of A, a
/// column of B; B's rows are `rank` long, too short for Q8_0 blocks, so they fall back to f16).
fn component_bytes(dtype: DType, n_in: usize, n_out: usize) -> u64 {
    let a = if dtype.fits_row(n_in) { dtype.row_bytes(n_in) } else { 2 * n_in };
    let b = if dtype == DType::F32 { 4 * n_out } else { 2 * n_out };
    (a + b) as u64
}

/// What a target's first component also costs: two tensor infos in the header (name, shape,
/// type, offset) and the alignment padding of two tensors.
fn target_overhead(name: &str) -> u64 {
    2 * (name.len() as u64 + 8 + 4 + 16 + 4 + 8) + 2 * 16
}

/// One candidate singular direction: task `task`'s target `target`, index `index`.
struct Component {
    value_per_byte: f64,
    bytes: u64,
    task: usize,
    target: usize,
    index: usize,
}
impl PartialEq for Component {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Component {}
impl PartialOrd for Component {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Component {
    // Max-heap on value per byte; ties by position, so the choice is deterministic.
    fn cmp(&self, o: &Self) -> Ordering {
        self.value_per_byte
            .total_cmp(&o.value_per_byte)
            .then_with(|| o.task.cmp(&self.task))
            .then_with(|| o.target.cmp(&self.target))
            .then_with(|| o.index.cmp(&self.index))
    }
}

/// Per-target ranks for every adapter under `budget_bytes` in `dtype`, chosen by energy: each
/// singular direction is worth the share of its task's squared norm it carries, and directions
/// are taken best value per byte first (a target's in order, since its values fall). Every task
/// keeps at least its most valuable direction. The estimate is then checked against the real
/// encoded sizes, dropping the last-taken directions until the files fit.
pub fn energy_ranks(adapters: &[&LoraAdapter], dtype: DType, budget_bytes: u64) -> Result<(Vec<TargetRanks>, Vec<LoraAdapter>)> {
    let spectra: Vec<BTreeMap<String, Vec<f64>>> = adapters.iter().map(|a| spectra(a)).collect::<Result<_>>()?;
    // Per task, its targets in name order: (name, spectrum, cost of one component).
    let targets: Vec<Vec<(&String, &Vec<f64>, u64)>> = adapters
        .iter()
        .zip(&spectra)
        .map(|(a, s)| a.targets.iter().map(|(name, t)| (name, &s[name], component_bytes(dtype, t.n_in, t.n_out))).collect())
        .collect();
    let energy: Vec<f64> = spectra.iter().map(|s| s.values().flatten().sum::<f64>().max(f64::MIN_POSITIVE)).collect();
    let component = |task: usize, target: usize, index: usize| -> Option<Component> {
        let (name, spectrum, cost) = targets[task][target];
        let value = *spectrum.get(index)? / energy[task];
        (value > 0.0).then(|| {
            let bytes = cost + if index == 0 { target_overhead(name) } else { 0 };
            Component { value_per_byte: value / bytes as f64, bytes, task, target, index }
        })
    };
    let mut kept: Vec<Vec<usize>> = targets.iter().map(|t| vec![0; t.len()]).collect();
    // Per adapter, the fixed file cost (header, metadata) of one written with nothing in it.
    let empty_bytes: u64 = adapters
        .iter()
        .map(|a| {
            let mut e = LoraAdapter::new(a.architecture.clone(), 0.0);
            e.metadata = a.metadata.clone();
            e.encoded_bytes(dtype)
        })
        .sum::<Result<u64>>()?;
    let mut estimate = empty_bytes;
    let mut taken: Vec<(usize, usize)> = Vec::new();
    let take = |c: &Component, kept: &mut Vec<Vec<usize>>, estimate: &mut u64, taken: &mut Vec<(usize, usize)>| {
        kept[c.task][c.target] = c.index + 1;
        *estimate += c.bytes;
        taken.push((c.task, c.target));
    };
    // Each task's best direction first, whatever it costs.
    let mut heap = BinaryHeap::new();
    for (task, ts) in targets.iter().enumerate() {
        let best = (0..ts.len()).filter_map(|t| component(task, t, 0)).max();
        if let Some(c) = best {
            take(&c, &mut kept, &mut estimate, &mut taken);
        }
        for t in 0..ts.len() {
            let next = kept[task][t];
            if let Some(c) = component(task, t, next) {
                heap.push(c);
            }
        }
    }
    let first_pass = taken.len();
    while let Some(c) = heap.pop() {
        if estimate + c.bytes > budget_bytes {
            continue; // something cheaper (a direction of a smaller target) may still fit
        }
        take(&c, &mut kept, &mut estimate, &mut taken);
        if let Some(n) = component(c.task, c.target, c.index + 1) {
            heap.push(n);
        }
    }
    let ranks_of = |kept: &[Vec<usize>], task: usize| -> TargetRanks {
        targets[task].iter().zip(&kept[task]).map(|((name, _, _), &k)| ((*name).clone(), k)).collect()
    };
    let mut out: Vec<LoraAdapter> = (0..adapters.len()).map(|i| truncate_to(adapters[i], &ranks_of(&kept, i))).collect::<Result<_>>()?;
    let mut sizes: Vec<u64> = out.iter().map(|a| a.encoded_bytes(dtype)).collect::<Result<_>>()?;
    while sizes.iter().sum::<u64>() > budget_bytes {
        if taken.len() <= first_pass {
            return Err(Error::Usage(format!(
                "--budget-bytes {budget_bytes} is too small: one singular direction per task already takes {} bytes",
                sizes.iter().sum::<u64>()
            )));
        }
        let (task, target) = taken.pop().expect("checked above");
        kept[task][target] -= 1;
        out[task] = truncate_to(adapters[task], &ranks_of(&kept, task))?;
        sizes[task] = out[task].encoded_bytes(dtype)?;
    }
    Ok(((0..adapters.len()).map(|i| ranks_of(&kept, i)).collect(), out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg;
    use faer::{Mat, Par};

    /// A random `n_out x n_in` target of rank `r` with a spread of singular values.
    fn target(n_out: usize, n_in: usize, r: usize, seed: u64) -> LoraTarget {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f32> = (0..r * n_in).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..n_out * r).map(|i| (rng.random::<f32>() - 0.5) * (1.0 + (i % r) as f32)).collect();
        LoraTarget::new(a, b, r, n_in, n_out)
    }

    fn adapter(seed: u64) -> LoraAdapter {
        let mut a = LoraAdapter::new("llama", 16.0);
        a.targets.insert("blk.0.attn_q.weight".into(), target(96, 128, 8, seed));
        a.targets.insert("blk.0.attn_v.weight".into(), target(32, 128, 8, seed + 1));
        a.targets.insert("blk.1.attn_q.weight".into(), target(96, 128, 8, seed + 2));
        a
    }

    fn dense(t: &LoraTarget, scale: f32) -> Vec<f64> {
        t.dense_ba().into_iter().map(|v| v as f64 * scale as f64).collect()
    }

    #[test]
    fn truncation_is_the_best_approximation_a_dense_svd_gives() {
        let a = adapter(1);
        for (name, t) in &a.targets {
            let scale = a.scale(t);
            let d = dense(t, scale);
            let m = Mat::from_fn(t.n_out, t.n_in, |i, j| d[i * t.n_in + j]);
            let svd = linalg::thin_svd(m.as_ref(), Par::Seq).unwrap();
            let sigma: Vec<f64> = (0..svd.s.len()).map(|i| svd.s[i]).collect();
            let spectrum = &spectra(&a).unwrap()[name];
            for (l, s) in spectrum.iter().zip(&sigma) {
                assert!((l - s * s).abs() <= 1e-6 * sigma[0] * sigma[0], "{name}: {l} vs {}", s * s);
            }
            for k in 1..=t.rank {
                let cut = truncate_to(&a, &uniform_ranks(&a, k)).unwrap();
                let ct = &cut.targets[name];
                assert_eq!(ct.rank, k);
                let got = dense(ct, cut.scale(ct));
                let err2: f64 = got.iter().zip(&d).map(|(x, y)| (x - y) * (x - y)).sum();
                // Eckart-Young: the best rank-k error is the tail of the singular values.
                let best2: f64 = sigma[k..].iter().map(|s| s * s).sum();
                let total2: f64 = sigma.iter().map(|s| s * s).sum();
                assert!((err2 - best2).abs() <= 1e-5 * total2, "{name} rank {k}: {err2} vs optimal {best2}");
            }
        }
    }

    #[test]
    fn the_largest_uniform_rank_that_fits_is_chosen() {
        let (a, b) = (adapter(3), adapter(5));
        let sizes: Vec<u64> = (1..=8)
            .map(|r| [&a, &b].iter().map(|x| truncate_to(x, &uniform_ranks(x, r)).unwrap().encoded_bytes(DType::F16).unwrap()).sum())
            .collect();
        // Just enough for rank 5, one byte short of rank 6.
        let (r, cut) = largest_uniform_rank(&[&a, &b], DType::F16, sizes[5] - 1).unwrap();
        assert_eq!(r, 5);
        assert!(cut.iter().all(|c| c.max_rank() == 5));
        let (r, cut) = largest_uniform_rank(&[&a, &b], DType::F16, u64::MAX).unwrap();
        assert_eq!((r, &cut[0]), (8, &a), "at its own rank an adapter is kept as it is");
        assert!(largest_uniform_rank(&[&a, &b], DType::F16, sizes[0] - 1).is_err());
    }

    #[test]
    fn energy_ranks_fit_the_bytes_keep_every_task_and_favour_energy() {
        let (a, b) = (adapter(7), adapter(9));
        let full: u64 = [&a, &b].iter().map(|x| x.encoded_bytes(DType::F16).unwrap()).sum();
        for frac in [2, 4, 8, 16, 32] {
            let budget = full / frac;
            let uniform = largest_uniform_rank(&[&a, &b], DType::F16, budget);
            let Ok((ranks, cut)) = energy_ranks(&[&a, &b], DType::F16, budget) else {
                // One direction per task costs less than every target at rank 1.
                assert!(uniform.is_err(), "1/{frac}: uniform rank {:?} fits but energy ranks do not", uniform.map(|u| u.0));
                continue;
            };
            let bytes: u64 = cut.iter().map(|c| c.encoded_bytes(DType::F16).unwrap()).sum();
            assert!(bytes <= budget, "1/{frac}: {bytes} > {budget}");
            for (r, c) in ranks.iter().zip(&cut) {
                assert!(r.values().any(|&k| k > 0) && !c.targets.is_empty(), "1/{frac}: a task lost every direction");
                for (name, t) in &c.targets {
                    assert_eq!(t.rank, r[name]);
                }
            }
            // The kept share of each task's energy is at least what the same bytes at a uniform
            // rank would keep, summed over the tasks.
            let kept = |x: &LoraAdapter, r: &TargetRanks| -> f64 {
                let s = spectra(x).unwrap();
                let total: f64 = s.values().flatten().sum();
                s.iter().map(|(n, v)| v[..r.get(n).copied().unwrap_or(0)].iter().sum::<f64>()).sum::<f64>() / total
            };
            if let Ok((ur, _)) = uniform {
                let uniform: f64 = [&a, &b].iter().map(|x| kept(x, &uniform_ranks(x, ur))).sum();
                let chosen: f64 = [&a, &b].iter().zip(&ranks).map(|(x, r)| kept(x, r)).sum();
                assert!(chosen >= uniform - 1e-9, "1/{frac}: energy {chosen} < uniform {uniform}");
            }
        }
    }
}
