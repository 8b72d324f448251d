//! What `merge` minimises: how much worse a task's examples fare under a candidate adapter
//! than under the task's own adapter.
//!
//! The default, `exact`, asks what the tests ask: on how many examples does greedy decoding
//! reproduce the completion (the scorer's one-pass verdict, `eval`'s rule), relative to the
//! own adapter's count, with the normalised NLL as a small tie-breaking term. `nll` is the
//! normalised NLL alone, `(nll - nll_own) / (nll_base - nll_own)`: smooth, but it misranked
//! partitions on the quality benchmark (docs/results.md), chiefly by blowing up the noise of
//! tasks whose own adapter is barely better than the base in NLL.

/// Weight of the normalised NLL next to the exact-match loss: one example of ten reproduced
/// or lost (0.1 for a task whose own adapter reproduces all ten) outweighs a candidate that is
/// as bad as the base model in NLL, so NLL only orders candidates that reproduce the same.
pub const NLL_TIE_WEIGHT: f64 = 0.05;

/// A task's examples scored under one adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskScore {
    /// Token-weighted mean NLL of the completions.
    pub nll: f64,
    /// Share of the examples greedy decoding reproduces exactly.
    pub exact: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExampleObjective {
    /// Exact-match loss relative to the own adapter, NLL to break ties.
    Exact,
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
        match self.objective {
            ExampleObjective::Nll => nll,
            ExampleObjective::Exact if own.exact > 0.0 => (own.exact - s.exact) / own.exact + NLL_TIE_WEIGHT * nll,
            ExampleObjective::Exact => nll,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(objective: ExampleObjective) -> Baselines {
        let own = TaskScore { nll: 0.2, exact: 0.8 };
        let base = TaskScore { nll: 1.2, exact: 0.1 };
        Baselines { objective, own: vec![own, TaskScore { nll: 0.5, exact: 0.0 }], base: vec![base, base], tokens: vec![10, 10] }
    }

    #[test]
    fn exact_match_decides_and_nll_only_breaks_ties() {
        let j = judge(ExampleObjective::Exact);
        assert!(j.regret(0, j.own[0]).abs() < 1e-12);
        // One example fewer reproduced, with a better NLL, is still worse than the same count
        // with the base model's NLL.
        let one_fewer = TaskScore { nll: 0.1, exact: 0.7 };
        let same_count_bad_nll = TaskScore { nll: 1.2, exact: 0.8 };
        assert!(j.regret(0, one_fewer) > j.regret(0, same_count_bad_nll));
        // At the same count, the lower NLL wins.
        assert!(j.regret(0, TaskScore { nll: 0.3, exact: 0.8 }) < j.regret(0, TaskScore { nll: 0.6, exact: 0.8 }));
        // A task its own adapter never reproduces is judged by NLL alone.
        assert_eq!(j.regret(1, TaskScore { nll: 0.85, exact: 0.0 }), nll_regret(0.85, 0.5, 1.2));
    }

    #[test]
    fn the_nll_objective_ignores_exact_match() {
        let j = judge(ExampleObjective::Nll);
        let s = TaskScore { nll: 0.7, exact: 0.0 };
        assert!((j.regret(0, s) - 0.5).abs() < 1e-12);
        assert_eq!(j.regret(0, s), j.regret(0, TaskScore { exact: 0.8, ..s }));
    }
}
