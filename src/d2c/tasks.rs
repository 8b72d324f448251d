//! The tasks `merge` reads: `DIR/<task>.gguf` (or a PEFT directory `DIR/<task>/`) with its
//! examples `SAMPLES/<task>.jsonl`, every input checked against the base before any work.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::options::MergeRunOptions;
use crate::adapter::LoraAdapter;
use crate::base::BaseModel;
use crate::convert::{self, AdapterSource};
use crate::error::{Error, Result};
use crate::manifest;
use crate::samples::{self, Sample};
use crate::score::CompletionEnd;
use crate::validate;

#[derive(Clone)]
pub(crate) struct Task {
    pub name: String,
    /// What the user gave: the `.gguf` file or the PEFT directory.
    pub source_path: PathBuf,
    /// The GGUF file read (for a PEFT directory, its conversion).
    pub adapter_path: PathBuf,
    pub samples_path: PathBuf,
    /// Shared: views of some of a task's examples ([`Task::examples`]) keep the same adapter.
    pub adapter: Arc<LoraAdapter>,
    pub samples: Vec<Sample>,
    pub samples_hash: String,
}

impl Task {
    /// The same task with only its first `m` examples (its own cache identity).
    pub(crate) fn first_examples(&self, m: usize) -> Task {
        self.examples(0..m)
    }

    /// The same task with only the examples in `range` (clamped to those it has), under its
    /// own cache identity: the full set's hash and the range.
    pub(crate) fn examples(&self, range: Range<usize>) -> Task {
        let end = range.end.min(self.samples.len());
        let start = range.start.min(end);
        let samples_hash = if start == 0 { format!("{}[..{end}]", self.samples_hash) } else { format!("{}[{start}..{end}]", self.samples_hash) };
        Task { samples: self.samples[start..end].to_vec(), samples_hash, ..self.clone() }
    }

    /// Where a cross-fitted judgement splits this task's examples: the first half (rounded up)
    /// and the rest; 0 for a task of one example, which cannot be split.
    pub(crate) fn fold_split(&self) -> usize {
        match self.samples.len() {
            0 | 1 => 0,
            n => n.div_ceil(2),
        }
    }
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

/// Every task, read and checked: adapters that do not fit the base are all reported at once.
/// PEFT directories become GGUF files first, as `convert` writes them, in `scratch` (which
/// must outlive the run): everything after reads files, as it would had the user converted them.
pub(crate) fn read(opts: &MergeRunOptions, scratch: &mut convert::PeftScratch) -> Result<(Vec<Task>, BaseModel)> {
    check_out_dir(opts)?;
    let discovered = discover(&opts.adapters_dir, &opts.samples_dir)?;
    read_listed(&opts.base, discovered, opts.score_end, scratch)
}

/// As [`read`], for tasks named one by one (`add`, `remove`): (task, adapter, examples).
pub(crate) fn read_listed(
    base: &Path,
    listed: Vec<(String, AdapterSource, PathBuf)>,
    score_end: CompletionEnd,
    scratch: &mut convert::PeftScratch,
) -> Result<(Vec<Task>, BaseModel)> {
    let base_info = BaseModel::open(base)?;
    let mut found = Vec::with_capacity(listed.len());
    for (task, source, samples_path) in listed {
        let file = scratch.file(&task, &source, base)?;
        found.push((task, source.path().to_path_buf(), file, samples_path));
    }
    let mut problems = Vec::new();
    for (task, _, adapter_path, _) in &found {
        for p in validate::validate_adapter(&base_info, adapter_path) {
            problems.push(format!("task {task}: {p}"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Usage(format!("input adapters do not fit the base model {}:\n{}", base.display(), problems.join("\n"))));
    }
    let mut tasks = Vec::new();
    for (name, source_path, adapter_path, samples_path) in found {
        let adapter = LoraAdapter::read(&adapter_path)?;
        let samples = samples::read_samples(&samples_path)?;
        if samples.is_empty() {
            return Err(Error::invalid(&samples_path, "samples", format!("task {name} has no examples")));
        }
        let mut samples_hash = manifest::hash_file(&samples_path)?;
        // Cached scores are keyed by this: the same examples scored with their end are others.
        if score_end != CompletionEnd::None {
            samples_hash = format!("{samples_hash}+end-{score_end}");
        }
        tasks.push(Task { name, source_path, adapter_path, samples_path, adapter: Arc::new(adapter), samples, samples_hash });
    }
    Ok((tasks, base_info))
}

/// Where each task came from, with the hashes `add` and `remove` check before re-merging.
pub(crate) fn input_entries(tasks: &[Task]) -> Result<BTreeMap<String, manifest::InputEntry>> {
    let absolute = |p: &Path| std::fs::canonicalize(p).map_err(|e| Error::io(p, e));
    tasks
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                manifest::InputEntry {
                    adapter: absolute(&t.source_path)?,
                    adapter_blake3: manifest::hash_file(&t.adapter_path)?,
                    samples: absolute(&t.samples_path)?,
                    samples_blake3: manifest::hash_file(&t.samples_path)?,
                },
            ))
        })
        .collect()
}

/// The task adapters' files: no candidate may be written over one.
pub(crate) fn input_paths(tasks: &[Task]) -> Vec<&Path> {
    tasks.iter().map(|t| t.adapter_path.as_path()).collect()
}

/// The tasks at `members`, in order.
pub(crate) fn pick<'t>(tasks: &'t [Task], members: &[usize]) -> Vec<&'t Task> {
    members.iter().map(|&i| &tasks[i]).collect()
}
