//! What `merge` is asked to do: the strategies, where D2C starts, and every option with its
//! default (the command line's `merge` flags take theirs from [`MergeRunOptions::default`]).

use std::path::PathBuf;

use crate::adapter::DType;
use crate::merge::Method;
use crate::objective::ExampleObjective;
use crate::score::CompletionEnd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Weight-space starts (anticlusters, by default) refined by merge -> score -> reassign rounds.
    D2c,
    /// Weight-space clusters only (the paper's k-means baseline).
    Kmeans,
    /// Weight-space anticlusters only: clusters of near-equal size, each gathering adapters
    /// that look unlike one another (alike adapters are the pairs a merge breaks).
    Anticluster,
    /// A seeded random partition.
    Random,
    /// Every task into one adapter.
    Single,
    /// No merging: every task keeps its own adapter, every target cut (truncated SVD) to the
    /// largest uniform rank whose files fit `--budget-bytes` (or to `--rank`).
    Truncate,
    /// No merging: every task keeps its own adapter, with per-target ranks chosen by singular
    /// value energy under `--budget-bytes` (targets may be dropped).
    TruncateEnergy,
    /// Under `--budget-bytes`: every task its own adapter at the size its examples say is worth
    /// the bytes (uniform or per-target ranks, targets dropped below rank 1), merged with
    /// others only where even the smallest sizes do not fit or `--budget` caps the files.
    Allocate,
}

impl Strategy {
    /// Strategies that keep one adapter per task and only make each smaller.
    pub fn keeps_every_task(self) -> bool {
        matches!(self, Strategy::Truncate | Strategy::TruncateEnergy)
    }
}

d2c_format::value_names!(Strategy, "strategy");

/// Where D2C's rounds start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Init {
    /// Weight-space anticlusters (`--strategy anticluster`); k-medoids and the next seeds'
    /// anticlusters are the other starts. The default: from them D2C beat the best of three
    /// random partitions at K = 4, 9 and 18 of 36 (docs/results.md).
    Anticluster,
    /// Weight-space k-medoids.
    Kmeans,
    /// A seeded random partition.
    Random,
}

d2c_format::value_names!(Init, "init");

/// How D2C picks the few moves and swaps it judges each round (by re-merging and scoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Screen {
    /// Every task scored under every cluster's current adapter each round, on its first
    /// `--screen-examples` examples (N x K scorings; the task's own delta is absent from the
    /// clusters it would join, so this only ranks the moves).
    Scored,
    /// The activation model: every task's examples run once through the base model, each
    /// adapter's delta applied to the inputs its projections see, so the effect of any move
    /// (the task's own delta inside) is predicted without scoring. About a third faster than
    /// `scored` at K = 9 of 36, and worse on the quality benchmark (docs/results.md).
    Activations,
}

d2c_format::value_names!(Screen, "screen");

/// How D2C judges a grouping on the examples when its merges are fitted to them (`regmean`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Judge {
    /// Each candidate merged twice, each fit on one half of every member's examples, and each
    /// example scored under the fit that did not see it: how the merge holds on inputs it was
    /// not fitted to, which is what separates groupings on new inputs. Twice the merges, the
    /// same scoring.
    CrossFit,
    /// Fitted and scored on the same examples (every grouping looks nearly as good as the own
    /// adapters under regmean).
    InSample,
}

d2c_format::value_names!(Judge, "judge");

/// What each task's examples are judged against (`targets.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Targets {
    /// The completions as written.
    #[default]
    Examples,
    /// What the task's own adapter answers (greedy, first line), where that differs from the
    /// completion: a merged adapter is held to reproducing its own adapter on every example.
    Own,
}

d2c_format::value_names!(Targets, "targets");

#[derive(Debug, Clone)]
pub struct MergeRunOptions {
    pub base: PathBuf,
    pub adapters_dir: PathBuf,
    pub samples_dir: PathBuf,
    /// Number of output adapters (K); under `--budget-bytes` optional, a cap on files.
    pub budget: Option<usize>,
    pub out: PathBuf,
    pub budget_bytes: Option<u64>,
    pub rank: Option<usize>,
    pub method: Method,
    pub strategy: Strategy,
    pub init: Init,
    pub rounds: usize,
    /// Starts D2C compares before its rounds (the --init one, then others); 1 = --init only.
    pub restarts: usize,
    pub screen: Screen,
    /// Examples per task the scored screen uses (the first ones; 0 = all): it only ranks the
    /// moves to judge, and the judging uses every example.
    pub screen_examples: usize,
    /// How the starts, the screen and the judged moves score a cluster whose merge is fitted
    /// to the examples (the tuning and what ships use the fit on every example).
    pub judge: Judge,
    pub seed: u64,
    pub threads: Option<i32>,
    pub dtype: DType,
    /// Lower-bit storage types the allocator may also ship an adapter in (`lora_a` in the
    /// type, short `lora_b` rows in F16), next to `dtype`.
    pub storage_types: Vec<DType>,
    pub cache: Option<PathBuf>,
    pub force: bool,
    /// Operators and weight multipliers tried per cluster once clusters are fixed; a single
    /// method and scale 1.0 turn tuning off.
    pub tune_methods: Vec<Method>,
    pub tune_scales: Vec<f32>,
    /// Scales each task may be served at, chosen per task on its examples once the adapters
    /// are fixed (`task_scales` in the manifest; free in storage). Just `1` turns it off.
    pub serve_scales: Vec<f32>,
    pub density: f32,
    pub progress: bool,
    /// What is scored after each example's completion.
    pub score_end: CompletionEnd,
    /// What the rounds, the tuning and the allocation minimise on the examples.
    pub objective: ExampleObjective,
    /// What the examples are judged against.
    pub targets: Targets,
}

impl MergeRunOptions {
    /// Every operator a run may merge with: `method`, then the tuning's.
    pub fn merge_methods(&self) -> impl Iterator<Item = Method> + '_ {
        std::iter::once(self.method).chain(self.tune_methods.iter().copied())
    }

    pub fn new(base: PathBuf, adapters_dir: PathBuf, samples_dir: PathBuf, budget: Option<usize>, out: PathBuf) -> Self {
        MergeRunOptions { base, adapters_dir, samples_dir, budget, out, ..MergeRunOptions::default() }
    }
}

/// The defaults, in one place: the command line's `merge` flags take theirs from here.
impl Default for MergeRunOptions {
    fn default() -> Self {
        MergeRunOptions {
            base: PathBuf::new(),
            adapters_dir: PathBuf::new(),
            samples_dir: PathBuf::new(),
            budget: None,
            out: PathBuf::new(),
            budget_bytes: None,
            rank: None,
            method: Method::Regmean,
            strategy: Strategy::D2c,
            init: Init::Anticluster,
            rounds: 6,
            restarts: 4,
            screen: Screen::Scored,
            screen_examples: 3,
            judge: Judge::CrossFit,
            seed: 0,
            threads: None,
            dtype: DType::F16,
            storage_types: vec![DType::Q8_0, DType::Q4_0],
            cache: None,
            force: false,
            tune_methods: vec![Method::Svd, Method::Ties, Method::Dare, Method::Regmean],
            tune_scales: vec![1.0, 1.25, 1.5],
            serve_scales: vec![0.5, 1.0, 1.5, 2.0, 3.0],
            density: 0.5,
            progress: false,
            score_end: CompletionEnd::None,
            objective: ExampleObjective::Exact,
            targets: Targets::Examples,
        }
    }
}
