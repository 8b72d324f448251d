//! `add` and `remove`: a deployed set changed one task at a time, without a rerun.
//!
//! Both read the manifest (its adapters checked against their hashes, its inputs against
//! theirs), rebuild the run's settings from it, and touch one cluster: `add` scores the new
//! task under every shipped adapter (the screen), re-merges the `--candidates` best clusters
//! with it and scores their members (the objective `merge` uses: the true change), and keeps
//! the best of joining a cluster as it is, joining it re-merged, or (where the count budget has
//! room) keeping its own adapter. `remove` re-merges the task's cluster without it, tuned as
//! `merge` tunes, so that `add` then `remove` gives back the files `merge` wrote. Every other
//! adapter file is copied byte for byte; the output is staged and renamed into place as
//! `merge`'s is, and the manifest records what changed (`lineage`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use super::evaluator::{self, Candidate, ClusterEval, Evaluator, Pool};
use super::inputs::TaskActivations;
use super::options::{Judge, MergeRunOptions, Strategy, Targets};
use super::publish::{cluster_scores, Staging};
use super::targets;
use super::tasks::{self, pick, Task};
use crate::convert::{AdapterSource, PeftScratch};
use crate::error::{Error, Result};
use crate::manifest::{self, AdapterEntry, Change, Manifest};
use crate::merge::{self, Method};
use crate::score::ScoreOptions;

/// What `add` and `remove` are asked to do, besides the task.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    pub manifest: PathBuf,
    /// The base model; default the manifest's. It must be the file the manifest hashed.
    pub base: Option<PathBuf>,
    pub out: PathBuf,
    pub force: bool,
    /// `add`: most adapters the set may hold (default: the manifest's `--budget`); below it
    /// the new task may keep its own adapter.
    pub budget: Option<usize>,
    /// `add`: clusters re-merged with the new task and judged (the best by the screen).
    pub candidates: usize,
    pub threads: Option<i32>,
    pub cache: Option<PathBuf>,
    pub progress: bool,
}

impl UpdateOptions {
    pub fn new(manifest: PathBuf, out: PathBuf) -> Self {
        UpdateOptions { manifest, base: None, out, force: false, budget: None, candidates: 3, threads: None, cache: None, progress: false }
    }
}

/// The task `add` places: its adapter (`.gguf` or PEFT directory) and examples.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub adapter: PathBuf,
    pub samples: PathBuf,
    /// Default: the adapter's file stem (or directory name).
    pub name: Option<String>,
}

/// Places a new task into a deployed set (see the module docs).
pub fn add(opts: &UpdateOptions, new: &NewTask) -> Result<Manifest> {
    let started = Instant::now();
    let set = Deployed::open(opts)?;
    let name = match &new.name {
        Some(n) => n.clone(),
        None => task_name(&new.adapter)?,
    };
    if set.manifest.tasks.contains_key(&name) {
        return Err(Error::Usage(format!("task {name} is already in {} (remove it first, or give --task another name)", opts.manifest.display())));
    }
    let source = adapter_source(&new.adapter)?;
    let mut listed = set.listed(set.manifest.tasks.keys().map(String::as_str))?;
    listed.push((name.clone(), source, new.samples.clone()));
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut work = set.work(listed)?;
    let t = work.index(&name);
    {
        let refs: Vec<&crate::adapter::LoraAdapter> = work.tasks.iter().map(|t| &*t.adapter).collect();
        let names: Vec<String> = work.tasks.iter().map(|t| t.source_path.display().to_string()).collect();
        merge::check_compatible_named(&refs, &names)?;
    }
    let (baselines, own) = evaluator::baselines(&mut work.ev, &work.tasks, work.run.objective, opts.progress)?;
    let activations = TaskActivations::for_run(&work.ev.scorer, &work.run, &work.tasks)?;
    let pool = Pool::new(&work.tasks, own, None, &work.run, activations.as_ref());
    let groups = set.groups(&work.tasks, Some(&name));
    let current: Vec<Candidate> = set.candidates()?;

    // The screen: the task under each adapter as it ships now.
    let mut screen = Vec::with_capacity(groups.len());
    for cand in &current {
        let got = work.ev.scores(Some(cand), &pick(&work.tasks, &[t]))?[0];
        screen.push(baselines.regret(t, got));
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| screen[a].total_cmp(&screen[b]).then(a.cmp(&b)));

    // Every option's change of the summed regret. Ties prefer what writes less.
    let mut options: Vec<(f64, Placement)> = order.iter().map(|&c| (screen[c], Placement::Joined(c))).collect();
    for &c in order.iter().take(opts.candidates) {
        let members = &groups[c];
        let (method, scale) = set.merge_choice(c, &work.run)?;
        let rank = work.run.rank.expect("from settings");
        // Judged as `merge` judged its clusters: where it cross-fitted, both sides out of
        // sample; else the shipped file's scores are the cluster's as it stands.
        let before_scores = if pool.cross_fits(members, method) {
            pool.judge(&mut work.ev, members, method, scale, rank, &work.tasks, members, 1.0)?
        } else {
            work.ev.scores(Some(&current[c]), &pick(&work.tasks, members))?
        };
        let before: f64 = before_scores.iter().zip(members).map(|(&g, &i)| baselines.regret(i, g)).sum();
        let with_t = with_member(members, t);
        let got = pool.judge(&mut work.ev, &with_t, method, scale, rank, &work.tasks, &with_t, 1.0)?;
        let after: f64 = got.iter().zip(&with_t).map(|(&g, &i)| baselines.regret(i, g)).sum();
        options.push((after - before, Placement::ReMerged(c)));
    }
    let budget = opts.budget.or(set.budget).unwrap_or(groups.len());
    if groups.len() < budget {
        let got = work.ev.scores(Some(&pool.own[t]), &pick(&work.tasks, &[t]))?[0];
        options.push((baselines.regret(t, got), Placement::Own));
    }
    let (_, placement) = options.iter().copied().min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.rank().cmp(&b.1.rank()))).expect("a set has adapters");

    let rank = work.run.rank.expect("from settings");
    let mut next = set.manifest.clone();
    let mut scales: Vec<f32> = work.tasks.iter().map(|task| set.manifest.task_scale(&task.name)).collect();
    let (c, members, chosen, file) = match placement {
        Placement::Joined(c) => {
            let members = with_member(&groups[c], t);
            // The task is not in the merge it joins: its examples are out of sample as they are.
            scales[t] = super::tune::climb_scales(&mut work.ev, &pool, &baselines, &work.run, &[t], &current[c], None)?[0];
            (c, members, ClusterEval { candidate: current[c].clone(), choice: set.manifest.adapters[c].merge.clone() }, None)
        }
        Placement::ReMerged(c) => {
            let members = with_member(&groups[c], t);
            let chosen = super::tune::tune_merges(&mut work.ev, &pool, &baselines, &work.run, std::slice::from_ref(&members), rank)?.remove(0);
            for (&i, s) in members.iter().zip(super::tune::climb_scales(
                &mut work.ev,
                &pool,
                &baselines,
                &work.run,
                &members,
                &chosen.candidate,
                chosen.merged_by(),
            )?) {
                scales[i] = s;
            }
            let file = set.manifest.adapters[c].file.clone();
            (c, members, chosen, Some(file))
        }
        Placement::Own => {
            let c = next.adapters.len();
            next.adapters.push(AdapterEntry {
                file: free_file_name(&set.manifest),
                blake3: String::new(),
                bytes: 0,
                rank: 0,
                target_ranks: None,
                dtype: String::new(),
                tasks: vec![],
                merge: None,
            });
            scales[t] = 1.0;
            let file = next.adapters[c].file.clone();
            (c, vec![t], ClusterEval { candidate: pool.own[t].clone(), choice: None }, Some(file))
        }
    };
    next.tasks.insert(name.clone(), c);
    if let (Some(counts), Some(&n)) = (next.settings.get_mut("targets_replaced").and_then(Value::as_object_mut), work.replaced_targets.get(t)) {
        counts.insert(name.clone(), n.into());
    }
    set_adapter(&mut next.adapters[c], &chosen, members.iter().map(|&i| work.tasks[i].name.clone()).collect());
    for (i, got) in cluster_scores(&mut work.ev, &work.tasks, &baselines, c, &members, &chosen.candidate, &scales)? {
        next.scores.insert(work.tasks[i].name.clone(), got);
    }
    for &i in &members {
        next.task_scales.insert(work.tasks[i].name.clone(), scales[i]);
    }
    let new_input = tasks::input_entries(std::slice::from_ref(&work.tasks[t]))?;
    next.storage.input_bytes += file_len(&work.tasks[t].adapter_path)?;
    next.inputs.extend(new_input);
    let written: Vec<(String, PathBuf)> = file.iter().map(|f| (f.clone(), chosen.candidate.path.clone())).collect();
    let change = Change {
        change: "add".into(),
        task: name,
        previous_manifest_blake3: set.manifest_hash.clone(),
        placement: placement.name().into(),
        written: file.into_iter().collect(),
        removed: vec![],
        scored_sequences: work.ev.scored_sequences,
        cached_sequences: work.ev.cached_sequences,
        seconds: 0.0,
    };
    set.publish(next, change, &written, started, work.staging)
}

/// Drops a task from a deployed set: its cluster is re-merged without it (tuned as `merge`
/// tunes), or its file dropped where it was alone.
pub fn remove(opts: &UpdateOptions, task: &str) -> Result<Manifest> {
    let started = Instant::now();
    let set = Deployed::open(opts)?;
    let Some(&c) = set.manifest.tasks.get(task) else {
        return Err(Error::Usage(format!(
            "task {task} is not in {} (its tasks: {})",
            opts.manifest.display(),
            set.manifest.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    };
    let cluster: Vec<String> = set.manifest.tasks.iter().filter(|(_, &a)| a == c).map(|(t, _)| t.clone()).collect();
    let mut work = set.work(set.listed(cluster.iter().map(String::as_str))?)?;
    let t = work.index(task);
    let mut next = set.manifest.clone();
    next.tasks.remove(task);
    next.task_scales.remove(task);
    if let Some(counts) = next.settings.get_mut("targets_replaced").and_then(Value::as_object_mut) {
        counts.remove(task);
    }
    next.scores.remove(task);
    next.inputs.remove(task);
    next.storage.input_bytes = next.storage.input_bytes.saturating_sub(file_len(&work.tasks[t].adapter_path)?);
    let rest: Vec<usize> = (0..work.tasks.len()).filter(|&i| i != t).collect();
    let (placement, written, removed) = if rest.is_empty() {
        let gone = next.adapters.remove(c);
        for a in next.tasks.values_mut().chain(next.scores.values_mut().map(|s| &mut s.adapter)) {
            if *a > c {
                *a -= 1;
            }
        }
        ("dropped", vec![], vec![gone.file])
    } else {
        let (baselines, own) = evaluator::baselines(&mut work.ev, &work.tasks, work.run.objective, opts.progress)?;
        let activations = TaskActivations::for_run(&work.ev.scorer, &work.run, &work.tasks)?;
        let pool = Pool::new(&work.tasks, own, None, &work.run, activations.as_ref());
        let rank = work.run.rank.expect("from settings");
        let chosen = super::tune::tune_merges(&mut work.ev, &pool, &baselines, &work.run, std::slice::from_ref(&rest), rank)?.remove(0);
        let mut scales = vec![1.0f32; work.tasks.len()];
        if rest.len() > 1 {
            for (&i, s) in
                rest.iter().zip(super::tune::climb_scales(&mut work.ev, &pool, &baselines, &work.run, &rest, &chosen.candidate, chosen.merged_by())?)
            {
                scales[i] = s;
            }
        }
        set_adapter(&mut next.adapters[c], &chosen, rest.iter().map(|&i| work.tasks[i].name.clone()).collect());
        for (i, got) in cluster_scores(&mut work.ev, &work.tasks, &baselines, c, &rest, &chosen.candidate, &scales)? {
            next.scores.insert(work.tasks[i].name.clone(), got);
            next.task_scales.insert(work.tasks[i].name.clone(), scales[i]);
        }
        let file = next.adapters[c].file.clone();
        ("re-merged", vec![(file, chosen.candidate.path.clone())], vec![])
    };
    let change = Change {
        change: "remove".into(),
        task: task.to_owned(),
        previous_manifest_blake3: set.manifest_hash.clone(),
        placement: placement.into(),
        written: written.iter().map(|(f, _)| f.clone()).collect(),
        removed,
        scored_sequences: work.ev.scored_sequences,
        cached_sequences: work.ev.cached_sequences,
        seconds: 0.0,
    };
    set.publish(next, change, &written, started, work.staging)
}

#[derive(Debug, Clone, Copy)]
enum Placement {
    Joined(usize),
    ReMerged(usize),
    Own,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Joined(_) => "joined",
            Placement::ReMerged(_) => "re-merged",
            Placement::Own => "own",
        }
    }

    /// Among equally good options, the one that writes less.
    fn rank(self) -> u8 {
        match self {
            Placement::Joined(_) => 0,
            Placement::ReMerged(_) => 1,
            Placement::Own => 2,
        }
    }
}

/// A manifest read and checked for an update: every shipped file against its hash, the base
/// against the manifest's, and the settings `merge` recorded.
struct Deployed<'a> {
    opts: &'a UpdateOptions,
    manifest: Manifest,
    manifest_hash: String,
    dir: PathBuf,
    base: PathBuf,
    run: MergeRunOptions,
    budget: Option<usize>,
}

/// What an update scores with: the tasks it reads, a scorer, and the output being staged.
struct Work {
    tasks: Vec<Task>,
    ev: Evaluator,
    run: MergeRunOptions,
    /// Per task, how many examples `--targets own` replaced (empty under the written ones).
    replaced_targets: Vec<usize>,
    staging: Staging,
    _scratch: PeftScratch,
}

impl Work {
    fn index(&self, task: &str) -> usize {
        self.tasks.iter().position(|t| t.name == task).expect("listed")
    }
}

impl<'a> Deployed<'a> {
    fn open(opts: &'a UpdateOptions) -> Result<Self> {
        let path = &opts.manifest;
        let manifest = Manifest::read(path)?;
        let manifest_hash = manifest::hash_file(path)?;
        let dir = crate::fsutil::parent_dir(path);
        check_out(opts, &dir)?;
        let base = opts.base.clone().unwrap_or_else(|| manifest.base.file.clone());
        let base_hash = manifest::hash_file(&base)?;
        if base_hash != manifest.base.blake3 {
            return Err(Error::Usage(format!(
                "base model {} (blake3 {base_hash}) is not the one {} was merged for ({}, blake3 {}): the adapters and scores would not fit it",
                base.display(),
                path.display(),
                manifest.base.file.display(),
                manifest.base.blake3
            )));
        }
        for entry in &manifest.adapters {
            let file = dir.join(&entry.file);
            if !file.is_file() {
                return Err(Error::invalid(path, format!("adapters.{}", entry.file), format!("{} is missing", file.display())));
            }
            let actual = manifest::hash_file(&file)?;
            if actual != entry.blake3 {
                return Err(Error::invalid(&file, "blake3", format!("is {actual}, the manifest {} says {}", path.display(), entry.blake3)));
            }
        }
        let (run, budget) = settings(&manifest, path, opts, &base)?;
        Ok(Deployed { opts, manifest, manifest_hash, dir, base, run, budget })
    }

    /// (task, adapter, examples) of `names`, from the manifest's `inputs`.
    fn listed<'n>(&self, names: impl Iterator<Item = &'n str>) -> Result<Vec<(String, AdapterSource, PathBuf)>> {
        names
            .map(|name| {
                let input = self.manifest.inputs.get(name).ok_or_else(|| {
                    Error::invalid(
                        &self.opts.manifest,
                        format!("inputs.{name}"),
                        "missing: this manifest does not say where the task's adapter and examples are (it predates `add`; rerun `merge`)",
                    )
                })?;
                Ok((name.to_owned(), adapter_source(&input.adapter)?, input.samples.clone()))
            })
            .collect()
    }

    /// Reads the tasks (the listed inputs checked against their recorded hashes) and opens the
    /// scorer and the output.
    fn work(&self, listed: Vec<(String, AdapterSource, PathBuf)>) -> Result<Work> {
        let mut scratch = PeftScratch::default();
        let (tasks, _) = tasks::read_listed(&self.base, listed, self.run.score_end, &mut scratch)?;
        for task in &tasks {
            let Some(recorded) = self.manifest.inputs.get(&task.name) else { continue };
            for (what, file, want) in
                [("adapter_blake3", &task.adapter_path, &recorded.adapter_blake3), ("samples_blake3", &task.samples_path, &recorded.samples_blake3)]
            {
                let have = manifest::hash_file(file)?;
                if &have != want {
                    return Err(Error::invalid(
                        &self.opts.manifest,
                        format!("inputs.{}.{what}", task.name),
                        format!(
                            "{} changed since the set was merged (blake3 {have}, recorded {want}): re-merging with it would not give the set back",
                            file.display()
                        ),
                    ));
                }
            }
        }
        // Generated only once the inputs are known to be the ones the set was merged from.
        let (tasks, replaced_targets) = targets::apply(self.run.targets, &self.base, tasks, self.run.threads, self.opts.progress)?;
        let staging = Staging::new(&self.opts.out)?;
        let score_opts = ScoreOptions { threads: self.run.threads, progress: false, end: self.run.score_end, ..ScoreOptions::default() };
        let kernels = self.manifest.settings["cpu_kernels"].as_str().map(str::to_owned).unwrap_or_default();
        let cpu_kernels = crate::llama::cpu_kernels()?;
        if !kernels.is_empty() && kernels != cpu_kernels {
            eprintln!(
                "note: this machine's CPU kernels ({cpu_kernels}) are not the ones {} was scored with ({kernels}): scores are made afresh",
                self.opts.manifest.display()
            );
        }
        let scoring_id = evaluator::scoring_id(&self.manifest.base.blake3, &cpu_kernels);
        let ev = Evaluator::open(&self.base, &scoring_id, score_opts, self.run.cache.as_deref(), staging.work_dir(), self.run.dtype, &tasks)?;
        Ok(Work { tasks, ev, run: self.run.clone(), replaced_targets, staging, _scratch: scratch })
    }

    /// The clusters as task indices into `tasks` (ascending, as `merge` made them), without
    /// `except`.
    fn groups(&self, tasks: &[Task], except: Option<&str>) -> Vec<Vec<usize>> {
        let index: BTreeMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        let mut groups = vec![Vec::new(); self.manifest.adapters.len()];
        for (task, &c) in &self.manifest.tasks {
            if Some(task.as_str()) != except {
                groups[c].push(index[task.as_str()]);
            }
        }
        for g in &mut groups {
            g.sort_unstable();
        }
        groups
    }

    fn candidates(&self) -> Result<Vec<Candidate>> {
        self.manifest.adapters.iter().map(|e| Evaluator::existing(self.dir.join(&e.file), e)).collect()
    }

    /// How cluster `c` was merged (a lone task's own adapter: the run's `--method` at 1).
    fn merge_choice(&self, c: usize, run: &MergeRunOptions) -> Result<(Method, f32)> {
        match &self.manifest.adapters[c].merge {
            Some(choice) => {
                let method =
                    choice.method.parse().map_err(|e: String| Error::invalid(&self.opts.manifest, format!("adapters[{c}].merge.method"), e))?;
                Ok((method, choice.scale))
            }
            None => Ok((run.method, 1.0)),
        }
    }

    /// Writes the updated set: the changed files from where they were built, every other one
    /// copied from the deployed set.
    fn publish(&self, mut next: Manifest, mut change: Change, written: &[(String, PathBuf)], started: Instant, staging: Staging) -> Result<Manifest> {
        if next.task_scales.values().all(|&s| s == 1.0) {
            next.task_scales.clear();
        }
        let n = next.tasks.len();
        next.objective.best = next.scores.values().map(|s| s.regret).sum::<f64>() / n.max(1) as f64;
        next.storage.bytes = next.adapters.iter().map(|a| a.bytes).sum();
        next.storage.n_inputs = n;
        next.storage.n_outputs = next.adapters.len();
        next.storage.count_fraction = next.adapters.len() as f64 / n.max(1) as f64;
        next.storage.byte_fraction = if next.storage.input_bytes > 0 { next.storage.bytes as f64 / next.storage.input_bytes as f64 } else { 0.0 };
        change.seconds = started.elapsed().as_secs_f64();
        next.lineage.push(change);
        let sources: Vec<(&str, PathBuf)> = next
            .adapters
            .iter()
            .map(|a| {
                let from = written.iter().find(|(f, _)| f == &a.file).map(|(_, p)| p.clone()).unwrap_or_else(|| self.dir.join(&a.file));
                (a.file.as_str(), from)
            })
            .collect();
        let files: Vec<(&str, &Path)> = sources.iter().map(|(f, p)| (*f, p.as_path())).collect();
        staging.publish_files(&next, &files, &self.opts.out)?;
        Ok(next)
    }
}

/// `merge`'s settings as the manifest recorded them, for re-merging as it did; and the count
/// budget. Sets whose files a byte budget shaped cannot be re-merged one cluster at a time.
fn settings(m: &Manifest, path: &Path, opts: &UpdateOptions, base: &Path) -> Result<(MergeRunOptions, Option<usize>)> {
    let s = &m.settings;
    let field = |key: &str| -> Result<&Value> {
        s.get(key).filter(|v| !v.is_null()).ok_or_else(|| Error::invalid(path, format!("settings.{key}"), "missing"))
    };
    let parse = |key: &str| -> Result<String> {
        field(key)?.as_str().map(str::to_owned).ok_or_else(|| Error::invalid(path, format!("settings.{key}"), "not a string"))
    };
    let bad = |key: &str, e: String| Error::invalid(path, format!("settings.{key}"), e);
    let strategy: Strategy = parse("strategy")?.parse().map_err(|e| bad("strategy", e))?;
    if !matches!(strategy, Strategy::D2c | Strategy::Kmeans | Strategy::Anticluster | Strategy::Random | Strategy::Single)
        || !s["budget_bytes"].is_null()
    {
        return Err(Error::invalid(
            path,
            "settings.strategy",
            format!("`add` and `remove` update sets made under a count budget (--budget, strategy d2c, kmeans, anticluster, random or single); this one was made with --strategy {strategy}{}, whose files a byte budget shaped: rerun `merge`", if s["budget_bytes"].is_null() { "" } else { " and --budget-bytes" }),
        ));
    }
    let floats = |key: &str| -> Result<Vec<f32>> {
        field(key)?
            .as_array()
            .ok_or_else(|| bad(key, "not a list".into()))?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| bad(key, format!("{v} is not a number"))))
            .collect()
    };
    let mut run = MergeRunOptions::new(base.to_path_buf(), PathBuf::new(), PathBuf::new(), None, opts.out.clone());
    run.strategy = strategy;
    run.method = parse("method")?.parse().map_err(|e| bad("method", e))?;
    run.rank = Some(field("rank")?.as_u64().ok_or_else(|| bad("rank", "not a count".into()))? as usize);
    run.dtype = parse("dtype")?.parse().map_err(|e| bad("dtype", e))?;
    run.density = field("density")?.as_f64().ok_or_else(|| bad("density", "not a number".into()))? as f32;
    run.seed = field("seed")?.as_u64().ok_or_else(|| bad("seed", "not a count".into()))?;
    run.tune_methods = field("tune_methods")?
        .as_array()
        .ok_or_else(|| bad("tune_methods", "not a list".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().parse().map_err(|e| bad("tune_methods", e)))
        .collect::<Result<_>>()?;
    run.tune_scales = floats("tune_scales")?;
    run.serve_scales = floats("serve_scales")?;
    run.score_end = parse("score_end")?.parse().map_err(|e| bad("score_end", e))?;
    run.objective = parse("objective")?.parse().map_err(|e| bad("objective", e))?;
    // Sets merged before targets were a setting judged the written completions.
    run.targets = match s.get("targets").and_then(Value::as_str) {
        Some(t) => t.parse().map_err(|e| bad("targets", e))?,
        None => Targets::Examples,
    };
    // Sets merged before cross-fitting judged in sample.
    run.judge = match s.get("judge").and_then(Value::as_str) {
        Some(j) => j.parse().map_err(|e| bad("judge", e))?,
        None => Judge::InSample,
    };
    run.threads = opts.threads;
    run.cache = opts.cache.clone();
    run.progress = opts.progress;
    let budget = s["budget"].as_u64().map(|b| b as usize);
    Ok((run, budget))
}

/// The output must be new (or empty, or `--force`), and never the deployed set's directory.
fn check_out(opts: &UpdateOptions, set_dir: &Path) -> Result<()> {
    let out = &opts.out;
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(out), std::fs::canonicalize(set_dir)) {
        if a == b || b.starts_with(&a) {
            return Err(Error::Usage(format!("--out {} holds the set being updated: write the update to a new directory", out.display())));
        }
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::Usage(format!("--out {} exists and is not a directory", out.display())));
        }
        if std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some() && !opts.force {
            return Err(Error::Usage(format!("--out {} is not empty (use --force to replace it)", out.display())));
        }
    }
    Ok(())
}

fn adapter_source(path: &Path) -> Result<AdapterSource> {
    if path.is_dir() {
        if !path.join(crate::convert::ADAPTER_CONFIG).is_file() {
            return Err(Error::Usage(format!(
                "{} is a directory without {}: expected a PEFT adapter directory or a .gguf file",
                path.display(),
                crate::convert::ADAPTER_CONFIG
            )));
        }
        Ok(AdapterSource::Peft(path.to_path_buf()))
    } else if path.is_file() {
        Ok(AdapterSource::Gguf(path.to_path_buf()))
    } else {
        Err(Error::Usage(format!("adapter {} does not exist", path.display())))
    }
}

/// `DIR/name.gguf` or `DIR/name/` -> `name`.
fn task_name(adapter: &Path) -> Result<String> {
    let stem = if adapter.is_dir() { adapter.file_name() } else { adapter.file_stem() };
    stem.and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Error::Usage(format!("cannot name a task after {}: give --task", adapter.display())))
}

fn with_member(members: &[usize], t: usize) -> Vec<usize> {
    let mut out = members.to_vec();
    out.push(t);
    out.sort_unstable();
    out
}

fn set_adapter(entry: &mut AdapterEntry, chosen: &ClusterEval, tasks: Vec<String>) {
    let cand = &chosen.candidate;
    entry.blake3 = cand.hash.clone();
    entry.bytes = cand.bytes;
    entry.rank = cand.rank;
    entry.target_ranks = cand.target_ranks.clone();
    entry.dtype = cand.dtype.to_string();
    entry.tasks = tasks;
    entry.merge = chosen.choice.clone();
}

/// `adapter-NN.gguf` with the first NN no file of the set uses.
fn free_file_name(m: &Manifest) -> String {
    (m.adapters.len()..).map(|i| format!("adapter-{i:02}.gguf")).find(|f| !m.adapters.iter().any(|a| &a.file == f)).expect("an unused name")
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len())
}
