//! The end of a run: every task scored under what it ships with, the manifest, and the output
//! directory, built in a hidden sibling of `--out` and moved into place only when complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::evaluator::{Candidate, ClusterEval, Evaluator};
use super::options::MergeRunOptions;
use super::tasks::{pick, Task};
use crate::base::BaseModel;
use crate::error::{Error, Result};
use crate::manifest::{self, AdapterEntry, BaseEntry, InterferenceFit, Manifest, Objective, Round, ScoringStats, Storage, TaskScores};
use crate::objective::Baselines;

/// What the stages chose.
pub(crate) struct Outcome {
    pub groups: Vec<Vec<usize>>,
    pub chosen: Vec<ClusterEval>,
    /// Per task, the scale its adapter is served at.
    pub scales: Vec<f32>,
    pub rounds: Vec<Round>,
    pub best_round: usize,
    /// The starts D2C's restarts compared.
    pub starts: Vec<serde_json::Value>,
    /// (activation model's error, scored regret) per (task, cluster) the search scored.
    pub predicted: Vec<(f64, f64)>,
    /// The rank merges were made at.
    pub rank: usize,
}

/// The output being built: a hidden sibling of `--out` whose name says which process builds
/// it (so that a rerun can tell a killed run's leftovers), with a work dir for candidates.
pub(crate) struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    pub(crate) fn new(out: &Path) -> Result<Self> {
        let out_parent = crate::fsutil::parent_dir(out);
        std::fs::create_dir_all(&out_parent).map_err(|e| Error::io(&out_parent, e))?;
        remove_dead_staging(&out_parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{STAGING_PREFIX}{}-", process_identity()))
            .tempdir_in(&out_parent)
            .map_err(|e| Error::io(&out_parent, e))?;
        let staging = Staging { dir };
        let work = staging.work_dir();
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        Ok(staging)
    }

    /// Where candidate adapters are written while the run compares them.
    pub(crate) fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Copies the chosen adapters next to the manifest, writes it, and makes the staging
    /// directory `out`.
    pub(crate) fn publish(self, manifest: &Manifest, chosen: &[ClusterEval], out: &Path) -> Result<()> {
        let files: Vec<(&str, &Path)> =
            manifest.adapters.iter().zip(chosen).map(|(entry, c)| (entry.file.as_str(), c.candidate.path.as_path())).collect();
        self.publish_files(manifest, &files, out)
    }

    /// As [`Self::publish`], each adapter file copied from where it is now: (name, source).
    pub(crate) fn publish_files(self, manifest: &Manifest, files: &[(&str, &Path)], out: &Path) -> Result<()> {
        for (name, source) in files {
            let dest = self.dir.path().join(name);
            std::fs::copy(source, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        let manifest_path = self.dir.path().join(manifest::FILE_NAME);
        crate::fsutil::write_atomic(&manifest_path, &[], |f| f.write_all(manifest.to_json().as_bytes()))?;
        let work = self.work_dir();
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        publish(self.dir, out)
    }
}

/// Every member of cluster `c` scored under `candidate` at its serve scale (`scales` by task),
/// as the manifest reports it.
pub(crate) fn cluster_scores(
    ev: &mut Evaluator,
    tasks: &[Task],
    baselines: &Baselines,
    c: usize,
    members: &[usize],
    candidate: &Candidate,
    scales: &[f32],
) -> Result<Vec<(usize, TaskScores)>> {
    let mut out = Vec::with_capacity(members.len());
    // One scoring call per scale in the cluster: they batch (and most are cached).
    let mut cluster_scales: Vec<f32> = members.iter().map(|&i| scales[i]).collect();
    cluster_scales.sort_by(f32::total_cmp);
    cluster_scales.dedup();
    for scale in cluster_scales {
        let at: Vec<usize> = members.iter().copied().filter(|&i| scales[i] == scale).collect();
        let got = ev.scores_at(Some(candidate), scale, &pick(tasks, &at))?;
        for (&i, &got) in at.iter().zip(&got) {
            out.push((
                i,
                TaskScores {
                    adapter: c,
                    nll_own: baselines.own[i].nll,
                    nll_base: baselines.base[i].nll,
                    nll_merged: got.nll,
                    exact_own: baselines.own[i].exact,
                    exact_base: baselines.base[i].exact,
                    exact_merged: got.exact,
                    soft_own: baselines.own[i].soft,
                    soft_merged: got.soft,
                    regret: baselines.regret(i, got),
                    examples: tasks[i].samples.len(),
                    tokens: baselines.tokens[i],
                },
            ));
        }
    }
    Ok(out)
}

/// How the run was set up, for the manifest.
pub(crate) struct RunFacts<'a> {
    pub opts: &'a MergeRunOptions,
    pub base_info: &'a BaseModel,
    pub base_hash: String,
    pub cpu_kernels: String,
    /// Per task, how many of its examples `--targets own` replaced (empty otherwise).
    pub replaced_targets: &'a [usize],
}

/// The manifest of a finished run: every task scored under the adapter (and scale) it ships
/// with, the storage, the scoring work and the seconds per stage.
pub(crate) fn manifest(
    ev: &mut Evaluator,
    tasks: &[Task],
    baselines: &Baselines,
    facts: RunFacts<'_>,
    outcome: &Outcome,
    stages: super::Stages,
    started: std::time::Instant,
) -> Result<Manifest> {
    let opts = facts.opts;
    let n = tasks.len();
    let mut scores = BTreeMap::new();
    let mut task_to_adapter = BTreeMap::new();
    let mut task_scales = BTreeMap::new();
    for (c, members) in outcome.groups.iter().enumerate() {
        for (i, got) in cluster_scores(ev, tasks, baselines, c, members, &outcome.chosen[c].candidate, &outcome.scales)? {
            task_to_adapter.insert(tasks[i].name.clone(), c);
            task_scales.insert(tasks[i].name.clone(), outcome.scales[i]);
            scores.insert(tasks[i].name.clone(), got);
        }
    }
    let final_regret: f64 = scores.values().map(|s| s.regret).sum();
    // A set where every scale is 1 reads as one written before scales existed.
    if task_scales.values().all(|&s| s == 1.0) {
        task_scales.clear();
    }
    let mut adapters = Vec::with_capacity(outcome.groups.len());
    let mut total_bytes = 0;
    for (c, members) in outcome.groups.iter().enumerate() {
        let cand = &outcome.chosen[c].candidate;
        total_bytes += cand.bytes;
        adapters.push(AdapterEntry {
            file: format!("adapter-{c:02}.gguf"),
            blake3: cand.hash.clone(),
            bytes: cand.bytes,
            rank: cand.rank,
            target_ranks: cand.target_ranks.clone(),
            dtype: cand.dtype.to_string(),
            tasks: members.iter().map(|&i| tasks[i].name.clone()).collect(),
            merge: outcome.chosen[c].choice.clone(),
        });
    }
    let input_bytes: u64 = tasks.iter().map(|t| std::fs::metadata(&t.adapter_path).map(|m| m.len()).unwrap_or(0)).sum();
    let base_abs = std::fs::canonicalize(&opts.base).map_err(|e| Error::io(&opts.base, e))?;
    let base_bytes = std::fs::metadata(&opts.base).map_err(|e| Error::io(&opts.base, e))?.len();
    let super::Stages { seconds: mut timings, peak_mib } = stages;
    timings.insert("total".to_string(), started.elapsed().as_secs_f64());
    Ok(Manifest {
        format: manifest::FORMAT.to_string(),
        tool: format!("d2c-gguf {}", env!("CARGO_PKG_VERSION")),
        base: BaseEntry { file: base_abs, blake3: facts.base_hash, architecture: facts.base_info.architecture.clone(), bytes: base_bytes },
        adapters,
        tasks: task_to_adapter,
        task_scales,
        settings: json!({
            "budget": opts.budget,
            "budget_bytes": opts.budget_bytes,
            "rank": outcome.rank,
            "method": opts.method.to_string(),
            "strategy": opts.strategy.to_string(),
            "init": opts.init.to_string(),
            "rounds": opts.rounds,
            "restarts": opts.restarts,
            "screen": opts.screen.to_string(),
            "screen_examples": opts.screen_examples,
            "judge": opts.judge.to_string(),
            "starts": outcome.starts,
            "seed": opts.seed,
            "dtype": opts.dtype.to_string(),
            "storage_types": opts.storage_types.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "density": opts.density,
            "tune_methods": opts.tune_methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "tune_scales": opts.tune_scales,
            "serve_scales": opts.serve_scales,
            "score_end": opts.score_end.to_string(),
            "cpu_kernels": facts.cpu_kernels,
            "objective": opts.objective.to_string(),
            "objective_definition": opts.objective.description(),
            "targets": opts.targets.to_string(),
            "targets_replaced": tasks.iter().zip(facts.replaced_targets).map(|(t, &n)| (t.name.clone(), n)).collect::<BTreeMap<_, _>>(),
        }),
        objective: Objective { initial: outcome.rounds[0].objective, best: final_regret / n as f64, best_round: outcome.best_round },
        rounds: outcome.rounds.clone(),
        scores,
        storage: Storage {
            bytes: total_bytes,
            input_bytes,
            n_inputs: n,
            n_outputs: outcome.groups.len(),
            count_fraction: outcome.groups.len() as f64 / n as f64,
            byte_fraction: if input_bytes > 0 { total_bytes as f64 / input_bytes as f64 } else { 0.0 },
            budget_bytes: opts.budget_bytes,
        },
        scoring: ScoringStats { scored_sequences: ev.scored_sequences, cached_sequences: ev.cached_sequences },
        interference: (!outcome.predicted.is_empty()).then(|| {
            let (model, scored): (Vec<f64>, Vec<f64>) = outcome.predicted.iter().copied().unzip();
            let rho = crate::interference::spearman(&model, &scored);
            InterferenceFit { pairs: model.len(), spearman: rho.is_finite().then_some(rho) }
        }),
        timings,
        peak_memory_mib: peak_mib,
        inputs: super::tasks::input_entries(tasks)?,
        lineage: Vec::new(),
    })
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
