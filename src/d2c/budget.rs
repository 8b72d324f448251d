//! A byte budget for clustered strategies: once the clusters and their merges are fixed, each
//! cluster's rank is chosen where it costs the objective least per byte.

use super::evaluator::{Candidate, ClusterEval, Evaluator, Pool};
use super::tasks::pick;
use crate::error::{Error, Result};
use crate::merge::Method;
use crate::objective::Baselines;

/// Ranks a cluster may take under a byte budget: halvings of `start` down to 1, and up to the
/// sum of its members' ranks (where a merge becomes exact).
fn rank_ladder(start: usize, max_rank: usize) -> Vec<usize> {
    let mut ladder = vec![];
    let mut r = 1;
    while r < max_rank {
        ladder.push(r);
        r *= 2;
    }
    ladder.push(max_rank);
    if !ladder.contains(&start) {
        ladder.push(start);
    }
    ladder.sort_unstable();
    ladder.dedup();
    ladder
}

/// Fits the adapters into `budget_bytes` by choosing each cluster's rank where it costs the
/// objective least: first step ranks down (least regret added per byte saved) until the total
/// fits, then spend what is left stepping ranks up where that lowers the regret most per byte.
pub(crate) fn allocate_ranks(
    ev: &mut Evaluator,
    pool: &Pool<'_>,
    baselines: &Baselines,
    budget_bytes: u64,
    start_rank: usize,
    groups: &[Vec<usize>],
    chosen: &mut [ClusterEval],
) -> Result<()> {
    let tasks = pool.tasks;
    let ladders: Vec<Vec<usize>> =
        groups.iter().map(|g| rank_ladder(start_rank, g.iter().map(|&i| tasks[i].adapter.max_rank()).sum::<usize>().max(1))).collect();
    let choice_of = |c: &ClusterEval| match &c.choice {
        Some(ch) => (ch.method.parse::<Method>().unwrap_or(Method::Svd), ch.scale),
        None => (Method::Svd, 1.0),
    };
    // Summed regret of a cluster's tasks at a rank (candidate, total regret).
    let mut at_rank = |c: usize, r: usize, chosen: &[ClusterEval]| -> Result<(Candidate, f64)> {
        let (m, s) = choice_of(&chosen[c]);
        let members = &groups[c];
        let (cand, nll) = pool.eval(ev, members, m, s, r, &pick(tasks, members))?;
        let total = members.iter().zip(&nll).map(|(&i, &v)| baselines.regret(i, v)).sum();
        Ok((cand, total))
    };
    let mut current: Vec<(Candidate, f64)> = Vec::with_capacity(groups.len());
    for c in 0..groups.len() {
        current.push(at_rank(c, chosen[c].candidate.rank, chosen)?);
    }
    let total_bytes = |cur: &[(Candidate, f64)]| cur.iter().map(|(c, _)| c.bytes).sum::<u64>();
    let step = |ladder: &[usize], r: usize, up: bool| -> Option<usize> {
        let pos = ladder.iter().position(|&x| x >= r)?;
        if up {
            ladder.get(pos + 1).copied()
        } else if pos > 0 {
            Some(ladder[pos - 1])
        } else {
            None
        }
    };
    while total_bytes(&current) > budget_bytes {
        let mut best: Option<(f64, usize, (Candidate, f64))> = None;
        for c in 0..groups.len() {
            let Some(r) = step(&ladders[c], current[c].0.rank, false) else {
                continue;
            };
            let next = at_rank(c, r, chosen)?;
            let saved = current[c].0.bytes.saturating_sub(next.0.bytes).max(1) as f64;
            let cost = (next.1 - current[c].1) / saved;
            if best.as_ref().is_none_or(|(b, ..)| cost < *b) {
                best = Some((cost, c, next));
            }
        }
        let Some((_, c, next)) = best else {
            return Err(Error::Usage(format!(
                "--budget-bytes {budget_bytes} is too small: {} clusters at rank 1 still take {} bytes",
                groups.len(),
                total_bytes(&current)
            )));
        };
        current[c] = next;
    }
    loop {
        let mut best: Option<(f64, usize, (Candidate, f64))> = None;
        for c in 0..groups.len() {
            let Some(r) = step(&ladders[c], current[c].0.rank, true) else {
                continue;
            };
            let next = at_rank(c, r, chosen)?;
            if total_bytes(&current) - current[c].0.bytes + next.0.bytes > budget_bytes {
                continue;
            }
            let gain = (current[c].1 - next.1) / (next.0.bytes.saturating_sub(current[c].0.bytes).max(1) as f64);
            if gain > 1e-12 && best.as_ref().is_none_or(|(b, ..)| gain > *b) {
                best = Some((gain, c, next));
            }
        }
        let Some((_, c, next)) = best else { break };
        current[c] = next;
    }
    for (c, (cand, total)) in current.into_iter().enumerate() {
        if let Some(ch) = &mut chosen[c].choice {
            ch.cluster_objective = total / groups[c].len() as f64;
        }
        chosen[c].candidate = cand;
    }
    Ok(())
}
