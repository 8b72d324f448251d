//! `merge`: data-driven clustering and merging of N task adapters into K (the D2C method).
//!
//! read adapters -> similarity -> initial clusters -> [merge -> score every task under every
//! merged adapter -> move tasks]* -> tune each cluster's merge -> per-task serve scales ->
//! write adapters + manifest. Under a byte budget the default is instead the allocator
//! (`allocate.rs`): every task its own adapter at the size its examples say is worth the
//! bytes, merging only where nothing else fits. The objective (`crate::objective`) compares
//! each task's examples under a candidate with its own adapter, scored by llama.cpp itself
//! (`evaluator.rs`); the best assignment seen is kept, so D2C never ends worse (on the
//! examples) than the clusters it starts from.
//!
//! One file per stage: `options`, `tasks` (read and check), `score_cache`, `evaluator`
//! (candidates and their scores), `search` (D2C's partition), `tune` (merges and serve
//! scales), `budget` (ranks under a byte budget), `allocate` (the byte allocator), `inputs`
//! (activations for the input-aware merge), `publish`;
//! and `update` (`add` and `remove`: one task into or out of a deployed set).

mod allocate;
mod budget;
mod evaluator;
mod inputs;
mod interference;
mod options;
mod publish;
mod score_cache;
mod search;
mod targets;
mod tasks;
mod tune;
mod update;

use std::collections::BTreeMap;
use std::time::Instant;

pub use options::{Init, Judge, MergeRunOptions, Screen, Strategy, Targets};
pub use search::{move_candidates, take_improving_moves};
pub use update::{add, remove, NewTask, UpdateOptions};

use crate::adapter::LoraAdapter;
use crate::compress;
use crate::convert;
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::merge;
use crate::score::ScoreOptions;
use evaluator::{Candidate, Evaluator, Pool};
use publish::{Outcome, RunFacts, Staging};

pub fn run(opts: &MergeRunOptions) -> Result<Manifest> {
    let started = Instant::now();
    let mut stages = Stages::default();
    check_options(opts)?;
    let mut peft_scratch = convert::PeftScratch::default();
    let (tasks, base_info) = tasks::read(opts, &mut peft_scratch)?;
    let n = tasks.len();
    let max_files = opts.budget.unwrap_or(n);
    if opts.strategy.keeps_every_task() && max_files < n {
        return Err(Error::Usage(format!(
            "--strategy {} keeps one adapter per task: --budget (a cap on files) must be at least the {n} tasks, got {max_files}",
            opts.strategy
        )));
    }
    let k = max_files.min(n);
    let (rank, compressed) = truncations(opts, &tasks)?;
    stages.done("read", started);
    let t = stages.start();
    let (tasks, replaced_targets) = targets::apply(opts.targets, &opts.base, tasks, opts.threads, opts.progress)?;
    if opts.targets != Targets::Examples {
        stages.done("targets", t);
    }

    let base_hash = manifest::hash_file(&opts.base)?;
    let cpu_kernels = crate::llama::cpu_kernels()?;
    let staging = Staging::new(&opts.out)?;
    let t = stages.start();
    let score_opts = ScoreOptions { threads: opts.threads, progress: false, end: opts.score_end, ..ScoreOptions::default() };
    let mut ev = Evaluator::open(
        &opts.base,
        &evaluator::scoring_id(&base_hash, &cpu_kernels),
        score_opts,
        opts.cache.as_deref(),
        staging.work_dir(),
        opts.dtype,
        &tasks,
    )?;
    let (baselines, own) = evaluator::baselines(&mut ev, &tasks, opts.objective, opts.progress)?;
    stages.done("score_own_base", t);
    let compressed: Option<Vec<Candidate>> = match &compressed {
        Some(cut) => Some(cut.iter().map(|a| ev.write_candidate(a, &tasks::input_paths(&tasks))).collect::<Result<_>>()?),
        None => None,
    };
    let t = stages.start();
    let activations = inputs::TaskActivations::for_run(&ev.scorer, opts, &tasks)?;
    if activations.is_some() {
        stages.done("merge_inputs", t);
    }
    let pool = Pool::new(&tasks, own, compressed, opts, activations.as_ref());

    let mut outcome = if opts.strategy == Strategy::Allocate {
        let t = stages.start();
        let inputs = allocate::Inputs {
            pool: &pool,
            baselines: &baselines,
            budget_bytes: opts.budget_bytes.expect("checked above"),
            storage_types: &opts.storage_types,
            max_files,
            merge_rank: tasks.iter().map(|t| t.adapter.max_rank()).max().unwrap_or(1),
            // The pool holds the tasks' inputs whenever --method needs them (TaskActivations::for_run).
            merge_method: opts.method,
        };
        let a = allocate::allocate(&mut ev, &inputs)?;
        stages.done("allocation", t);
        let best_round = a.rounds.len() - 1;
        Outcome { groups: a.groups, chosen: a.chosen, scales: vec![], rounds: a.rounds, best_round, starts: vec![], predicted: vec![], rank }
    } else {
        let k = match opts.strategy {
            Strategy::Single => 1,
            s if s.keeps_every_task() => n,
            _ => k,
        };
        // The activation model, where D2C refines (it needs 1 < k < n).
        let model = if opts.strategy == Strategy::D2c && 1 < k && k < n {
            let t = stages.start();
            let m = interference::measure(&ev.scorer, &opts.base, &tasks, opts.threads, opts.progress)?;
            stages.done("activations", t);
            Some(m)
        } else {
            None
        };
        reset_peak_rss(); // search times its own stages
        let found = search::search(&mut ev, &pool, &baselines, opts, k, rank, model.as_ref(), &mut stages.seconds)?;
        stages.peak("clustering");
        let groups = crate::cluster::clusters_of(&found.assign, k);
        let t = stages.start();
        let mut chosen = tune::tune_merges(&mut ev, &pool, &baselines, opts, &groups, rank)?;
        stages.done("tuning", t);
        // Truncation strategies fitted the bytes already, task by task.
        if let (Some(budget_bytes), false) = (opts.budget_bytes, opts.strategy.keeps_every_task()) {
            let t = stages.start();
            budget::allocate_ranks(&mut ev, &pool, &baselines, budget_bytes, rank, &groups, &mut chosen)?;
            stages.done("rank_allocation", t);
        }
        Outcome {
            groups,
            chosen,
            scales: vec![],
            rounds: found.rounds,
            best_round: found.best_round,
            starts: found.starts,
            predicted: found.predicted,
            rank,
        }
    };
    let t = stages.start();
    outcome.scales = tune::serve_scales(&mut ev, &pool, &baselines, opts, &outcome.groups, &outcome.chosen)?;
    stages.done("serve_scales", t);

    let facts = RunFacts { opts, base_info: &base_info, base_hash, cpu_kernels, replaced_targets: &replaced_targets };
    let manifest = publish::manifest(&mut ev, &tasks, &baselines, facts, &outcome, stages, started)?;
    staging.publish(&manifest, &outcome.chosen, &opts.out)?;
    Ok(manifest)
}

/// Seconds and peak resident memory per stage, for the manifest.
#[derive(Default)]
pub(crate) struct Stages {
    pub seconds: BTreeMap<String, f64>,
    pub peak_mib: BTreeMap<String, f64>,
}

impl Stages {
    /// A stage begins: the clock, and a fresh memory peak.
    fn start(&self) -> Instant {
        reset_peak_rss();
        Instant::now()
    }

    fn done(&mut self, name: &str, started: Instant) {
        self.seconds.insert(name.to_string(), started.elapsed().as_secs_f64());
        self.peak(name);
    }

    fn peak(&mut self, name: &str) {
        if let Some(mib) = peak_rss_mib() {
            self.peak_mib.insert(name.to_string(), mib);
        }
    }
}

/// The most memory the process held resident since the last reset, in MiB (Linux's VmHWM;
/// None elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Starts a new peak: on Linux, writing 5 to clear_refs resets VmHWM to the current size.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A count (`--budget`), bytes (`--budget-bytes`) or both, as the strategy needs; serve
/// scales a manifest can carry.
fn check_options(opts: &MergeRunOptions) -> Result<()> {
    if let Some(bad) = opts.serve_scales.iter().find(|&&s| !(s.is_finite() && s > 0.0 && s <= manifest::MAX_TASK_SCALE)) {
        return Err(Error::Usage(format!("--serve-scales: {bad} is outside (0, {}]", manifest::MAX_TASK_SCALE)));
    }
    if opts.budget == Some(0) {
        return Err(Error::Usage("--budget must be at least 1".into()));
    }
    if opts.budget.is_none() && opts.budget_bytes.is_none() {
        return Err(Error::Usage("give --budget (a number of adapters) or --budget-bytes (their total size), or both".into()));
    }
    if opts.strategy == Strategy::Allocate && opts.budget_bytes.is_none() {
        return Err(Error::Usage("--strategy allocate needs --budget-bytes".into()));
    }
    Ok(())
}

/// The rank merges are made at (`--rank`, else the largest input rank) and, under a
/// truncation strategy, what each task ships instead of its own adapter.
fn truncations(opts: &MergeRunOptions, tasks: &[tasks::Task]) -> Result<(usize, Option<Vec<LoraAdapter>>)> {
    let mut rank = opts.rank.unwrap_or_else(|| tasks.iter().map(|t| t.adapter.max_rank()).max().unwrap_or(8));
    let refs: Vec<&LoraAdapter> = tasks.iter().map(|t| &*t.adapter).collect();
    merge::check_compatible(&refs)?;
    let compressed = match (opts.strategy, opts.budget_bytes) {
        (Strategy::Truncate, Some(bytes)) => {
            let (r, cut) = compress::largest_uniform_rank(&refs, opts.dtype, bytes)?;
            rank = r;
            Some(cut)
        }
        (Strategy::Truncate, None) => Some(refs.iter().map(|a| compress::cut_to_rank(a, rank)).collect::<Result<_>>()?),
        (Strategy::TruncateEnergy, Some(bytes)) => Some(compress::energy_ranks(&refs, opts.dtype, bytes)?.1),
        (Strategy::TruncateEnergy, None) => return Err(Error::Usage("--strategy truncate-energy needs --budget-bytes".into())),
        _ => None,
    };
    Ok((rank, compressed))
}
