//! The inputs every adapted projection sees on each task's examples under the base model, for
//! the merge operator that weighs each task's delta by them (`regmean`). One forward pass per
//! example, no scoring; held only while merges may still be made.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::options::MergeRunOptions;
use super::tasks::Task;
use crate::activations::{ActivationProbe, ProjectionInputs};
use crate::error::{Error, Result};
use crate::interference::InputRows;
use crate::merge::{Method, TaskInputs};
use crate::score::{SampleTokens, Scorer};

/// Rows kept per example: every position that predicts a completion token (or the stop), up
/// to half of this, and prompt positions spread evenly over the rest. The prompt's positions
/// count because their keys and values, which the adapter changes, are what the completion
/// attends to; the cap bounds memory (rows x width x targets x tasks floats).
const ROWS_PER_EXAMPLE: usize = 16;

/// Every task's inputs by target name, in task order. Projections that read the same tensor
/// (a layer's q, k and v) share one copy.
pub(crate) struct TaskActivations(Vec<SharedInputs>);

struct SharedInputs {
    distinct: Vec<ProjectionInputs>,
    by_target: BTreeMap<String, usize>,
    /// Rows that come from the examples before the task's [`Task::fold_split`] (the rows are
    /// kept in example order, so each fold's are one contiguous run).
    fold_rows: usize,
}

impl SharedInputs {
    fn new(captured: BTreeMap<String, ProjectionInputs>, fold_rows: usize) -> Self {
        let mut distinct: Vec<ProjectionInputs> = Vec::new();
        // (block prefix `blk.N.`, index): only a block's own projections can share an input.
        let mut blocks: Vec<(String, usize)> = Vec::new();
        let mut by_target = BTreeMap::new();
        for (name, x) in captured {
            let block = name.split_inclusive('.').take(2).collect::<String>();
            let same = blocks.iter().find(|(b, k)| *b == block && distinct[*k] == x).map(|&(_, k)| k);
            let at = same.unwrap_or_else(|| {
                distinct.push(x);
                blocks.push((block, distinct.len() - 1));
                distinct.len() - 1
            });
            by_target.insert(name, at);
        }
        SharedInputs { distinct, by_target, fold_rows }
    }
}

impl TaskActivations {
    /// Captured where one of the run's operators needs them; None (and no pass) otherwise.
    pub(crate) fn for_run(scorer: &Scorer, run: &MergeRunOptions, tasks: &[Task]) -> Result<Option<Self>> {
        if !run.merge_methods().any(Method::needs_inputs) {
            return Ok(None);
        }
        Self::capture(scorer, &run.base, tasks, run.threads, run.progress).map(Some)
    }

    pub(crate) fn capture(scorer: &Scorer, base: &Path, tasks: &[Task], threads: Option<i32>, progress: bool) -> Result<Self> {
        let (mut probe, tokenized) = probe_for(scorer, base, tasks, threads)?;
        let pb = crate::progress::bar(progress, tasks.len() as u64, "activations");
        let mut out = Vec::with_capacity(tasks.len());
        for (task, samples) in tasks.iter().zip(&tokenized) {
            let fold_rows = samples[..task.fold_split()].iter().map(|s| kept_positions(s).len()).sum();
            out.push(SharedInputs::new(probe.inputs_at(samples, kept_positions)?, fold_rows));
            pb.inc(1);
        }
        pb.finish_and_clear();
        Ok(TaskActivations(out))
    }

    /// The inputs of the tasks `members`, as the merge operator takes them.
    pub(crate) fn of(&self, members: &[usize]) -> Vec<TaskInputs<'_>> {
        self.rows_of(members, None)
    }

    /// As [`Self::of`], from one fold of each member's examples only (0: those before its
    /// [`Task::fold_split`], 1: the rest): a merge fitted without the other fold's examples,
    /// which can then be judged on them.
    pub(crate) fn fold_of(&self, members: &[usize], fold: usize) -> Vec<TaskInputs<'_>> {
        self.rows_of(members, Some(fold))
    }

    fn rows_of(&self, members: &[usize], fold: Option<usize>) -> Vec<TaskInputs<'_>> {
        members
            .iter()
            .map(|&i| {
                let task = &self.0[i];
                task.by_target
                    .iter()
                    .map(|(name, &k)| {
                        let x = &task.distinct[k];
                        let rows = match fold {
                            None => 0..x.rows,
                            Some(0) => 0..task.fold_rows,
                            Some(_) => task.fold_rows..x.rows,
                        };
                        let data = &x.data[rows.start * x.n_in..rows.end * x.n_in];
                        (name.clone(), InputRows { rows: rows.len(), n_in: x.n_in, data })
                    })
                    .collect()
            })
            .collect()
    }
}

/// A probe on `base` for every target of `tasks`' adapters, and every task's examples as tokens.
pub(crate) fn probe_for(scorer: &Scorer, base: &Path, tasks: &[Task], threads: Option<i32>) -> Result<(ActivationProbe, Vec<Vec<SampleTokens>>)> {
    let weights: HashSet<String> = tasks.iter().flat_map(|t| t.adapter.targets.keys().cloned()).collect();
    let tokenized: Vec<Vec<SampleTokens>> = tasks
        .iter()
        .map(|t| t.samples.iter().map(|s| scorer.tokenize_sample(s).map_err(|e| Error::Llama(format!("task {}: {e}", t.name)))).collect())
        .collect::<Result<_>>()?;
    let longest = tokenized.iter().flatten().map(|s| s.tokens.len()).max().unwrap_or(1);
    Ok((ActivationProbe::new(base, weights, threads, longest)?, tokenized))
}

/// [`ROWS_PER_EXAMPLE`]'s choice for one example. Position 0 (the first token, often an
/// attention sink with outsized activations) is left out unless it is all there is.
fn kept_positions(s: &SampleTokens) -> Vec<usize> {
    let n = s.tokens.len();
    let first_predicting = s.first_scored.saturating_sub(1).min(n.saturating_sub(1));
    let predicting: Vec<usize> = (first_predicting..n).take(ROWS_PER_EXAMPLE / 2).collect();
    let prompt: Vec<usize> = (1..first_predicting).collect();
    let room = ROWS_PER_EXAMPLE - predicting.len();
    let mut keep: Vec<usize> = if prompt.len() <= room {
        prompt
    } else {
        // Evenly spread, the last prompt position always in.
        (0..room).map(|k| prompt[(k + 1) * prompt.len() / room - 1]).collect()
    };
    keep.extend(predicting);
    if keep.is_empty() {
        keep.push(0);
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::Token;

    fn sample(n: usize, first_scored: usize) -> SampleTokens {
        SampleTokens { tokens: (0..n as i32).map(Token).collect(), first_scored }
    }

    #[test]
    fn the_two_folds_split_every_target_s_rows_where_the_examples_split() {
        // Two targets reading one input (q, k) and one reading another; 5 rows of width 2, the
        // first 3 from the examples before the split.
        let x = |seed: f32| ProjectionInputs { n_in: 2, rows: 5, data: (0..10).map(|v| v as f32 + seed).collect() };
        let captured: BTreeMap<String, ProjectionInputs> =
            [("blk.0.attn_q.weight", x(0.0)), ("blk.0.attn_k.weight", x(0.0)), ("blk.0.attn_output.weight", x(100.0))]
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
        let acts = TaskActivations(vec![SharedInputs::new(captured, 3)]);
        let (all, first, second) = (acts.of(&[0]), acts.fold_of(&[0], 0), acts.fold_of(&[0], 1));
        for (name, whole) in &all[0] {
            let (a, b) = (&first[0][name], &second[0][name]);
            assert_eq!((a.rows, b.rows, a.n_in), (3, 2, 2), "{name}");
            assert_eq!([a.data, b.data].concat(), whole.data, "{name}: the folds are the rows in order");
        }
        // Targets that shared their rows still share each fold's (regmean's Grams are shared by address).
        assert_eq!(first[0]["blk.0.attn_q.weight"].data.as_ptr(), first[0]["blk.0.attn_k.weight"].data.as_ptr());
        assert_ne!(first[0]["blk.0.attn_q.weight"].data.as_ptr(), first[0]["blk.0.attn_output.weight"].data.as_ptr());
    }

    #[test]
    fn positions_cover_the_completion_then_spread_over_the_prompt() {
        // 40-token prompt, 5 scored tokens: the 6 predicting positions and 10 of the prompt.
        let keep = kept_positions(&sample(45, 40));
        assert_eq!(keep.len(), ROWS_PER_EXAMPLE);
        assert_eq!(&keep[10..], &[39, 40, 41, 42, 43, 44]);
        assert!(keep.windows(2).all(|w| w[0] < w[1]), "{keep:?}");
        assert!(keep[0] >= 1 && keep[9] == 38, "{keep:?}");
        // A short prompt is kept whole (but the first token); a long completion is capped.
        assert_eq!(kept_positions(&sample(6, 4)), vec![1, 2, 3, 4, 5]);
        assert_eq!(kept_positions(&sample(30, 2)), (1..1 + ROWS_PER_EXAMPLE / 2).collect::<Vec<_>>());
        assert_eq!(kept_positions(&sample(1, 1)), vec![0]);
    }
}
