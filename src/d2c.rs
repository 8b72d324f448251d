//! `merge`: data-driven clustering and merging of N task adapters into K (the D2C method).
//!
//! read adapters -> similarity -> initial clusters -> [merge -> score every task under every
//! merged adapter -> reassign]* -> tune each cluster's merge -> write adapters + manifest.
//! Under a byte budget the default is instead the allocator (`allocate.rs`): every task its
//! own adapter at the size its examples say is worth the bytes, merging only where nothing
//! else fits. The objective (`objective.rs`) compares each task's examples under a candidate
//! with its own adapter, scored by llama.cpp itself (`evaluator.rs`); the best assignment seen
//! is kept, so D2C never ends worse (on the examples) than the clusters it starts from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::adapter::{DType, LoraAdapter, KEY_TASK_NAME};
use crate::base::BaseModel;
use crate::cluster::{self, Assignment};
use crate::compress;
use crate::convert::{self, AdapterSource};
use crate::error::{Error, Result};
use crate::evaluator::{Candidate, Evaluator, ScoreCache};
use crate::gguf::Value;
use crate::manifest::{self, AdapterEntry, BaseEntry, Manifest, MergeChoice, Objective, Round, ScoringStats, Storage, TaskScores};
use crate::merge::{self, MergeOptions, Method};
use crate::objective::{ExampleObjective, Judge, TaskScore};
use crate::samples::{self, Sample};
use crate::score::{CompletionEnd, ScoreOptions, Scorer};
use crate::similarity;
use crate::validate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Weight-space clusters refined by merge -> score -> reassign rounds.
    D2c,
    /// Weight-space clusters only (the paper's k-means baseline).
    Kmeans,
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
    /// Weight-space k-medoids.
    Kmeans,
    /// A seeded random partition.
    Random,
}

d2c_format::value_names!(Init, "init");

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
    pub density: f32,
    pub progress: bool,
    /// What is scored after each example's completion.
    pub score_end: CompletionEnd,
    /// What the rounds, the tuning and the allocation minimise on the examples.
    pub objective: ExampleObjective,
}

impl MergeRunOptions {
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
            method: Method::Svd,
            strategy: Strategy::D2c,
            init: Init::Kmeans,
            rounds: 6,
            restarts: 4,
            seed: 0,
            threads: None,
            dtype: DType::F16,
            storage_types: vec![DType::Q8_0, DType::Q4_0],
            cache: None,
            force: false,
            tune_methods: vec![Method::Svd, Method::Ties, Method::Dare],
            tune_scales: vec![1.0, 1.25, 1.5],
            density: 0.5,
            progress: false,
            score_end: CompletionEnd::None,
            objective: ExampleObjective::Exact,
        }
    }
}

pub(crate) struct Task {
    pub name: String,
    pub adapter_path: PathBuf,
    pub adapter: LoraAdapter,
    pub samples: Vec<Sample>,
    pub samples_hash: String,
}

/// Task names from `DIR/<task>.gguf` (or PEFT directories `DIR/<task>/`) and
/// `SAMPLES/<task>.jsonl`; every mismatch is reported.
fn discover(adapters_dir: &Path, samples_dir: &Path) -> Result<Vec<(String, AdapterSource, PathBuf)>> {
    let list = |dir: &Path, ext: &str| -> Result<BTreeMap<String, PathBuf>> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut out = BTreeMap::new();
        for entry in rd {
            let p = entry.map_err(|e| Error::io(dir, e))?.path();
            if p.extension().and_then(|e| e.to_str()) == Some(ext) && p.is_file() {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    out.insert(stem.to_string(), p.clone());
                }
            }
        }
        Ok(out)
    };
    let adapters = convert::task_adapters(adapters_dir)?;
    let samples = list(samples_dir, "jsonl")?;
    let mut problems = Vec::new();
    for (task, source) in &adapters {
        let p = source.path();
        if !samples.contains_key(task) {
            problems.push(format!(
                "task {task}: adapter {} has no samples file {}",
                p.display(),
                samples_dir.join(format!("{task}.jsonl")).display()
            ));
        }
    }
    for (task, p) in &samples {
        if !adapters.contains_key(task) {
            problems.push(format!("task {task}: samples {} have no adapter {}", p.display(), adapters_dir.join(format!("{task}.gguf")).display()));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Usage(problems.join("\n")));
    }
    if adapters.is_empty() {
        return Err(Error::Usage(format!(
            "no adapters in {}: expected <task>.gguf files or PEFT directories <task>/ with {}",
            adapters_dir.display(),
            convert::ADAPTER_CONFIG
        )));
    }
    Ok(adapters
        .into_iter()
        .map(|(t, a)| {
            let s = samples[&t].clone();
            (t, a, s)
        })
        .collect())
}

/// Checks the output directory before any work: it must be absent or empty, or `--force`,
/// and it must not contain any input.
fn check_out_dir(opts: &MergeRunOptions) -> Result<()> {
    let out = &opts.out;
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::Usage(format!("--out {} exists and is not a directory", out.display())));
        }
        let non_empty = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some();
        if non_empty && !opts.force {
            return Err(Error::Usage(format!("--out {} is not empty (use --force to replace it)", out.display())));
        }
        let out_abs = std::fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
        for input in [&opts.base, &opts.adapters_dir, &opts.samples_dir] {
            if let Ok(p) = std::fs::canonicalize(input) {
                if p.starts_with(&out_abs) {
                    return Err(Error::Usage(format!("--out {} contains the input {}: refusing to replace it", out.display(), input.display())));
                }
            }
        }
    }
    Ok(())
}

pub(crate) struct ClusterEval {
    pub candidate: Candidate,
    pub choice: Option<MergeChoice>,
}

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
#[allow(clippy::too_many_arguments)]
fn allocate_ranks(
    budget_bytes: u64,
    start_rank: usize,
    groups: &[Vec<usize>],
    tasks: &[Task],
    judge: &Judge,
    chosen: &mut [ClusterEval],
    mut eval: impl FnMut(&[usize], Method, f32, usize, &[&Task]) -> Result<(Candidate, Vec<TaskScore>)>,
) -> Result<()> {
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
        let scored: Vec<&Task> = members.iter().map(|&i| &tasks[i]).collect();
        let (cand, nll) = eval(members, m, s, r, &scored)?;
        let total = members.iter().zip(&nll).map(|(&i, &v)| judge.regret(i, v)).sum();
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
    moves.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    moves.into_iter().take(limit).map(|(_, i, to)| (i, to)).collect()
}

/// One reassignment step from moves whose objective change was measured exactly (negative =
/// better). Each was judged against the current clusters, so only moves between clusters no
/// earlier (better) move of this step touched are taken: what was measured still holds. A
/// cluster never gives away its last task.
pub fn apply_moves(assign: &[usize], k: usize, measured: &[(f64, usize, usize)]) -> Assignment {
    let mut sizes = vec![0usize; k];
    for &c in assign {
        sizes[c] += 1;
    }
    let mut moves: Vec<(f64, usize, usize)> = measured.iter().copied().filter(|m| m.0 < -1e-9).collect();
    moves.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut touched = vec![false; k];
    let mut next = assign.to_vec();
    for (_, task, to) in moves {
        let from = assign[task];
        if touched[from] || touched[to] || sizes[from] < 2 {
            continue;
        }
        next[task] = to;
        sizes[from] -= 1;
        sizes[to] += 1;
        touched[from] = true;
        touched[to] = true;
    }
    next
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
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    pairs.into_iter().take(limit).map(|(_, i, j)| (i, j)).collect()
}

pub fn run(opts: &MergeRunOptions) -> Result<Manifest> {
    let t_start = Instant::now();
    let mut timings = BTreeMap::new();
    if opts.budget == Some(0) {
        return Err(Error::Usage("--budget must be at least 1".into()));
    }
    if opts.budget.is_none() && opts.budget_bytes.is_none() {
        return Err(Error::Usage("give --budget (a number of adapters) or --budget-bytes (their total size), or both".into()));
    }
    if opts.strategy == Strategy::Allocate && opts.budget_bytes.is_none() {
        return Err(Error::Usage("--strategy allocate needs --budget-bytes".into()));
    }
    check_out_dir(opts)?;
    let discovered = discover(&opts.adapters_dir, &opts.samples_dir)?;
    let base_info = BaseModel::open(&opts.base)?;
    // PEFT directories become GGUF files first, as `convert` writes them, kept for the run:
    // everything after reads files, as it would had the user converted them.
    let mut peft_scratch = convert::PeftScratch::default();
    let mut found = Vec::with_capacity(discovered.len());
    for (task, source, samples_path) in discovered {
        let file = peft_scratch.file(&task, &source, &opts.base)?;
        found.push((task, file, samples_path));
    }

    // Everything the user handed in is checked before any expensive work.
    let mut problems = Vec::new();
    for (task, adapter_path, _) in &found {
        for p in validate::validate_adapter(&base_info, adapter_path) {
            problems.push(format!("task {task}: {p}"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Usage(format!("input adapters do not fit the base model {}:\n{}", opts.base.display(), problems.join("\n"))));
    }
    let mut tasks = Vec::new();
    for (name, adapter_path, samples_path) in found {
        let adapter = LoraAdapter::read(&adapter_path)?;
        let samples = samples::read_samples(&samples_path)?;
        if samples.is_empty() {
            return Err(Error::invalid(&samples_path, "samples", format!("task {name} has no examples")));
        }
        let mut samples_hash = manifest::hash_file(&samples_path)?;
        // Cached scores are keyed by this: the same examples scored with their end are others.
        if opts.score_end != CompletionEnd::None {
            samples_hash = format!("{samples_hash}+end-{}", opts.score_end);
        }
        tasks.push(Task { name, adapter_path, adapter, samples, samples_hash });
    }
    let n = tasks.len();
    let max_files = opts.budget.unwrap_or(n);
    if opts.strategy.keeps_every_task() && max_files < n {
        return Err(Error::Usage(format!(
            "--strategy {} keeps one adapter per task: --budget (a cap on files) must be at least the {n} tasks, got {max_files}",
            opts.strategy
        )));
    }
    let k = max_files.min(n);
    let mut rank = opts.rank.unwrap_or_else(|| tasks.iter().map(|t| t.adapter.max_rank()).max().unwrap_or(8));
    let refs: Vec<&LoraAdapter> = tasks.iter().map(|t| &t.adapter).collect();
    merge::check_compatible(&refs)?;
    // What each task ships when it keeps its own adapter under a truncation strategy.
    let compressed: Option<Vec<LoraAdapter>> = match (opts.strategy, opts.budget_bytes) {
        (Strategy::Truncate, Some(bytes)) => {
            let (r, cut) = compress::largest_uniform_rank(&refs, opts.dtype, bytes)?;
            rank = r;
            Some(cut)
        }
        (Strategy::Truncate, None) => Some(refs.iter().map(|a| compress::cut_to_rank(a, rank)).collect::<Result<_>>()?),
        (Strategy::TruncateEnergy, Some(bytes)) => Some(compress::energy_ranks(&refs, opts.dtype, bytes)?.1),
        (Strategy::TruncateEnergy, None) => {
            return Err(Error::Usage("--strategy truncate-energy needs --budget-bytes".into()));
        }
        _ => None,
    };
    drop(refs);
    timings.insert("read".to_string(), t_start.elapsed().as_secs_f64());

    let base_hash = manifest::hash_file(&opts.base)?;
    let cpu_kernels = crate::llama::cpu_kernels()?;
    // Another kernel set scores a little differently: its scores are other cache entries.
    let scoring_id = format!("{base_hash}+{}", &blake3::hash(cpu_kernels.as_bytes()).to_hex()[..16]);
    let base_bytes = std::fs::metadata(&opts.base).map_err(|e| Error::io(&opts.base, e))?.len();
    let out_parent = crate::fsutil::parent_dir(&opts.out);
    std::fs::create_dir_all(&out_parent).map_err(|e| Error::io(&out_parent, e))?;
    remove_dead_staging(&out_parent);
    // Everything is built in a hidden sibling of --out and moved into place at the very end.
    // Its name says which process builds it, so that a rerun can tell a killed run's leftovers.
    let staging = tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-", process_identity()))
        .tempdir_in(&out_parent)
        .map_err(|e| Error::io(&out_parent, e))?;
    let work_dir = staging.path().join("work");
    std::fs::create_dir_all(&work_dir).map_err(|e| Error::io(&work_dir, e))?;

    let t = Instant::now();
    let score_opts = ScoreOptions { threads: opts.threads, progress: false, end: opts.score_end, ..ScoreOptions::default() };
    let scorer = Scorer::new(&opts.base, score_opts)?;
    let mut ev = Evaluator {
        scorer,
        cache: ScoreCache::open(opts.cache.as_deref(), &scoring_id)?,
        work_dir: work_dir.clone(),
        loaded: HashMap::new(),
        dtype: opts.dtype,
        input_targets: tasks.iter().map(|t| t.adapter.targets.len()).max().unwrap_or(0),
        scored_sequences: 0,
        cached_sequences: 0,
    };
    let input_paths: Vec<&Path> = tasks.iter().map(|t| t.adapter_path.as_path()).collect();

    // Ceiling and floor of every task.
    let pb = crate::progress::bar(opts.progress, 2 * n as u64, "own / base scores");
    let task_refs: Vec<&Task> = tasks.iter().collect();
    let base_scores = ev.scores(None, &task_refs)?;
    let task_tokens: Vec<usize> = tasks.iter().map(|t| ev.cache.get(&ev.cache.key("base", &t.samples_hash)).map(|c| c.tokens).unwrap_or(0)).collect();
    pb.inc(n as u64);
    let mut own_scores = Vec::with_capacity(n);
    let mut own_candidates = Vec::with_capacity(n);
    for i in 0..n {
        // The task's own adapter as it would be shipped (in the output dtype).
        let c = ev.write_candidate(&tasks[i].adapter, &input_paths)?;
        own_scores.push(ev.scores(Some(&c), &[&tasks[i]])?[0]);
        own_candidates.push(c);
        pb.inc(1);
    }
    let judge = Judge { objective: opts.objective, own: own_scores, base: base_scores };
    pb.finish_and_clear();
    timings.insert("score_own_base".to_string(), t.elapsed().as_secs_f64());
    let compressed_candidates: Option<Vec<Candidate>> = match &compressed {
        Some(cut) => Some(cut.iter().map(|a| ev.write_candidate(a, &input_paths)).collect::<Result<_>>()?),
        None => None,
    };

    let merge_cluster = |members: &[usize], method: Method, scale: f32, rank: usize| -> Result<LoraAdapter> {
        let inputs: Vec<&LoraAdapter> = members.iter().map(|&i| &tasks[i].adapter).collect();
        let w = scale / members.len() as f32;
        let mo = MergeOptions { method, rank: Some(rank), weights: Some(vec![w; members.len()]), density: opts.density, seed: opts.seed };
        let mut merged = merge::merge(&inputs, &mo)?;
        let names: Vec<&str> = members.iter().map(|&i| tasks[i].name.as_str()).collect();
        merged.metadata.insert(KEY_TASK_NAME.to_string(), Value::String(names.join(",")));
        Ok(merged)
    };

    // Evaluates one cluster at `rank`: a singleton ships its compressed adapter under a
    // truncation strategy, else, at (or above) its own rank, its own adapter unchanged;
    // everything else is merged (a singleton below its rank is truncated).
    let eval_cluster =
        |ev: &mut Evaluator, members: &[usize], method: Method, scale: f32, rank: usize, scored: &[&Task]| -> Result<(Candidate, Vec<TaskScore>)> {
            let cand = if let (Some(cut), [only]) = (&compressed_candidates, members) {
                cut[*only].clone()
            } else if members.len() == 1 && scale == 1.0 && rank >= tasks[members[0]].adapter.max_rank() {
                own_candidates[members[0]].clone()
            } else {
                let merged = merge_cluster(members, method, scale, rank)?;
                ev.write_candidate(&merged, &input_paths)?
            };
            let nll = ev.scores(Some(&cand), scored)?;
            Ok((cand, nll))
        };

    // The starts D2C's restarts compared (manifest settings).
    let mut starts: Vec<serde_json::Value> = Vec::new();
    let (groups, chosen, rounds, best_round) = if opts.strategy == Strategy::Allocate {
        let t = Instant::now();
        let own_rank = tasks.iter().map(|t| t.adapter.max_rank()).max().unwrap_or(1);
        let merge_group = |members: &[usize]| merge_cluster(members, Method::Svd, 1.0, own_rank);
        let inputs = crate::allocate::Inputs {
            tasks: &tasks,
            judge: &judge,
            own_candidates: &own_candidates,
            budget_bytes: opts.budget_bytes.expect("checked above"),
            storage_types: &opts.storage_types,
            max_files,
            merge: &merge_group,
        };
        let a = crate::allocate::allocate(&mut ev, &inputs)?;
        timings.insert("allocation".to_string(), t.elapsed().as_secs_f64());
        let last = a.rounds.len() - 1;
        (a.groups, a.chosen, a.rounds, last)
    } else {
        // Initial clusters.
        let t = Instant::now();
        let similarity = {
            let refs: Vec<&LoraAdapter> = tasks.iter().map(|t| &t.adapter).collect();
            similarity::similarity_matrix(&refs)
        };
        timings.insert("similarity".to_string(), t.elapsed().as_secs_f64());
        let mut assign: Assignment = match (opts.strategy, opts.init) {
            _ if k == n => (0..n).collect(),
            (Strategy::Truncate | Strategy::TruncateEnergy | Strategy::Allocate, _) => (0..n).collect(),
            (Strategy::Single, _) => vec![0; n],
            (Strategy::Random, _) | (Strategy::D2c, Init::Random) => cluster::random_partition(n, k, opts.seed),
            (Strategy::Kmeans, _) | (Strategy::D2c, Init::Kmeans) => cluster::kmedoids(&similarity, k, opts.seed),
        };
        let k = match opts.strategy {
            Strategy::Single => 1,
            s if s.keeps_every_task() => n,
            _ => k,
        };

        let t = Instant::now();
        let refine = opts.strategy == Strategy::D2c && k > 1 && k < n;
        // Restarts: other starts scored on their own members only (K merges, N task scores
        // each, against the N x K of a round), and the rounds refine the best. The objective
        // ranks partitions far better than it finds them by moving tasks one at a time.
        if refine && opts.restarts > 1 {
            let mut options: Vec<(String, Assignment)> = vec![(opts.init.to_string(), cluster::canonical(&assign, k))];
            let mut seed = opts.seed;
            while options.len() < opts.restarts {
                let start = if opts.init == Init::Random && options.len() == 1 {
                    ("kmeans".to_string(), cluster::kmedoids(&similarity, k, opts.seed))
                } else {
                    seed += 1;
                    (format!("random seed {seed}"), cluster::random_partition(n, k, seed))
                };
                let start = (start.0, cluster::canonical(&start.1, k));
                if !options.iter().any(|(_, a)| *a == start.1) {
                    options.push(start);
                } else if seed > opts.seed + 4 * opts.restarts as u64 {
                    break; // few distinct partitions exist
                }
            }
            let mut best_start: Option<(f64, usize)> = None;
            for (si, (_, start)) in options.iter().enumerate() {
                let mut total = 0.0;
                for members in cluster::clusters_of(start, k) {
                    let member_tasks: Vec<&Task> = members.iter().map(|&i| &tasks[i]).collect();
                    let (_, got) = eval_cluster(&mut ev, &members, opts.method, 1.0, rank, &member_tasks)?;
                    total += members.iter().zip(&got).map(|(&i, &g)| judge.regret(i, g)).sum::<f64>();
                }
                let objective = total / n as f64;
                starts.push(json!({"start": options[si].0, "objective": objective}));
                if best_start.is_none_or(|(b, _)| objective < b - 1e-12) {
                    best_start = Some((objective, si));
                }
            }
            assign = options[best_start.expect("at least one start").1].1.clone();
        }
        let mut rounds: Vec<Round> = Vec::new();
        let mut seen: HashSet<Assignment> = HashSet::new();
        let mut best: Option<(f64, Assignment, usize)> = None;
        let max_rounds = if refine { opts.rounds } else { 0 };
        let pb = crate::progress::bar(opts.progress, (max_rounds + 1) as u64, "clustering rounds");
        for round in 0..=max_rounds {
            let (seq0, cached0) = (ev.scored_sequences, ev.cached_sequences);
            seen.insert(assign.clone());
            let groups = cluster::clusters_of(&assign, k);
            // regret[i][c]: task i under cluster c's merged adapter (all pairs when refining).
            let mut regrets = vec![vec![f64::INFINITY; groups.len()]; n];
            for (c, members) in groups.iter().enumerate() {
                let scored: Vec<usize> = if refine { (0..n).collect() } else { members.clone() };
                let scored_tasks: Vec<&Task> = scored.iter().map(|&i| &tasks[i]).collect();
                let (_, nll) = eval_cluster(&mut ev, members, opts.method, 1.0, rank, &scored_tasks)?;
                for (j, &i) in scored.iter().enumerate() {
                    regrets[i][c] = judge.regret(i, nll[j]);
                }
            }
            let own_regret: Vec<f64> = (0..n).map(|i| regrets[i][assign[i]]).collect();
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
            // scores at hand only pick which few to judge.
            let (seq0, cached0) = (ev.scored_sequences, ev.cached_sequences);
            let change_of = |ev: &mut Evaluator, trial: &Assignment, changed: [usize; 2]| -> Result<f64> {
                let mut change = 0.0;
                for c in changed {
                    let members: Vec<usize> = (0..n).filter(|&t| trial[t] == c).collect();
                    let member_tasks: Vec<&Task> = members.iter().map(|&t| &tasks[t]).collect();
                    let (_, got) = eval_cluster(ev, &members, opts.method, 1.0, rank, &member_tasks)?;
                    for (m, &t) in members.iter().enumerate() {
                        change += judge.regret(t, got[m]) - own_regret[t];
                    }
                }
                Ok(change)
            };
            let mut measured = Vec::new();
            for (i, to) in move_candidates(&assign, &regrets, MOVE_CANDIDATES) {
                let mut trial = assign.clone();
                let from = trial[i];
                trial[i] = to;
                if seen.contains(&cluster::canonical(&trial, k)) {
                    continue;
                }
                measured.push((change_of(&mut ev, &trial, [from, to])?, i, to));
            }
            let mut next = cluster::canonical(&apply_moves(&assign, k, &measured), k);
            if next == assign || seen.contains(&next) {
                // No single move helps (a symmetric mix: every task best served at home):
                // swaps of two tasks between clusters, the most promising few.
                let mut best_swap: Option<(f64, Assignment)> = None;
                for (i, j) in swap_candidates(&assign, &regrets, SWAP_CANDIDATES) {
                    let mut trial = assign.clone();
                    trial.swap(i, j);
                    let changed = [trial[i], trial[j]];
                    if seen.contains(&cluster::canonical(&trial, k)) {
                        continue;
                    }
                    let change = change_of(&mut ev, &trial, changed)?;
                    if change < -1e-9 && best_swap.as_ref().is_none_or(|(b, _)| change < *b) {
                        best_swap = Some((change, cluster::canonical(&trial, k)));
                    }
                }
                match best_swap {
                    Some((_, trial)) => next = trial,
                    None => {
                        record_extra(&mut rounds, &ev, seq0, cached0);
                        break; // neither a move nor a swap helps: converged
                    }
                }
            }
            record_extra(&mut rounds, &ev, seq0, cached0);
            assign = next;
        }
        pb.finish_and_clear();
        timings.insert("clustering".to_string(), t.elapsed().as_secs_f64());
        let (_, best_assign, best_round) = best.expect("at least one round");

        // Data-driven merge: per cluster, the operator and weight multiplier that serve its own
        // tasks best on their examples.
        let t = Instant::now();
        let groups = cluster::clusters_of(&best_assign, k);
        let mut chosen: Vec<ClusterEval> = Vec::with_capacity(groups.len());
        let n_candidates = opts.tune_methods.len() * opts.tune_scales.len();
        let pb = crate::progress::bar(opts.progress, groups.len() as u64, "tuning merges");
        for members in &groups {
            let member_tasks: Vec<&Task> = members.iter().map(|&i| &tasks[i]).collect();
            let cluster_objective =
                |nll: &[TaskScore]| -> f64 { members.iter().zip(nll).map(|(&i, &v)| judge.regret(i, v)).sum::<f64>() / members.len() as f64 };
            if members.len() == 1 {
                let (cand, _) = eval_cluster(&mut ev, members, opts.method, 1.0, rank, &member_tasks)?;
                chosen.push(ClusterEval { candidate: cand, choice: None });
                pb.inc(1);
                continue;
            }
            let mut options: Vec<(Method, f32)> = vec![(opts.method, 1.0)];
            if n_candidates > 0 {
                for &m in &opts.tune_methods {
                    for &s in &opts.tune_scales {
                        if !options.contains(&(m, s)) {
                            options.push((m, s));
                        }
                    }
                }
            }
            let mut best_here: Option<(f64, Candidate, Method, f32)> = None;
            for (m, s) in options {
                let (cand, nll) = eval_cluster(&mut ev, members, m, s, rank, &member_tasks)?;
                let obj = cluster_objective(&nll);
                if best_here.as_ref().is_none_or(|(b, ..)| obj < *b - 1e-12) {
                    best_here = Some((obj, cand, m, s));
                }
            }
            let (obj, cand, m, s) = best_here.expect("at least one option");
            chosen.push(ClusterEval { candidate: cand, choice: Some(MergeChoice { method: m.to_string(), scale: s, cluster_objective: obj }) });
            pb.inc(1);
        }
        pb.finish_and_clear();
        timings.insert("tuning".to_string(), t.elapsed().as_secs_f64());

        // Truncation strategies fitted the bytes already, task by task.
        if let (Some(budget_bytes), false) = (opts.budget_bytes, opts.strategy.keeps_every_task()) {
            let t = Instant::now();
            allocate_ranks(budget_bytes, rank, &groups, &tasks, &judge, &mut chosen, |members, m, s, r, scored| {
                eval_cluster(&mut ev, members, m, s, r, scored)
            })?;
            timings.insert("rank_allocation".to_string(), t.elapsed().as_secs_f64());
        }
        (groups, chosen, rounds, best_round)
    };
    let initial_objective = rounds[0].objective;

    // Final scores of every task under the adapter it ships with.
    let mut scores = BTreeMap::new();
    let mut final_regret = 0.0;
    let mut task_to_adapter = BTreeMap::new();
    for (c, members) in groups.iter().enumerate() {
        let member_tasks: Vec<&Task> = members.iter().map(|&i| &tasks[i]).collect();
        let got = ev.scores(Some(&chosen[c].candidate), &member_tasks)?;
        for (j, &i) in members.iter().enumerate() {
            let r = judge.regret(i, got[j]);
            final_regret += r;
            task_to_adapter.insert(tasks[i].name.clone(), c);
            scores.insert(
                tasks[i].name.clone(),
                TaskScores {
                    adapter: c,
                    nll_own: judge.own[i].nll,
                    nll_base: judge.base[i].nll,
                    nll_merged: got[j].nll,
                    exact_own: judge.own[i].exact,
                    exact_base: judge.base[i].exact,
                    exact_merged: got[j].exact,
                    regret: r,
                    examples: tasks[i].samples.len(),
                    tokens: task_tokens[i],
                },
            );
        }
    }
    let final_objective = final_regret / n as f64;

    // Move the chosen adapters next to the manifest; then the staging dir becomes --out.
    let mut adapters = Vec::with_capacity(groups.len());
    let mut total_bytes = 0;
    for (c, members) in groups.iter().enumerate() {
        let file = format!("adapter-{c:02}.gguf");
        let dest = staging.path().join(&file);
        std::fs::copy(&chosen[c].candidate.path, &dest).map_err(|e| Error::io(&dest, e))?;
        total_bytes += chosen[c].candidate.bytes;
        adapters.push(AdapterEntry {
            file,
            blake3: chosen[c].candidate.hash.clone(),
            bytes: chosen[c].candidate.bytes,
            rank: chosen[c].candidate.rank,
            target_ranks: chosen[c].candidate.target_ranks.clone(),
            dtype: chosen[c].candidate.dtype.to_string(),
            tasks: members.iter().map(|&i| tasks[i].name.clone()).collect(),
            merge: chosen[c].choice.clone(),
        });
    }
    let input_bytes: u64 = tasks.iter().map(|t| std::fs::metadata(&t.adapter_path).map(|m| m.len()).unwrap_or(0)).sum();
    let base_abs = std::fs::canonicalize(&opts.base).map_err(|e| Error::io(&opts.base, e))?;
    timings.insert("total".to_string(), t_start.elapsed().as_secs_f64());
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        tool: format!("d2c-gguf {}", env!("CARGO_PKG_VERSION")),
        base: BaseEntry { file: base_abs, blake3: base_hash, architecture: base_info.architecture.clone(), bytes: base_bytes },
        adapters,
        tasks: task_to_adapter,
        settings: json!({
            "budget": opts.budget,
            "budget_bytes": opts.budget_bytes,
            "rank": rank,
            "method": opts.method.to_string(),
            "strategy": opts.strategy.to_string(),
            "init": opts.init.to_string(),
            "rounds": opts.rounds,
            "restarts": opts.restarts,
            "starts": starts,
            "seed": opts.seed,
            "dtype": opts.dtype.to_string(),
            "storage_types": opts.storage_types.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "density": opts.density,
            "tune_methods": opts.tune_methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "tune_scales": opts.tune_scales,
            "score_end": opts.score_end.to_string(),
            "cpu_kernels": cpu_kernels,
            "objective": opts.objective.to_string(),
            "objective_definition": opts.objective.description(),
        }),
        objective: Objective { initial: initial_objective, best: final_objective, best_round },
        rounds,
        scores,
        storage: Storage {
            bytes: total_bytes,
            input_bytes,
            n_inputs: n,
            n_outputs: groups.len(),
            count_fraction: groups.len() as f64 / n as f64,
            byte_fraction: if input_bytes > 0 { total_bytes as f64 / input_bytes as f64 } else { 0.0 },
            budget_bytes: opts.budget_bytes,
        },
        scoring: ScoringStats { scored_sequences: ev.scored_sequences, cached_sequences: ev.cached_sequences },
        timings,
    };
    let manifest_path = staging.path().join(manifest::FILE_NAME);
    crate::fsutil::write_atomic(&manifest_path, &[], |f| f.write_all(manifest.to_json().as_bytes()))?;
    std::fs::remove_dir_all(&work_dir).map_err(|e| Error::io(&work_dir, e))?;
    publish(staging, &opts.out)?;
    Ok(manifest)
}

/// Hidden siblings of --out where runs build their output (see [`remove_dead_staging`]).
const STAGING_PREFIX: &str = ".d2c-merge-";

/// This process as `PID-STARTTIME` (start time in clock ticks from /proc, so that a recycled
/// pid is not mistaken for us), or `PID-0` where /proc is missing.
fn process_identity() -> String {
    let pid = std::process::id();
    format!("{pid}-{}", process_start_time(pid).unwrap_or(0))
}

/// Field 22 of /proc/PID/stat (after the parenthesised command name, which may hold spaces).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the staging dirs next to --out whose run was killed (the process named in the dir
/// name is gone), so that a rerun leaves nothing behind. Only where /proc exists: elsewhere a
/// dead run cannot be told from a live one, and a live run's work is never touched. Best
/// effort: a dir that cannot be removed stays, and the new run goes on.
fn remove_dead_staging(out_parent: &Path) {
    if process_start_time(std::process::id()).is_none() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(out_parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // `<staging>.old` is the user's previous output that a --force run had moved aside when
        // it was killed between its two renames: theirs to delete, never ours.
        if rest.ends_with(".old") {
            continue;
        }
        let mut parts = rest.splitn(3, '-');
        let (Some(Ok(pid)), Some(Ok(start))) = (parts.next().map(str::parse::<u32>), parts.next().map(str::parse::<u64>)) else {
            continue;
        };
        if start != 0 && process_start_time(pid) != Some(start) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Replaces `out` with the finished staging directory in as few steps as the OS allows. On
/// failure nothing is left behind: the staging dir is removed and a previous output restored.
fn publish(staging: tempfile::TempDir, out: &Path) -> Result<()> {
    let staged = staging.keep();
    let result = publish_staged(&staged, out);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

fn publish_staged(staged: &Path, out: &Path) -> Result<()> {
    let mut old = None;
    if out.exists() {
        let is_empty = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none();
        if is_empty {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        } else {
            // --force was checked before any work: move the old output aside first.
            let aside = staged.with_extension("old");
            std::fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
            old = Some(aside);
        }
    }
    if let Err(e) = std::fs::rename(staged, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        return Err(Error::io(out, e));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_between_the_same_two_clusters_are_taken_one_per_step() {
        // Two mixed clusters: each measured move helps, but after the best one the others were
        // judged against clusters that no longer exist.
        let assign = vec![0, 1, 0, 1];
        let measured = vec![(-0.10, 0, 1), (-0.09, 1, 0), (-0.05, 2, 1), (-0.04, 3, 0)];
        let next = apply_moves(&assign, 2, &measured);
        let moved: Vec<usize> = (0..4).filter(|&i| next[i] != assign[i]).collect();
        assert_eq!(moved, vec![0], "only the best move between two clusters: {next:?}");
        // A move that does not lower the objective is never taken.
        assert_eq!(apply_moves(&assign, 2, &[(0.0, 0, 1), (0.2, 1, 0)]), assign);
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
    fn independent_moves_happen_in_one_step_and_no_cluster_empties() {
        let assign = vec![0, 0, 1, 1, 2, 2, 3];
        let measured = vec![
            (-0.5, 0, 1),
            (-0.4, 4, 3), // a different pair of clusters, so it moves in the same step
            (-0.9, 6, 2), // would empty cluster 3
        ];
        assert_eq!(apply_moves(&assign, 4, &measured), vec![1, 0, 1, 1, 3, 2, 3]);
        // The screen never offers a move out of a cluster of one.
        let regrets = vec![vec![0.1, 0.9]; 3];
        assert!(move_candidates(&[0, 0, 1], &regrets, 8).iter().all(|&(i, _)| i != 2));
    }
}
