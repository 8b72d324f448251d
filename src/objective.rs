//! What `merge` minimises: how much worse a task's examples fare under a candidate adapter
//! than under the task's own adapter.
//!
//! The default, `exact`, asks what the tests ask: on how many examples does greedy decoding
//! reproduce the completion (the scorer's one-pass verdict, `eval`'s rule), relative to the
//! own adapter's count, with the normalised NLL as a small tie-breaking term. `soft` counts
//! each example by how surely it is reproduced (its margin, [`soft_verdict`]) instead of 0 or 1,
//! so that two candidates that reproduce the same examples are still told apart by how close
//! those examples came to flipping, and one example flipping by a hair weighs little.
//! `exact-margin` keeps exact's count and breaks its ties by the same soft share instead of the
//! NLL: among candidates that reproduce the same examples, the one that reproduces them more
//! surely (and misses the others more narrowly) wins. `nll` is the
//! normalised NLL alone, `(nll - nll_own) / (nll_base - nll_own)`: smooth, but it misranked
//! partitions on the quality benchmark (docs/results.md), chiefly by blowing up the noise of
//! tasks whose own adapter is barely better than the base in NLL.

/// Weight of the normalised NLL next to the exact-match loss: one example of ten reproduced
/// or lost (0.1 for a task whose own adapter reproduces all ten) outweighs a candidate that is
/// as bad as the base model in NLL, so NLL only orders candidates that reproduce the same.
pub const NLL_TIE_WEIGHT: f64 = 0.05;

/// Weight of the soft share's change next to the exact-match loss under `exact-margin`, in the
/// same unit (divided by the own adapter's exact share): the soft share moves by at most 1, so
/// the tie term stays under one example of ten (0.1), and only orders equal counts.
pub const MARGIN_TIE_WEIGHT: f64 = 0.05;

/// Logits of margin over which the soft verdict goes from 0.27 to 0.73 ([`soft_verdict`]).
pub const SOFT_MARGIN_SCALE: f64 = 1.0;

/// How surely greedy decoding reproduces an example, from its margin (the scorer's smallest
/// logit lead of the right token over the best other, negative where it is not reproduced):
/// the logistic of margin / [`SOFT_MARGIN_SCALE`], 0.5 on the edge, near 1 for a clear lead.
pub fn soft_verdict(margin: f64) -> f64 {
    1.0 / (1.0 + (-margin / SOFT_MARGIN_SCALE).exp())
}

/// A task's examples scored under one adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskScore {
    /// Token-weighted mean NLL of the completions.
    pub nll: f64,
    /// Share of the examples greedy decoding reproduces exactly.
    pub exact: f64,
    /// Mean [`soft_verdict`] of the examples.
    pub soft: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExampleObjective {
    /// Exact-match loss relative to the own adapter, NLL to break ties.
    Exact,
    /// Soft exact-match loss (each example counted by its margin) relative to the own
    /// adapter, NLL to break ties.
    Soft,
    /// Exact-match loss relative to the own adapter, the soft share (each example's margin) to
    /// break ties instead of the NLL.
    ExactMargin,
    /// Normalised NLL regret.
    Nll,
}

d2c_format::value_names!(ExampleObjective, "objective");

impl ExampleObjective {
    /// How the manifest describes it.
    pub fn description(self) -> String {
        match self {
            ExampleObjective::Exact => format!(
                "mean over tasks of (exact_own - exact_merged) / exact_own + {NLL_TIE_WEIGHT} * (nll_merged - nll_own) / (nll_base - nll_own) \
                 on the examples (exact: share reproduced by greedy decoding; a task its own adapter reproduces none of counts its nll term alone)"
            ),
            ExampleObjective::Soft => format!(
                "mean over tasks of (soft_own - soft_merged) / soft_own + {NLL_TIE_WEIGHT} * (nll_merged - nll_own) / (nll_base - nll_own) \
                 on the examples (soft: mean over examples of 1 / (1 + exp(-margin / {SOFT_MARGIN_SCALE})), margin: the smallest logit lead of the \
                 reproduced token over the best other along the completion and its stop, negative where greedy decoding misses)"
            ),
            ExampleObjective::ExactMargin => format!(
                "mean over tasks of ((exact_own - exact_merged) + {MARGIN_TIE_WEIGHT} * (soft_own - soft_merged)) / exact_own on the examples \
                 (exact: share reproduced by greedy decoding; soft: mean over examples of 1 / (1 + exp(-margin / {SOFT_MARGIN_SCALE})), margin: \
                 the smallest logit lead of the reproduced token over the best other along the completion and its stop; a task its own adapter \
                 reproduces none of counts its normalised nll regret (nll_merged - nll_own) / (nll_base - nll_own) alone)"
            ),
            ExampleObjective::Nll => "mean over tasks of (nll_merged - nll_own) / (nll_base - nll_own) on the examples".to_string(),
        }
    }
}

/// Normalised NLL regret; a task whose own adapter is no better than the base on its examples
/// (denominator <= 0) is measured in raw NLL difference instead, so it still counts.
pub fn nll_regret(nll: f64, own: f64, base: f64) -> f64 {
    let span = base - own;
    if span > 1e-6 {
        (nll - own) / span
    } else {
        nll - own
    }
}

/// Every task's ceiling (own adapter), floor (base) and size (completion tokens of its
/// examples), and the objective that compares a candidate's scores against them.
pub struct Baselines {
    pub objective: ExampleObjective,
    pub own: Vec<TaskScore>,
    pub base: Vec<TaskScore>,
    pub tokens: Vec<usize>,
}

impl Baselines {
    /// 0 = as good as the task's own adapter; larger is worse (negative: better than its own).
    pub fn regret(&self, task: usize, s: TaskScore) -> f64 {
        let (own, base) = (self.own[task], self.base[task]);
        let nll = nll_regret(s.nll, own.nll, base.nll);
        // A task its own adapter reproduces none of is judged by NLL under every objective: it has
        // no exact share to lose, and its soft share would be a small, noisy denominator.
        if own.exact <= 0.0 {
            return nll;
        }
        match self.objective {
            ExampleObjective::Nll => nll,
            ExampleObjective::Exact => (own.exact - s.exact) / own.exact + NLL_TIE_WEIGHT * nll,
            ExampleObjective::Soft => (own.soft - s.soft) / own.soft + NLL_TIE_WEIGHT * nll,
            ExampleObjective::ExactMargin => ((own.exact - s.exact) + MARGIN_TIE_WEIGHT * (own.soft - s.soft)) / own.exact,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(objective: ExampleObjective) -> Baselines {
        let own = TaskScore { nll: 0.2, exact: 0.8, soft: 0.78 };
        let base = TaskScore { nll: 1.2, exact: 0.1, soft: 0.15 };
        Baselines { objective, own: vec![own, TaskScore { nll: 0.5, exact: 0.0, soft: 0.1 }], base: vec![base, base], tokens: vec![10, 10] }
    }

    #[test]
    fn exact_match_decides_and_nll_only_breaks_ties() {
        let j = judge(ExampleObjective::Exact);
        assert!(j.regret(0, j.own[0]).abs() < 1e-12);
        // One example fewer reproduced, with a better NLL, is still worse than the same count
        // with the base model's NLL.
        let one_fewer = TaskScore { nll: 0.1, exact: 0.7, soft: 0.7 };
        let same_count_bad_nll = TaskScore { nll: 1.2, exact: 0.8, soft: 0.7 };
        assert!(j.regret(0, one_fewer) > j.regret(0, same_count_bad_nll));
        // At the same count, the lower NLL wins.
        assert!(j.regret(0, TaskScore { nll: 0.3, exact: 0.8, soft: 0.7 }) < j.regret(0, TaskScore { nll: 0.6, exact: 0.8, soft: 0.7 }));
        // A task its own adapter never reproduces is judged by NLL alone.
        assert_eq!(j.regret(1, TaskScore { nll: 0.85, exact: 0.0, soft: 0.0 }), nll_regret(0.85, 0.5, 1.2));
    }

    #[test]
    fn the_nll_objective_ignores_exact_match() {
        let j = judge(ExampleObjective::Nll);
        let s = TaskScore { nll: 0.7, exact: 0.0, soft: 0.0 };
        assert!((j.regret(0, s) - 0.5).abs() < 1e-12);
        assert_eq!(j.regret(0, s), j.regret(0, TaskScore { exact: 0.8, ..s }));
    }

    #[test]
    fn the_soft_objective_weighs_each_example_by_how_surely_it_is_reproduced() {
        let j = judge(ExampleObjective::Soft);
        let share = |margins: &[f64]| margins.iter().map(|&m| soft_verdict(m)).sum::<f64>() / margins.len() as f64;
        let score = |margins: &[f64]| TaskScore { nll: 0.2, exact: margins.iter().filter(|&&m| m > 0.0).count() as f64 / 10.0, soft: share(margins) };
        let clear = [6.0; 10];
        // The same ten examples reproduced, one of them only just: a little worse, not 0.1 worse.
        let mut one_near_edge = clear;
        one_near_edge[0] = 0.2;
        // One example lost by a hair weighs about as much as one kept by a hair.
        let mut one_lost_by_a_hair = clear;
        one_lost_by_a_hair[0] = -0.2;
        let mut one_lost_clearly = clear;
        one_lost_clearly[0] = -6.0;
        let (r_clear, r_near, r_hair, r_lost) = (
            j.regret(0, score(&clear)),
            j.regret(0, score(&one_near_edge)),
            j.regret(0, score(&one_lost_by_a_hair)),
            j.regret(0, score(&one_lost_clearly)),
        );
        assert!(r_clear < r_near && r_near < r_hair && r_hair < r_lost, "{r_clear} {r_near} {r_hair} {r_lost}");
        assert!(r_hair - r_near < 0.2 * (r_lost - r_clear), "a hair's flip is a small step: {r_near} -> {r_hair}");
        assert!((soft_verdict(0.0) - 0.5).abs() < 1e-12 && soft_verdict(20.0) > 0.999 && soft_verdict(-20.0) < 0.001);
        // Exact match cannot tell the first two apart, nor the last two.
        let e = judge(ExampleObjective::Exact);
        assert_eq!(e.regret(0, score(&clear)), e.regret(0, score(&one_near_edge)));
        assert_eq!(e.regret(0, score(&one_lost_by_a_hair)), e.regret(0, score(&one_lost_clearly)));
    }

    #[test]
    fn exact_margin_counts_like_exact_and_breaks_ties_by_the_margins() {
        let j = judge(ExampleObjective::ExactMargin);
        assert!(j.regret(0, j.own[0]).abs() < 1e-12);
        // One example fewer reproduced, however sure the rest, is worse than the same count
        // with every example near its edge.
        let one_fewer = TaskScore { nll: 0.1, exact: 0.7, soft: 0.7 };
        let same_count_unsure = TaskScore { nll: 0.1, exact: 0.8, soft: 0.45 };
        assert!(j.regret(0, one_fewer) > j.regret(0, same_count_unsure));
        // Even the widest swing of the soft share stays under one example's weight.
        let worst_tie = TaskScore { nll: 0.1, exact: 0.8, soft: 0.0 };
        let best_fewer = TaskScore { nll: 0.1, exact: 0.7, soft: 1.0 };
        assert!(j.regret(0, worst_tie) < j.regret(0, best_fewer));
        // At the same count the surer candidate wins, whatever the NLL says.
        let sure_bad_nll = TaskScore { nll: 1.2, exact: 0.8, soft: 0.75 };
        let unsure_good_nll = TaskScore { nll: 0.1, exact: 0.8, soft: 0.6 };
        assert!(j.regret(0, sure_bad_nll) < j.regret(0, unsure_good_nll));
        // A task its own adapter never reproduces is judged by NLL alone.
        assert_eq!(j.regret(1, TaskScore { nll: 0.85, exact: 0.0, soft: 0.3 }), nll_regret(0.85, 0.5, 1.2));
    }
}
