//! Initial clusters from weight-space similarity (the "k-means" baseline of the paper, and its
//! opposite, anticlusters), and the other starting points: seeded random partitions and a
//! single cluster.
//!
//! Clusters are `Vec<usize>` task indices; an assignment maps task -> cluster. Every function
//! here returns exactly `k` non-empty clusters (for 1 <= k <= n).

use rand::seq::SliceRandom;
use rand::Rng;

use d2c_format::synth;

/// task -> cluster index.
pub type Assignment = Vec<usize>;

/// Groups of task indices, each sorted, ordered by their smallest member (canonical form, so
/// equal partitions compare equal whatever the cluster numbering).
pub fn clusters_of(assign: &[usize], k: usize) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); k];
    for (task, &c) in assign.iter().enumerate() {
        groups[c].push(task);
    }
    groups.retain(|g| !g.is_empty());
    groups.sort_by_key(|g| g[0]);
    groups
}

/// Renumbers an assignment so clusters are numbered by their smallest task.
pub fn canonical(assign: &[usize], k: usize) -> Assignment {
    let groups = clusters_of(assign, k);
    let mut out = vec![0; assign.len()];
    for (c, g) in groups.iter().enumerate() {
        for &t in g {
            out[t] = c;
        }
    }
    out
}

/// k-medoids on cosine distance (1 - similarity), seeded k-means++ style, then alternate
/// assignment and medoid update until nothing moves. Medoids rather than means because the
/// adapters are only known through their pairwise similarities (no dense deltas are formed).
pub fn kmedoids(similarity: &[Vec<f64>], k: usize, seed: u64) -> Assignment {
    let n = similarity.len();
    assert!(k >= 1 && k <= n, "k must be in 1..=n");
    let dist = |i: usize, j: usize| (1.0 - similarity[i][j]).max(0.0);
    let mut rng = synth::rng(seed);

    let mut medoids = vec![rng.random_range(0..n)];
    while medoids.len() < k {
        let weights: Vec<f64> = (0..n).map(|i| medoids.iter().map(|&m| dist(i, m)).fold(f64::INFINITY, f64::min).powi(2)).collect();
        let total: f64 = weights.iter().sum();
        let next = if total <= 0.0 {
            // All remaining points coincide with a medoid: take any non-medoid.
            (0..n).find(|i| !medoids.contains(i)).expect("k <= n")
        } else {
            let mut x = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, w) in weights.iter().enumerate() {
                if *w > 0.0 && x < *w {
                    pick = i;
                    break;
                }
                x -= w;
            }
            if medoids.contains(&pick) {
                (0..n).filter(|i| !medoids.contains(i)).max_by(|&a, &b| weights[a].total_cmp(&weights[b])).expect("k <= n")
            } else {
                pick
            }
        };
        medoids.push(next);
    }

    let mut assign = vec![0usize; n];
    for _ in 0..100 {
        for (i, slot) in assign.iter_mut().enumerate() {
            *slot = (0..k).min_by(|&a, &b| dist(i, medoids[a]).total_cmp(&dist(i, medoids[b]))).expect("k >= 1");
        }
        // Each medoid is the member that minimises the summed distance to its cluster.
        let mut changed = false;
        for (c, medoid) in medoids.iter_mut().enumerate() {
            let members: Vec<usize> = (0..n).filter(|&i| assign[i] == c).collect();
            if members.is_empty() {
                continue;
            }
            let best = *members
                .iter()
                .min_by(|&&a, &&b| {
                    let da: f64 = members.iter().map(|&m| dist(a, m)).sum();
                    let db: f64 = members.iter().map(|&m| dist(b, m)).sum();
                    da.total_cmp(&db).then(a.cmp(&b))
                })
                .expect("non-empty");
            if best != *medoid {
                *medoid = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // A medoid always belongs to its own cluster (distance 0), so no cluster is empty unless
    // two medoids coincide in distance; repair just in case.
    for (c, &m) in medoids.iter().enumerate() {
        assign[m] = c;
    }
    canonical(&assign, k)
}

/// A uniformly random partition into `k` non-empty clusters of near-equal size.
pub fn random_partition(n: usize, k: usize, seed: u64) -> Assignment {
    assert!(k >= 1 && k <= n, "k must be in 1..=n");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut synth::rng(seed));
    let mut assign = vec![0; n];
    for (pos, &task) in order.iter().enumerate() {
        assign[task] = pos % k;
    }
    canonical(&assign, k)
}

/// Seeded exchange starts behind one anticluster partition (see [`anticluster_optima`]).
pub const ANTICLUSTER_STARTS: u64 = 256;

/// Anticlusters: `k` clusters of near-equal size, each gathering adapters that look unlike
/// one another. Adapters that look alike serve tasks that differ only in their rule (unit
/// conversions, casings, month names in three languages), and those are the pairs a merge
/// breaks (docs/results.md); a partition that keeps them apart is the natural start for the
/// search. The best of [`anticluster_optima`]: the lowest summed similarity of the pairs
/// sharing a cluster that [`ANTICLUSTER_STARTS`] seeded exchanges reach.
pub fn anticlusters(similarity: &[Vec<f64>], k: usize, seed: u64) -> Assignment {
    anticluster_optima(similarity, k, seed).swap_remove(0)
}

/// The distinct local optima of the exchange method (Papenberg & Klau, 2021) from
/// [`ANTICLUSTER_STARTS`] seeded random balanced partitions, the lowest summed within-cluster
/// similarity first. One exchange stops at an optimum that depends on its random start, and
/// its draws depend on the task count: a partition found from one start moves when a task is
/// added or removed (`add`'s gap to a full rerun), while the lowest of many optima moves
/// about half as far (docs/results.md, revision 10). `seed` picks the starts.
pub fn anticluster_optima(similarity: &[Vec<f64>], k: usize, seed: u64) -> Vec<Assignment> {
    use rayon::prelude::*;
    let mut found: Vec<(f64, Assignment)> = (0..ANTICLUSTER_STARTS)
        .into_par_iter()
        .map(|nth| {
            let a = exchange_anticlusters(similarity, k, exchange_seed(seed, nth));
            (within_similarity(similarity, &a), a)
        })
        .collect();
    found.sort_by(|x, y| x.0.total_cmp(&y.0).then_with(|| x.1.cmp(&y.1)));
    found.dedup_by(|x, y| x.1 == y.1);
    found.into_iter().map(|(_, a)| a).collect()
}

/// The seed of the `nth` exchange behind `anticluster_optima(.., seed)`: each seed its own
/// [`ANTICLUSTER_STARTS`] exchanges.
fn exchange_seed(seed: u64, nth: u64) -> u64 {
    seed.wrapping_mul(ANTICLUSTER_STARTS).wrapping_add(nth)
}

/// One exchange from a seeded random balanced partition: task by task, the swap with a task
/// of another cluster that most lowers the summed similarity of the pairs sharing a cluster,
/// until no swap lowers it. Sizes never change, so every cluster stays non-empty.
fn exchange_anticlusters(similarity: &[Vec<f64>], k: usize, seed: u64) -> Assignment {
    let n = similarity.len();
    let mut assign = random_partition(n, k, seed);
    // pull[i][c]: summed similarity of task i to the members of cluster c (itself left out).
    let mut pull = vec![vec![0f64; k]; n];
    for (i, row) in pull.iter_mut().enumerate() {
        for j in (0..n).filter(|&j| j != i) {
            row[assign[j]] += similarity[i][j];
        }
    }
    for _ in 0..100 {
        let mut swapped = false;
        for i in 0..n {
            let a = assign[i];
            // Swapping i (in a) with j (in b): i leaves a's pull for b's without j, j the other way.
            let change = |j: usize| {
                let b = assign[j];
                (pull[i][b] - similarity[i][j]) + (pull[j][a] - similarity[i][j]) - pull[i][a] - pull[j][b]
            };
            let best = (0..n).filter(|&j| assign[j] != a).map(|j| (change(j), j)).min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            let Some((_, j)) = best.filter(|&(d, _)| d < -1e-12) else { continue };
            let b = assign[j];
            for (t, row) in pull.iter_mut().enumerate() {
                if t != i {
                    row[a] -= similarity[t][i];
                    row[b] += similarity[t][i];
                }
                if t != j {
                    row[b] -= similarity[t][j];
                    row[a] += similarity[t][j];
                }
            }
            assign.swap(i, j);
            swapped = true;
        }
        if !swapped {
            break;
        }
    }
    canonical(&assign, k)
}

/// Summed similarity of the pairs of tasks that share a cluster: what [`anticlusters`]
/// lowers (and k-medoids, in effect, raises).
pub fn within_similarity(similarity: &[Vec<f64>], assign: &[usize]) -> f64 {
    let n = assign.len();
    (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).filter(|&(i, j)| assign[i] == assign[j]).map(|(i, j)| similarity[i][j]).sum()
}

/// Moves tasks so that every one of `k` clusters is non-empty: while a cluster is empty, the
/// worst-served task (highest `cost[task]`) of the largest cluster moves into it.
pub fn fill_empty(assign: &mut [usize], k: usize, cost: &[f64]) {
    loop {
        let mut sizes = vec![0usize; k];
        for &c in assign.iter() {
            sizes[c] += 1;
        }
        let Some(empty) = sizes.iter().position(|&s| s == 0) else { return };
        let donor = (0..k).max_by_key(|&c| (sizes[c], std::cmp::Reverse(c))).expect("k >= 1");
        if sizes[donor] < 2 {
            return; // k > n: cannot fill (callers keep k <= n)
        }
        let task =
            (0..assign.len()).filter(|&t| assign[t] == donor).max_by(|&a, &b| cost[a].total_cmp(&cost[b]).then(b.cmp(&a))).expect("donor non-empty");
        assign[task] = empty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_similarity(groups: &[usize]) -> Vec<Vec<f64>> {
        let n = groups.len();
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        if i == j {
                            1.0
                        } else if groups[i] == groups[j] {
                            0.8
                        } else {
                            0.05
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn kmedoids_recovers_blocks() {
        let groups = [0, 1, 2, 0, 1, 2, 0, 1, 2];
        let sim = block_similarity(&groups);
        for seed in 0..10 {
            let a = kmedoids(&sim, 3, seed);
            for i in 0..groups.len() {
                for j in 0..groups.len() {
                    assert_eq!(a[i] == a[j], groups[i] == groups[j], "seed {seed}: {a:?}");
                }
            }
        }
    }

    #[test]
    fn random_partition_is_balanced_and_seeded() {
        let a = random_partition(10, 3, 7);
        let sizes: Vec<usize> = clusters_of(&a, 3).iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 10);
        assert!(sizes.iter().all(|&s| s == 3 || s == 4), "{sizes:?}");
        assert_eq!(a, random_partition(10, 3, 7));
        assert_ne!(a, random_partition(10, 3, 8));
    }

    #[test]
    fn anticlusters_keep_alike_adapters_apart() {
        // Three families of three: the only partition into 3 clusters with no two of a family
        // together puts one of each family in every cluster.
        let groups = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let sim = block_similarity(&groups);
        for seed in 0..10 {
            let a = anticlusters(&sim, 3, seed);
            for i in 0..groups.len() {
                for j in i + 1..groups.len() {
                    assert!(!(a[i] == a[j] && groups[i] == groups[j]), "seed {seed}: {a:?}");
                }
            }
            assert!((within_similarity(&sim, &a) - 9.0 * 0.05).abs() < 1e-9, "seed {seed}");
        }
    }

    #[test]
    fn anticlusters_are_balanced_seeded_and_the_best_of_their_exchanges() {
        // Similarities with no block structure: the exchange only lowers the sum.
        let n = 13;
        let sim: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| if i == j { 1.0 } else { ((i * j + i + j) % 7) as f64 / 10.0 }).collect()).collect();
        for (k, seed) in [(2, 1), (4, 3), (6, 5), (13, 0), (1, 2)] {
            let a = anticlusters(&sim, k, seed);
            let sizes: Vec<usize> = clusters_of(&a, k).iter().map(Vec::len).collect();
            assert_eq!(sizes.len(), k);
            assert!(sizes.iter().all(|&s| s == n / k || s == n.div_ceil(k)), "{sizes:?}");
            for s in (0..ANTICLUSTER_STARTS).map(|nth| exchange_seed(seed, nth)) {
                let one = exchange_anticlusters(&sim, k, s);
                assert!(within_similarity(&sim, &one) <= within_similarity(&sim, &random_partition(n, k, s)) + 1e-12);
                assert!(within_similarity(&sim, &a) <= within_similarity(&sim, &one) + 1e-12, "k {k}, start {s}");
            }
            assert_eq!(a, anticlusters(&sim, k, seed));
            let optima = anticluster_optima(&sim, k, seed);
            assert_eq!(optima[0], a);
            assert!(optima.windows(2).all(|w| w[0] != w[1] && within_similarity(&sim, &w[0]) <= within_similarity(&sim, &w[1])));
        }
    }

    #[test]
    fn anticlusters_do_not_move_with_the_seed_where_single_exchanges_do() {
        // An unstructured 24 x 24 similarity, 6 clusters: one exchange stops at a different
        // local optimum for nearly every start, the best of many at one partition.
        let n = 24;
        let mut rng = synth::rng(11);
        let mut sim = vec![vec![1.0; n]; n];
        for i in 0..n {
            for j in i + 1..n {
                let v: f64 = rng.random_range(-0.2..0.8);
                sim[i][j] = v;
                sim[j][i] = v;
            }
        }
        let singles: std::collections::HashSet<Assignment> = (0..8).map(|s| exchange_anticlusters(&sim, 6, s)).collect();
        assert!(singles.len() > 1, "single exchanges agree: the test cannot tell");
        for seed in 1..4 {
            assert_eq!(anticlusters(&sim, 6, seed), anticlusters(&sim, 6, 0), "seed {seed}");
        }
    }

    #[test]
    fn fill_empty_moves_worst_task() {
        let mut a = vec![0, 0, 0, 1];
        fill_empty(&mut a, 3, &[0.1, 0.9, 0.2, 0.0]);
        assert_eq!(a, vec![0, 2, 0, 1]);
    }

    #[test]
    fn canonical_numbering() {
        assert_eq!(canonical(&[2, 2, 0, 1], 3), vec![0, 0, 1, 2]);
    }
}
