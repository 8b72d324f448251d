//! D2C's search for a partition: a start (weight-space anticlusters or k-medoids, or a seeded
//! random one), other starts compared on their own clusters, then
//! rounds of merge -> score -> move tasks, the moves picked by the activation model (or by
//! scoring every task under every cluster) and each judged with the task inside. The best partition seen
//! is kept, so the search never ends worse on the examples than where it started.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use serde_json::json;

use super::evaluator::{Evaluator, Pool};
use super::options::{Init, MergeRunOptions, Screen, Strategy};
use super::tasks::Task;
use crate::adapter::LoraAdapter;
use crate::cluster::{self, Assignment};
use crate::error::Result;
use crate::interference::Interference;
use crate::manifest::Round;
use crate::objective::Baselines;
use crate::similarity;

/// What the search found, and how.
pub(crate) struct Search {
    /// The best partition seen.
    pub assign: Assignment,
    pub rounds: Vec<Round>,
    pub best_round: usize,
    /// The starts the restarts compared (manifest settings), with their objectives.
    pub starts: Vec<serde_json::Value>,
    /// (activation model's relative error, scored regret) for every distinct (task, merged
    /// cluster) the search scored: how well the model predicts what scoring finds.
    pub predicted: Vec<(f64, f64)>,
}

/// The partition `opts.strategy` asks for, refined by D2C's rounds where it is D2C (1 < k < n).
/// With `interference` (the activation model) the starts are polished under it and it picks
/// the moves to judge; without it, or under `--screen scored`, every task is scored under every
/// cluster each round.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search(
    ev: &mut Evaluator,
    pool: &Pool<'_>,
    baselines: &Baselines,
    opts: &MergeRunOptions,
    k: usize,
    rank: usize,
    interference: Option<&Interference>,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Search> {
    let tasks = pool.tasks;
    let n = tasks.len();
    let t = Instant::now();
    let similarity = {
        let refs: Vec<&LoraAdapter> = tasks.iter().map(|t| &*t.adapter).collect();
        similarity::similarity_matrix(&refs)
    };
    timings.insert("similarity".to_string(), t.elapsed().as_secs_f64());
    // Anticluster optima, best first: the start, then the next candidates for the restarts.
    let mut anticluster_optima = match (opts.strategy, opts.init) {
        (Strategy::Anticluster, _) | (Strategy::D2c, Init::Anticluster) if k < n => cluster::anticluster_optima(&similarity, k, opts.seed),
        _ => Vec::new(),
    }
    .into_iter()
    .enumerate();
    let mut assign: Assignment = match (opts.strategy, opts.init) {
        _ if k == n => (0..n).collect(),
        (Strategy::Truncate | Strategy::TruncateEnergy | Strategy::Allocate, _) => (0..n).collect(),
        (Strategy::Single, _) => vec![0; n],
        (Strategy::Random, _) | (Strategy::D2c, Init::Random) => cluster::random_partition(n, k, opts.seed),
        (Strategy::Kmeans, _) | (Strategy::D2c, Init::Kmeans) => cluster::kmedoids(&similarity, k, opts.seed),
        (Strategy::Anticluster, _) | (Strategy::D2c, Init::Anticluster) => anticluster_optima.next().expect("one optimum at least").1,
    };

    let t = Instant::now();
    let refine = opts.strategy == Strategy::D2c && k > 1 && k < n;
    let model = interference.filter(|_| refine);
    let scored_screen = opts.screen == Screen::Scored || model.is_none();
    let mut predicted = Predictions { model, pairs: BTreeMap::new() };
    // Every task's regret under its own cluster of `partition` (only the clusters numbered
    // `changed`, where given), as (task, regret).
    let own_clusters =
        |ev: &mut Evaluator, predicted: &mut Predictions, partition: &Assignment, changed: Option<[usize; 2]>| -> Result<Vec<(usize, f64)>> {
            let mut regrets = Vec::new();
            for members in cluster::clusters_of(partition, k) {
                if changed.is_some_and(|ch| !ch.contains(&partition[members[0]])) {
                    continue;
                }
                let got = pool.judge(ev, &members, opts.method, 1.0, rank, tasks, &members, 1.0)?;
                for (&i, &g) in members.iter().zip(&got) {
                    let regret = baselines.regret(i, g);
                    predicted.note(i, &members, regret);
                    regrets.push((i, regret));
                }
            }
            Ok(regrets)
        };
    // Restarts: other starts scored on their own members only (K merges, N task scores
    // each, against the N x K of a round), and the rounds refine the best. The objective
    // ranks partitions far better than it finds them by moving tasks one at a time.
    let mut starts = Vec::new();
    if refine && opts.restarts > 1 {
        let mut options: Vec<(String, Assignment)> = vec![(opts.init.to_string(), cluster::canonical(&assign, k))];
        // The --init start polished under the activation model competes with it; the seeded
        // random starts stay as drawn (on the benchmark, polishing them made them worse).
        // From anticlusters, the opposite start competes next: k-medoids, for adapters that
        // look alike because they are one skill (which merge well) rather than one format
        // with different rules (which do not); which of the two the tasks at hand are is for
        // the scored objective to say. Then the next best anticluster optima of the same
        // exchange starts (unpolished: each is already a local optimum of what it minimises),
        // or seeded random starts.
        let mut pending: Vec<(String, Assignment)> = Vec::new();
        match (model, opts.init) {
            (_, Init::Anticluster) | (None, Init::Random) => pending.push(("kmeans".to_string(), cluster::kmedoids(&similarity, k, opts.seed))),
            (Some(m), _) => pending.push((format!("{}, polished by activations", opts.init), m.local_search(&assign, k))),
            (None, Init::Kmeans) => {}
        }
        let mut seed = opts.seed;
        let mut tries = 0;
        while options.len() < opts.restarts && tries < 4 * opts.restarts + 4 {
            tries += 1;
            let next = pending.pop().or_else(|| match opts.init {
                Init::Anticluster => anticluster_optima.next().map(|(i, a)| (format!("anticluster optimum {}", i + 1), a)),
                _ => {
                    seed += 1;
                    Some((format!("random seed {seed}"), cluster::random_partition(n, k, seed)))
                }
            });
            let Some((name, start)) = next else { break };
            let start = cluster::canonical(&start, k);
            if !options.iter().any(|(_, a)| *a == start) {
                options.push((name, start));
            }
        }
        let mut best_start: Option<(f64, usize)> = None;
        for (si, (name, start)) in options.iter().enumerate() {
            let objective = own_clusters(ev, &mut predicted, start, None)?.iter().map(|(_, r)| r).sum::<f64>() / n as f64;
            let mut entry = json!({"start": name, "objective": objective, "within_similarity": cluster::within_similarity(&similarity, start)});
            if let Some(m) = model {
                entry["activation_error"] = json!(m.partition_error(start, k));
            }
            starts.push(entry);
            if best_start.is_none_or(|(b, _)| objective < b - 1e-12) {
                best_start = Some((objective, si));
            }
        }
        assign = options[best_start.expect("at least one start").1].1.clone();
    }
    // The scored screen's examples: the first --screen-examples of each task, with its own and
    // base scores on those (the judged moves and the objective use every example).
    let screen_set: Option<(Vec<Task>, Baselines)> = match (refine && scored_screen, opts.screen_examples) {
        (true, m) if m > 0 && tasks.iter().any(|t| t.samples.len() > m) => {
            let subset: Vec<Task> = tasks.iter().map(|t| t.first_examples(m)).collect();
            let (b, _) = super::evaluator::baselines(ev, &subset, opts.objective, false)?;
            Some((subset, b))
        }
        _ => None,
    };
    let mut rounds: Vec<Round> = Vec::new();
    let mut seen: HashSet<Assignment> = HashSet::new();
    let mut best: Option<(f64, Assignment, usize)> = None;
    let max_rounds = if refine { opts.rounds } else { 0 };
    let pb = crate::progress::bar(opts.progress, (max_rounds + 1) as u64, "clustering rounds");
    for round in 0..=max_rounds {
        let (seq0, cached0) = (ev.scored_sequences, ev.cached_sequences);
        seen.insert(assign.clone());
        let groups = cluster::clusters_of(&assign, k);
        // regret[i][c]: task i under cluster c's merged adapter (every pair under the scored
        // screen, else each task under its own cluster only).
        let mut regrets = vec![vec![f64::INFINITY; groups.len()]; n];
        let mut own_regret = vec![f64::INFINITY; n];
        if refine && scored_screen {
            let (screen_tasks, screen_baselines) = match &screen_set {
                Some((t, b)) => (t.as_slice(), b),
                None => (tasks, baselines),
            };
            let everyone: Vec<usize> = (0..n).collect();
            for (c, members) in groups.iter().enumerate() {
                let got = pool.judge(ev, members, opts.method, 1.0, rank, screen_tasks, &everyone, 1.0)?;
                for i in 0..n {
                    regrets[i][c] = screen_baselines.regret(i, got[i]);
                    if screen_set.is_none() {
                        predicted.note(i, members, regrets[i][c]);
                    }
                }
            }
            if screen_set.is_none() {
                own_regret = (0..n).map(|i| regrets[i][assign[i]]).collect();
            }
        }
        if own_regret.iter().any(|r| r.is_infinite()) {
            for (i, regret) in own_clusters(ev, &mut predicted, &assign, None)? {
                own_regret[i] = regret;
                if !scored_screen {
                    regrets[i][assign[i]] = regret;
                }
            }
        }
        let objective = own_regret.iter().sum::<f64>() / n as f64;
        rounds.push(Round {
            round,
            objective,
            clusters: groups.iter().map(|g| g.iter().map(|&i| tasks[i].name.clone()).collect()).collect(),
            scored_sequences: ev.scored_sequences - seq0,
            cached_sequences: ev.cached_sequences - cached0,
        });
        if best.as_ref().is_none_or(|(b, _, _)| objective < *b - 1e-12) {
            best = Some((objective, assign.clone(), round));
        }
        pb.inc(1);
        if round == max_rounds {
            break;
        }
        // Every move and swap is judged with the task inside: the clusters it changes
        // re-merged and their members scored (the true change of the objective). The
        // screen only picks which few to judge. The best move is taken, then every other one
        // that helped, best first, judged again where a taken move changed its clusters
        // (taking only moves between untouched clusters moved one task a round at K = 4 and
        // left the objective falling; taking each in the screen's order as it helped spent
        // the rounds on small gains and stopped higher).
        let (seq0, cached0) = (ev.scored_sequences, ev.cached_sequences);
        let moves = match model.filter(|_| !scored_screen) {
            Some(m) => predicted_moves(m, &assign, k, MOVE_CANDIDATES),
            None => move_candidates(&assign, &regrets, MOVE_CANDIDATES),
        };
        let taken = take_improving_moves(&mut assign, k, &mut own_regret, &moves, &seen, |trial, changed| {
            own_clusters(ev, &mut predicted, trial, Some(changed))
        })?;
        let mut next = cluster::canonical(&assign, k);
        if taken == 0 {
            // No single move helps (a symmetric mix: every task best served at home):
            // swaps of two tasks between clusters, the most promising few.
            let swaps = match model.filter(|_| !scored_screen) {
                Some(m) => predicted_swaps(m, &assign, SWAP_CANDIDATES),
                None => swap_candidates(&assign, &regrets, SWAP_CANDIDATES),
            };
            let mut best_swap: Option<(f64, Assignment)> = None;
            for (i, j) in swaps {
                let mut trial = assign.clone();
                trial.swap(i, j);
                let changed = [trial[i], trial[j]];
                if seen.contains(&cluster::canonical(&trial, k)) {
                    continue;
                }
                let change = objective_change(&own_regret, &own_clusters(ev, &mut predicted, &trial, Some(changed))?);
                if change < -1e-9 && best_swap.as_ref().is_none_or(|(b, _)| change < *b) {
                    best_swap = Some((change, cluster::canonical(&trial, k)));
                }
            }
            match best_swap {
                Some((_, trial)) => next = trial,
                None => {
                    record_extra(&mut rounds, ev, seq0, cached0);
                    break; // neither a move nor a swap helps: converged
                }
            }
        }
        record_extra(&mut rounds, ev, seq0, cached0);
        assign = next;
    }
    pb.finish_and_clear();
    timings.insert("clustering".to_string(), t.elapsed().as_secs_f64());
    let (_, assign, best_round) = best.expect("at least one round");
    Ok(Search { assign, rounds, best_round, starts, predicted: predicted.pairs.into_values().collect() })
}

/// What the activation model said of each (task, merged cluster) the search scored, beside the
/// scored regret; singletons at their own adapter are left out (both are zero).
struct Predictions<'m> {
    model: Option<&'m Interference>,
    pairs: BTreeMap<(usize, Vec<usize>), (f64, f64)>,
}

impl Predictions<'_> {
    fn note(&mut self, task: usize, members: &[usize], regret: f64) {
        if let Some(m) = self.model.filter(|_| members != [task]) {
            self.pairs.insert((task, members.to_vec()), (m.relative_error(task, members), regret));
        }
    }
}

/// The moves the activation model predicts help most (the task's own delta inside the
/// cluster it joins, every member of both clusters counted), best first; a cluster never gives
/// away its last task.
fn predicted_moves(model: &Interference, assign: &[usize], k: usize, limit: usize) -> Vec<(usize, usize)> {
    let mut sizes = vec![0usize; k];
    assign.iter().for_each(|&c| sizes[c] += 1);
    let mut moves: Vec<(f64, usize, usize)> = Vec::new();
    for (i, &from) in assign.iter().enumerate() {
        if sizes[from] > 1 {
            moves.extend((0..k).filter(|&c| c != from).map(|to| (model.move_change(assign, i, to), i, to)));
        }
    }
    most_promising(moves, limit)
}

/// The swaps the activation model predicts help most, best first.
fn predicted_swaps(model: &Interference, assign: &[usize], limit: usize) -> Vec<(usize, usize)> {
    let n = assign.len();
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            if assign[i] != assign[j] {
                pairs.push((model.swap_change(assign, i, j), i, j));
            }
        }
    }
    most_promising(pairs, limit)
}

/// Moves judged exactly per round (both clusters re-merged, their members scored).
const MOVE_CANDIDATES: usize = 12;

/// Moves of one task to another cluster, most promising first by the scores at hand (the task
/// under the other cluster's current adapter, which lacks the task's own delta: a biased
/// screen, so moves it calls slightly harmful are kept too). A cluster never gives away its
/// last task.
pub fn move_candidates(assign: &[usize], regrets: &[Vec<f64>], limit: usize) -> Vec<(usize, usize)> {
    let k = regrets.first().map(Vec::len).unwrap_or(0);
    let mut sizes = vec![0usize; k];
    for &c in assign {
        sizes[c] += 1;
    }
    let mut moves: Vec<(f64, usize, usize)> = Vec::new();
    for (i, &from) in assign.iter().enumerate() {
        if sizes[from] < 2 {
            continue;
        }
        for to in (0..k).filter(|&c| c != from) {
            let change = regrets[i][to] - regrets[i][from];
            moves.push((if change.is_finite() { change } else { f64::INFINITY }, i, to));
        }
    }
    most_promising(moves, limit)
}

/// (task, regret) of every member of the clusters a trial partition changed.
type MemberRegrets = Vec<(usize, f64)>;

/// How much a trial changes the summed regret: its changed clusters' members' regrets against
/// theirs now.
fn objective_change(own_regret: &[f64], regrets: &[(usize, f64)]) -> f64 {
    regrets.iter().map(|&(t, r)| r - own_regret[t]).sum()
}

/// One step of moves: every candidate (task, to) is judged against `assign`, the one that lowers
/// the objective most is taken, then each other one that lowered it, in order of how much,
/// judged again against the partition as it stands where a move taken before it changed one of
/// its two clusters (else what was measured still holds) and taken if it still helps. Returns
/// how many were taken. `judge` gives the regret of every member of the two changed clusters of
/// a trial partition; `own_regret` is kept current. A task moves at most once a step, a
/// cluster never gives away its last task, and no partition of an earlier round is entered
/// again.
pub fn take_improving_moves<F>(
    assign: &mut Assignment,
    k: usize,
    own_regret: &mut [f64],
    candidates: &[(usize, usize)],
    seen: &HashSet<Assignment>,
    mut judge: F,
) -> Result<usize>
where
    F: FnMut(&Assignment, [usize; 2]) -> Result<Vec<(usize, f64)>>,
{
    let mut sizes = vec![0usize; k];
    assign.iter().for_each(|&c| sizes[c] += 1);
    let start = assign.clone();
    // (change, task, to, the regrets of both clusters' members) of each move that helped.
    let mut helped: Vec<(f64, usize, usize, MemberRegrets)> = Vec::new();
    for &(task, to) in candidates {
        let from = start[task];
        if from == to || sizes[from] < 2 {
            continue;
        }
        let mut trial = start.clone();
        trial[task] = to;
        if seen.contains(&cluster::canonical(&trial, k)) {
            continue;
        }
        let regrets = judge(&trial, [from, to])?;
        let change = objective_change(own_regret, &regrets);
        if change < -1e-9 {
            helped.push((change, task, to, regrets));
        }
    }
    helped.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut touched = vec![false; k];
    let mut taken = 0;
    for (_, task, to, measured) in helped {
        let from = assign[task];
        if from != start[task] || sizes[from] < 2 {
            continue;
        }
        let mut trial = assign.clone();
        trial[task] = to;
        let regrets = if touched[from] || touched[to] {
            if seen.contains(&cluster::canonical(&trial, k)) {
                continue;
            }
            judge(&trial, [from, to])?
        } else {
            measured
        };
        if objective_change(own_regret, &regrets) < -1e-9 {
            *assign = trial;
            sizes[from] -= 1;
            sizes[to] += 1;
            touched[from] = true;
            touched[to] = true;
            regrets.into_iter().for_each(|(t, r)| own_regret[t] = r);
            taken += 1;
        }
    }
    Ok(taken)
}

/// The `limit` candidates (change, task, other) with the lowest predicted change, ties broken
/// by index so runs repeat; the shared tail of every screen.
fn most_promising(mut candidates: Vec<(f64, usize, usize)>, limit: usize) -> Vec<(usize, usize)> {
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    candidates.into_iter().take(limit).map(|(_, i, j)| (i, j)).collect()
}

/// Charges the moves and swaps judged after a round's scores to that round.
fn record_extra(rounds: &mut [Round], ev: &Evaluator, seq0: usize, cached0: usize) {
    if let Some(last) = rounds.last_mut() {
        last.scored_sequences += ev.scored_sequences - seq0;
        last.cached_sequences += ev.cached_sequences - cached0;
    }
}

/// Swaps tried exactly (two clusters re-merged and scored each) once the move rule is stuck.
const SWAP_CANDIDATES: usize = 8;

/// Pairs of tasks in different clusters, most promising swap first by the scores at hand: how
/// much each would gain under the other's current cluster adapter (biased against the move,
/// since neither adapter holds the arriving task's delta, but it ranks the pairs).
fn swap_candidates(assign: &[usize], regrets: &[Vec<f64>], limit: usize) -> Vec<(usize, usize)> {
    let n = assign.len();
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (assign[i], assign[j]);
            if a != b {
                let change = regrets[i][b] - regrets[i][a] + regrets[j][a] - regrets[j][b];
                pairs.push((if change.is_finite() { change } else { f64::INFINITY }, i, j));
            }
        }
    }
    most_promising(pairs, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regret of every member of clusters `changed` when a task's regret is the share of its
    /// cluster that is of another kind.
    fn mixing_regrets(kinds: &[usize], trial: &Assignment, changed: [usize; 2]) -> Vec<(usize, f64)> {
        let mut out = Vec::new();
        for (t, &c) in trial.iter().enumerate().filter(|&(_, c)| changed.contains(c)) {
            let members: Vec<usize> = (0..trial.len()).filter(|&u| trial[u] == c).collect();
            let others = members.iter().filter(|&&u| kinds[u] != kinds[t]).count();
            out.push((t, others as f64 / members.len() as f64));
        }
        out
    }

    #[test]
    fn a_step_takes_the_best_move_then_every_other_that_still_helps() {
        // Twice kinds a a a b b b: clusters {0, 1, 4} and {2, 3, 5}, and the same on tasks 6..12
        // in clusters 2 and 3. Each half is unmixed by two moves between the same two clusters.
        let kinds = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3];
        let mut assign = vec![0, 0, 1, 1, 0, 1, 2, 2, 3, 3, 2, 3];
        let mut own: Vec<f64> =
            mixing_regrets(&kinds, &assign, [0, 1]).into_iter().chain(mixing_regrets(&kinds, &assign, [2, 3])).map(|(_, r)| r).collect();
        let mut judged = Vec::new();
        // Task 0 leaving a cluster of its kind does not help; task 4 to cluster 0 is no move.
        let candidates = [(4, 1), (2, 0), (0, 1), (4, 0), (10, 3), (8, 2)];
        let taken = take_improving_moves(&mut assign, 4, &mut own, &candidates, &HashSet::new(), |trial, changed| {
            judged.push(trial.clone());
            Ok(mixing_regrets(&kinds, trial, changed))
        })
        .unwrap();
        assert_eq!(taken, 4);
        assert_eq!(assign, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert_eq!(own, vec![0.0; 12], "the regrets of the taken moves are kept");
        // Five judged against the start (the moves of each half help equally); then in each
        // half the second move judged again after the first changed its clusters, while the
        // first move of the second half is taken as measured (its clusters untouched).
        assert_eq!(judged.len(), 7, "{judged:?}");
    }

    #[test]
    fn no_move_empties_a_cluster_or_enters_a_partition_already_seen() {
        let kinds = [0, 1, 1];
        let mut assign = vec![0, 0, 1];
        let mut own: Vec<f64> = mixing_regrets(&kinds, &assign, [0, 1]).into_iter().map(|(_, r)| r).collect();
        let seen: HashSet<Assignment> = [cluster::canonical(&[0, 1, 1], 2)].into_iter().collect();
        // 1 -> cluster 1 would unmix both but is seen; 2 -> cluster 0 would empty cluster 1.
        let taken =
            take_improving_moves(&mut assign, 2, &mut own, &[(1, 1), (2, 0)], &seen, |trial, changed| Ok(mixing_regrets(&kinds, trial, changed)))
                .unwrap();
        assert_eq!((taken, assign), (0, vec![0, 0, 1]));
    }

    #[test]
    fn a_symmetric_mix_offers_the_swap_that_unmixes_it() {
        // Tasks 0, 1 belong together, as do 2, 3, but the clusters are {0, 2} and {1, 3}: each
        // task is served best at home (its own delta is there), so the screen ranks every move
        // as harmful; the moves are still offered for judging, and so are the swaps.
        let assign = vec![0, 1, 0, 1];
        let regrets = vec![vec![0.2, 0.5], vec![0.5, 0.2], vec![0.2, 0.6], vec![0.6, 0.2]];
        let moves = move_candidates(&assign, &regrets, 8);
        assert_eq!(moves.len(), 4);
        assert_eq!(moves[0], (0, 1), "the least harmful by the screen first: {moves:?}");
        let swaps = swap_candidates(&assign, &regrets, 8);
        // Every cross-cluster pair is a candidate, and swapping 1 with 2 (or 0 with 3) is there.
        assert_eq!(swaps.len(), 4);
        assert!(swaps.contains(&(1, 2)) && swaps.contains(&(0, 3)));
        assert!(swap_candidates(&assign, &regrets, 1).len() == 1);
        assert!(swap_candidates(&[0, 0, 0], &[vec![0.1], vec![0.1], vec![0.1]], 8).is_empty());
    }

    #[test]
    fn the_screen_never_offers_a_move_out_of_a_cluster_of_one() {
        let regrets = vec![vec![0.1, 0.9]; 3];
        assert!(move_candidates(&[0, 0, 1], &regrets, 8).iter().all(|&(i, _)| i != 2));
    }
}
