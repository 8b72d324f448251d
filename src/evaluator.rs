//! Candidate adapters written as they would ship, scored on the tasks' examples by llama.cpp,
//! and the scores cached by content so that no candidate is scored twice (across runs too,
//! with `--cache`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::adapter::{DType, LoraAdapter};
use crate::d2c::Task;
use crate::error::{Error, Result};
use crate::objective::TaskScore;
use crate::score::{ScoreJob, Scorer};

/// Scores keyed by content: (base hash and the CPU kernels that score, adapter file hash or
/// "base", samples hash). Optionally appended to a file as they are computed, so an
/// interrupted run resumes without rescoring.
pub(crate) struct ScoreCache {
    map: HashMap<String, Cached>,
    file: Option<(PathBuf, std::fs::File)>,
    scoring_id: String,
}

/// One sample set's score under one adapter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cached {
    pub mean_nll: f64,
    pub tokens: usize,
    /// Samples greedy decoding reproduces, of `samples`.
    pub exact: usize,
    pub samples: usize,
}

impl Cached {
    pub(crate) fn task_score(&self) -> TaskScore {
        TaskScore { nll: self.mean_nll, exact: self.exact as f64 / self.samples.max(1) as f64 }
    }
}

impl ScoreCache {
    pub(crate) fn open(dir: Option<&Path>, scoring_id: &str) -> Result<Self> {
        let mut map = HashMap::new();
        let file = match dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let path = dir.join("scores.jsonl");
                if path.exists() {
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                    // A kill mid-append leaves a line without its newline; cut it off, or the
                    // next append would be glued to it and that finished score lost too.
                    if !text.is_empty() && !text.ends_with('\n') {
                        let keep = text.rfind('\n').map_or(0, |i| i + 1) as u64;
                        let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
                        f.set_len(keep).map_err(|e| Error::io(&path, e))?;
                    }
                    for line in text.lines() {
                        // A line cut short by a kill is simply not reused, nor one written before
                        // exact-match counts were kept.
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                            let field = |name: &str| v[name].as_u64().map(|x| x as usize);
                            if let (Some(k), Some(mean_nll), Some(tokens), Some(exact), Some(samples)) =
                                (v["key"].as_str(), v["mean_nll"].as_f64(), field("tokens"), field("exact"), field("samples"))
                            {
                                map.insert(k.to_string(), Cached { mean_nll, tokens, exact, samples });
                            }
                        }
                    }
                }
                let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
                Some((path, f))
            }
        };
        Ok(ScoreCache { map, file, scoring_id: scoring_id.to_string() })
    }

    pub(crate) fn key(&self, adapter_hash: &str, samples_hash: &str) -> String {
        format!("{}:{adapter_hash}:{samples_hash}", self.scoring_id)
    }

    pub(crate) fn get(&self, key: &str) -> Option<Cached> {
        self.map.get(key).copied()
    }

    fn put(&mut self, key: String, value: Cached) -> Result<()> {
        if let Some((path, f)) = &mut self.file {
            // One write per line (O_APPEND): a kill leaves whole lines or one cut-off tail.
            let line = json!({"key": key, "mean_nll": value.mean_nll, "tokens": value.tokens, "exact": value.exact, "samples": value.samples})
                .to_string()
                + "\n";
            f.write_all(line.as_bytes()).map_err(|e| Error::io(path, e))?;
        }
        self.map.insert(key, value);
        Ok(())
    }
}

/// Scores candidate adapters (written to a work dir in the output dtype, so what is scored is
/// byte for byte what would be shipped) and caches by content hash.
pub(crate) struct Evaluator {
    pub scorer: Scorer,
    pub cache: ScoreCache,
    pub work_dir: PathBuf,
    pub loaded: HashMap<String, usize>,
    pub dtype: DType,
    /// Targets of the widest input: a candidate with fewer has dropped some.
    pub input_targets: usize,
    pub scored_sequences: usize,
    pub cached_sequences: usize,
}

/// A candidate adapter on disk.
#[derive(Clone)]
pub(crate) struct Candidate {
    pub path: PathBuf,
    pub hash: String,
    pub bytes: u64,
    pub rank: usize,
    /// Rank per target where they differ or targets were dropped (None: all at `rank`).
    pub target_ranks: Option<BTreeMap<String, usize>>,
    /// Storage type it was written in (block types fall back to F16 for short rows).
    pub dtype: DType,
}

impl Evaluator {
    pub(crate) fn write_candidate(&self, adapter: &LoraAdapter, inputs: &[&Path]) -> Result<Candidate> {
        self.write_candidate_as(adapter, self.dtype, inputs)
    }

    /// As [`Self::write_candidate`], in another storage type than the run's `--dtype`.
    pub(crate) fn write_candidate_as(&self, adapter: &LoraAdapter, dtype: DType, inputs: &[&Path]) -> Result<Candidate> {
        let w = adapter.to_gguf(dtype)?;
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).map_err(|e| Error::io(&self.work_dir, e))?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let path = self.work_dir.join(format!("{hash}.gguf"));
        if !path.exists() {
            crate::fsutil::write_atomic(&path, inputs, |f| f.write_all(&bytes))?;
        }
        let ranks: BTreeMap<String, usize> = adapter.targets.iter().map(|(name, t)| (name.clone(), t.rank)).collect();
        let uniform = ranks.len() >= self.input_targets && ranks.values().all(|&r| r == adapter.max_rank());
        Ok(Candidate { path, hash, bytes: bytes.len() as u64, rank: adapter.max_rank(), target_ranks: (!uniform).then_some(ranks), dtype })
    }

    /// Each listed task's examples scored under `candidate` (None = base model).
    pub(crate) fn scores(&mut self, candidate: Option<&Candidate>, tasks: &[&Task]) -> Result<Vec<TaskScore>> {
        let adapter_key = candidate.map(|c| c.hash.as_str()).unwrap_or("base");
        let mut out = vec![TaskScore { nll: f64::NAN, exact: f64::NAN }; tasks.len()];
        let mut todo = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let key = self.cache.key(adapter_key, &t.samples_hash);
            match self.cache.get(&key) {
                Some(cached) => {
                    out[i] = cached.task_score();
                    self.cached_sequences += t.samples.len();
                }
                None => todo.push((i, key)),
            }
        }
        if todo.is_empty() {
            return Ok(out);
        }
        let adapter_index = match candidate {
            None => None,
            Some(c) => Some(match self.loaded.get(&c.hash) {
                Some(&i) => i,
                None => {
                    let i = self.scorer.add_adapter(&c.path)?;
                    self.loaded.insert(c.hash.clone(), i);
                    i
                }
            }),
        };
        let jobs: Vec<ScoreJob<'_>> =
            todo.iter().map(|(i, _)| ScoreJob { adapter: adapter_index, scale: 1.0, samples: &tasks[*i].samples }).collect();
        let results = self.scorer.score(&jobs)?;
        for ((i, key), r) in todo.into_iter().zip(results) {
            self.scored_sequences += tasks[i].samples.len();
            let cached = Cached { mean_nll: r.mean_nll, tokens: r.tokens, exact: r.exact, samples: tasks[i].samples.len() };
            out[i] = cached.task_score();
            self.cache.put(key, cached)?;
        }
        Ok(out)
    }
}
