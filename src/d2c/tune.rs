//! Once the clusters are fixed: per cluster, the merge operator and weight multiplier that serve
//! its own tasks best on their examples; then per task, the scale its adapter is served at.
//! Both are judged as the search judges clusters ([`Pool::judge`]): a merge fitted to the
//! examples' inputs (regmean) is scored out of sample under `--judge cross-fit`, so that
//! neither choice prefers what only fits the ten examples; what ships is the fit on all of them.

use super::evaluator::{Candidate, ClusterEval, Evaluator, Pool};
use super::options::MergeRunOptions;
use super::tasks::pick;
use crate::error::Result;
use crate::manifest::MergeChoice;
use crate::merge::Method;
use crate::objective::{Baselines, TaskScore};

/// Every cluster's merge, chosen among `opts.tune_methods` x `opts.tune_scales` (and
/// `opts.method` at 1) by its members' mean regret. A lone task ships its own adapter.
pub(crate) fn tune_merges(
    ev: &mut Evaluator,
    pool: &Pool<'_>,
    baselines: &Baselines,
    opts: &MergeRunOptions,
    groups: &[Vec<usize>],
    rank: usize,
) -> Result<Vec<ClusterEval>> {
    let mut chosen: Vec<ClusterEval> = Vec::with_capacity(groups.len());
    let pb = crate::progress::bar(opts.progress, groups.len() as u64, "tuning merges");
    for members in groups {
        let member_tasks = pick(pool.tasks, members);
        let cluster_objective =
            |got: &[TaskScore]| -> f64 { members.iter().zip(got).map(|(&i, &v)| baselines.regret(i, v)).sum::<f64>() / members.len() as f64 };
        if members.len() == 1 {
            let (cand, _) = pool.eval(ev, members, opts.method, 1.0, rank, &member_tasks)?;
            chosen.push(ClusterEval { candidate: cand, choice: None });
            pb.inc(1);
            continue;
        }
        let mut options: Vec<(Method, f32)> = vec![(opts.method, 1.0)];
        for &m in &opts.tune_methods {
            for &s in &opts.tune_scales {
                if !options.contains(&(m, s)) {
                    options.push((m, s));
                }
            }
        }
        // A merge judged on its fold fits is built on all examples only once chosen; any other
        // is judged on the very candidate that ships, kept from its scoring.
        let mut best_here: Option<(f64, Method, f32, Option<Candidate>)> = None;
        for (m, s) in options {
            let (cand, got) = if pool.cross_fits(members, m) {
                (None, pool.judge(ev, members, m, s, rank, pool.tasks, members, 1.0)?)
            } else {
                let (cand, got) = pool.eval(ev, members, m, s, rank, &member_tasks)?;
                (Some(cand), got)
            };
            let obj = cluster_objective(&got);
            if best_here.as_ref().is_none_or(|(b, ..)| obj < *b - 1e-12) {
                best_here = Some((obj, m, s, cand));
            }
        }
        let (obj, m, s, cand) = best_here.expect("at least one option");
        let cand = match cand {
            Some(cand) => cand,
            None => pool.candidate(ev, members, m, s, rank)?,
        };
        chosen.push(ClusterEval { candidate: cand, choice: Some(MergeChoice { method: m.to_string(), scale: s, cluster_objective: obj }) });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(chosen)
}

/// Per task, the scale in `opts.serve_scales` (1 where it is not listed) at which its shipped
/// adapter serves its examples best, for every task that shares an adapter. A merge dilutes each
/// member's delta (an average of four holds a quarter of each), and how much a task wants it
/// back against the others' deltas differs by task; the scale costs no storage (llama-server
/// takes it per request). A task that ships its own adapter (or its truncation) keeps 1: its
/// examples would only fit noise. The grid is climbed from 1, up first, then down for the
/// tasks going up did not help; a task stops at the first step that does not lower its
/// regret (about two scorings per task instead of one per grid point). Ties keep the scale
/// nearer 1.
pub(crate) fn serve_scales(
    ev: &mut Evaluator,
    pool: &Pool<'_>,
    baselines: &Baselines,
    opts: &MergeRunOptions,
    groups: &[Vec<usize>],
    chosen: &[ClusterEval],
) -> Result<Vec<f32>> {
    let mut scales = vec![1.0f32; pool.tasks.len()];
    let shared: Vec<usize> = (0..groups.len()).filter(|&c| groups[c].len() > 1).collect();
    if opts.serve_scales.iter().all(|&s| s == 1.0) || shared.is_empty() {
        return Ok(scales);
    }
    let pb = crate::progress::bar(opts.progress, shared.len() as u64, "serve scales");
    for c in shared {
        let members = &groups[c];
        for (&i, s) in members.iter().zip(climb_scales(ev, pool, baselines, opts, members, &chosen[c].candidate, chosen[c].merged_by())?) {
            scales[i] = s;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(scales)
}

/// The serve scale of each of `members` on `candidate` (the climb [`serve_scales`] describes).
/// `merged_by`: the operator and multiplier `candidate` merged `members` with; where
/// [`Pool::judge`] cross-fits that merge, each scale is judged on the fold fits instead.
#[allow(clippy::too_many_arguments)]
pub(crate) fn climb_scales(
    ev: &mut Evaluator,
    pool: &Pool<'_>,
    baselines: &Baselines,
    opts: &MergeRunOptions,
    members: &[usize],
    candidate: &Candidate,
    merged_by: Option<(Method, f32)>,
) -> Result<Vec<f32>> {
    // At the rank it shipped at (a byte budget may have lowered it); a candidate cut per
    // target is judged as it is.
    let rank = candidate.rank;
    let refit = merged_by.filter(|&(m, _)| candidate.target_ranks.is_none() && pool.cross_fits(members, m));
    let scores_at = |ev: &mut Evaluator, serve: f32, at: &[usize]| -> Result<Vec<TaskScore>> {
        match refit {
            Some((m, s)) => pool.judge(ev, members, m, s, rank, pool.tasks, at, serve),
            None => ev.scores_at(Some(candidate), serve, &pick(pool.tasks, at)),
        }
    };
    let mut up: Vec<f32> = opts.serve_scales.iter().copied().filter(|&s| s > 1.0).collect();
    up.sort_by(f32::total_cmp);
    up.dedup();
    let mut down: Vec<f32> = opts.serve_scales.iter().copied().filter(|&s| s < 1.0).collect();
    down.sort_by(|a, b| b.total_cmp(a));
    down.dedup();
    let at_one = scores_at(ev, 1.0, members)?;
    let mut best: Vec<(f64, f32)> = members.iter().zip(&at_one).map(|(&i, &g)| (baselines.regret(i, g), 1.0)).collect();
    for ladder in [&up, &down] {
        // Going down only for the tasks going up left at 1.
        let mut climbing: Vec<usize> = (0..members.len()).filter(|&m| best[m].1 == 1.0).collect();
        for &s in ladder.iter() {
            if climbing.is_empty() {
                break;
            }
            let at: Vec<usize> = climbing.iter().map(|&m| members[m]).collect();
            let got = scores_at(ev, s, &at)?;
            let mut still = Vec::new();
            for (&m, &g) in climbing.iter().zip(&got) {
                let r = baselines.regret(members[m], g);
                if r < best[m].0 - 1e-12 {
                    best[m] = (r, s);
                    still.push(m);
                }
            }
            climbing = still;
        }
    }
    Ok(best.into_iter().map(|(_, s)| s).collect())
}
