//! `manifest.json`: what `merge` produced, how, and how well. Read by `report` and by the
//! `d2c-serve` plugin, which routes each task to its adapter after checking the hashes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FORMAT: &str = "d2c-gguf.manifest/1";
pub const FILE_NAME: &str = "manifest.json";
/// Largest serve scale a manifest may carry: far beyond what any grid picks, so only a corrupt
/// or hand-edited file exceeds it.
pub const MAX_TASK_SCALE: f32 = 16.0;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseEntry {
    /// Absolute path of the base model the adapters were merged and scored against.
    pub file: PathBuf,
    pub blake3: String,
    pub architecture: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergeChoice {
    pub method: String,
    /// Multiplier on the plain-average weights (1.0 = average of the deltas).
    pub scale: f32,
    /// Objective (mean normalised regret) of this cluster's tasks with this choice.
    pub cluster_objective: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterEntry {
    /// Relative to the manifest's directory.
    pub file: String,
    pub blake3: String,
    pub bytes: u64,
    pub rank: usize,
    /// Rank per target, where the targets' ranks differ or some were dropped (absent: every
    /// target of the inputs at `rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ranks: Option<std::collections::BTreeMap<String, usize>>,
    pub dtype: String,
    pub tasks: Vec<String>,
    pub merge: Option<MergeChoice>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskScores {
    pub adapter: usize,
    /// Mean NLL (nats/token) of the task's examples under its own input adapter (the ceiling).
    pub nll_own: f64,
    /// ... under no adapter (the floor).
    pub nll_base: f64,
    /// ... under the merged adapter it is assigned to.
    pub nll_merged: f64,
    /// Share of the examples greedy decoding reproduces under the own adapter, the base, and
    /// the adapter the task is assigned to (absent in manifests from before they were kept).
    #[serde(default)]
    pub exact_own: f64,
    #[serde(default)]
    pub exact_base: f64,
    #[serde(default)]
    pub exact_merged: f64,
    /// Mean soft verdict of the examples (each counted by how surely greedy decoding reproduces
    /// it, from its margin) under the own adapter and the assigned one (absent before kept).
    #[serde(default)]
    pub soft_own: f64,
    #[serde(default)]
    pub soft_merged: f64,
    /// The task's term of the objective (`settings.objective`): 0 = as good as its own
    /// adapter; under `nll`, 1 = as bad as no adapter.
    pub regret: f64,
    pub examples: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Round {
    pub round: usize,
    /// Mean normalised regret over tasks for this round's assignment.
    pub objective: f64,
    pub clusters: Vec<Vec<String>>,
    /// Sequences scored by llama.cpp this round, and those answered from the cache instead.
    pub scored_sequences: usize,
    pub cached_sequences: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Storage {
    pub bytes: u64,
    pub input_bytes: u64,
    pub n_inputs: usize,
    pub n_outputs: usize,
    /// Outputs / inputs, by count (the paper's K / N).
    pub count_fraction: f64,
    pub byte_fraction: f64,
    pub budget_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub tool: String,
    pub base: BaseEntry,
    pub adapters: Vec<AdapterEntry>,
    /// task -> index into `adapters`.
    pub tasks: BTreeMap<String, usize>,
    /// task -> the scale its adapter is served at (chosen on its examples once the clusters are
    /// fixed; it costs no storage). A task not listed, and every task of a manifest written
    /// before this key, is served at 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_scales: BTreeMap<String, f32>,
    pub settings: serde_json::Value,
    pub objective: Objective,
    pub rounds: Vec<Round>,
    pub scores: BTreeMap<String, TaskScores>,
    pub storage: Storage,
    pub scoring: ScoringStats,
    /// How well D2C's activation model predicted what scoring found, where it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interference: Option<InterferenceFit>,
    /// Wall-clock seconds per stage: with `peak_memory_mib`, the only parts that differ between
    /// identical runs.
    pub timings: BTreeMap<String, f64>,
    /// Peak resident memory of the process during each stage, in MiB (where the OS says).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peak_memory_mib: BTreeMap<String, f64>,
    /// task -> the adapter and examples it was merged from, so that `add` and `remove` can
    /// re-merge a cluster later (absent in manifests from before they existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, InputEntry>,
    /// What `add` and `remove` changed since `merge` wrote the set, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lineage: Vec<Change>,
}

/// Where one task came from, with hashes that tell a changed input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputEntry {
    /// The `.gguf` file or PEFT directory, absolute.
    pub adapter: PathBuf,
    /// blake3 of the GGUF adapter as merged (for a PEFT directory: as `convert` writes it).
    pub adapter_blake3: String,
    pub samples: PathBuf,
    pub samples_blake3: String,
}

/// One update of a deployed set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// `add` or `remove`.
    pub change: String,
    pub task: String,
    /// blake3 of the manifest.json this one was made from.
    pub previous_manifest_blake3: String,
    /// How the task was placed (`add`: `joined`, `re-merged` or `own`) or its cluster left
    /// (`remove`: `re-merged` or `dropped`).
    pub placement: String,
    /// The adapter files written (others are byte-identical to the previous set's), and those
    /// no longer in the set.
    pub written: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    pub scored_sequences: usize,
    pub cached_sequences: usize,
    pub seconds: f64,
}

/// Work done by llama.cpp over the whole run (ceilings, floors, rounds and merge tuning).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoringStats {
    pub scored_sequences: usize,
    /// Answered from the score cache (same adapter bytes, same examples) instead.
    pub cached_sequences: usize,
}

/// The activation model's relative error against the scored regret over every distinct (task,
/// merged cluster) a D2C search scored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterferenceFit {
    pub pairs: usize,
    /// Spearman's rank correlation (null when fewer than two pairs or one side is constant).
    pub spearman: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Objective {
    pub initial: f64,
    pub best: f64,
    pub best_round: usize,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("line {} column {}", e.line(), e.column()), e.to_string()))?;
        if m.format != FORMAT {
            return Err(Error::invalid(path, "format", format!("expected {FORMAT:?}, found {:?}", m.format)));
        }
        for (task, &i) in &m.tasks {
            if i >= m.adapters.len() {
                return Err(Error::invalid(path, format!("tasks.{task}"), format!("adapter index {i} out of range")));
            }
        }
        for (task, &scale) in &m.task_scales {
            if !m.tasks.contains_key(task) {
                return Err(Error::invalid(path, format!("task_scales.{task}"), "not a task of this manifest (see `tasks`)"));
            }
            if !(scale.is_finite() && scale > 0.0 && scale <= MAX_TASK_SCALE) {
                return Err(Error::invalid(path, format!("task_scales.{task}"), format!("scale {scale} is outside (0, {MAX_TASK_SCALE}]")));
            }
        }
        Ok(m)
    }

    /// The scale `task`'s adapter is served at.
    pub fn task_scale(&self, task: &str) -> f32 {
        self.task_scales.get(task).copied().unwrap_or(1.0)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serialises") + "\n"
    }
}

/// blake3 of a file's bytes, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}
