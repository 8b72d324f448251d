//! Candidate adapters written as they would ship and scored on the tasks' examples by
//! llama.cpp (through the score cache), and the candidates a cluster of tasks can ship.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::inputs::TaskActivations;
use super::options::{Judge, MergeRunOptions};
use super::score_cache::{Cached, ScoreCache};
use super::tasks::{input_paths, pick, Task};
use crate::adapter::{DType, LoraAdapter, KEY_TASK_NAME};
use crate::error::{Error, Result};
use crate::gguf::Value;
use crate::manifest::MergeChoice;
use crate::merge::{self, MergeOptions, Method};
use crate::objective::{Baselines, ExampleObjective, TaskScore};
use crate::score::{ScoreJob, ScoreOptions, Scorer};

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

/// Candidates kept loaded in llama.cpp at once: beyond this they are all freed (the base model
/// reloaded, a fraction of a second) before the next loads, so memory stays bounded however many
/// candidates a search tries. A few rounds' worth, so the clusters that did not change stay.
const MAX_LOADED_ADAPTERS: usize = 64;

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
    /// A scorer on `base` whose scores are cached under `scoring_id` ([`scoring_id`]).
    pub(crate) fn open(
        base: &Path,
        scoring_id: &str,
        score_opts: ScoreOptions,
        cache: Option<&Path>,
        work_dir: PathBuf,
        dtype: DType,
        tasks: &[Task],
    ) -> Result<Evaluator> {
        Ok(Evaluator {
            scorer: Scorer::new(base, score_opts)?,
            cache: ScoreCache::open(cache, scoring_id)?,
            work_dir,
            loaded: HashMap::new(),
            dtype,
            input_targets: tasks.iter().map(|t| t.adapter.targets.len()).max().unwrap_or(0),
            scored_sequences: 0,
            cached_sequences: 0,
        })
    }

    /// A shipped adapter file as a candidate (its hash is its cache identity, as when it was
    /// chosen).
    pub(crate) fn existing(path: PathBuf, entry: &crate::manifest::AdapterEntry) -> Result<Candidate> {
        let dtype = entry.dtype.parse().map_err(|e: String| Error::invalid(&path, "dtype", e))?;
        Ok(Candidate { path, hash: entry.blake3.clone(), bytes: entry.bytes, rank: entry.rank, target_ranks: entry.target_ranks.clone(), dtype })
    }

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
        self.scores_at(candidate, 1.0, tasks)
    }

    /// As [`Self::scores`], with the adapter applied at `scale` (as llama-server's per-request
    /// `lora` scale applies it).
    pub(crate) fn scores_at(&mut self, candidate: Option<&Candidate>, scale: f32, tasks: &[&Task]) -> Result<Vec<TaskScore>> {
        Ok(self.counts_at(candidate, scale, tasks)?.iter().map(Cached::task_score).collect())
    }

    /// As [`Self::scores_at`], as counts (tokens and examples), which add up across example sets.
    pub(crate) fn counts_at(&mut self, candidate: Option<&Candidate>, scale: f32, tasks: &[&Task]) -> Result<Vec<Cached>> {
        // Scale 1 keeps the key of every score cached before scales were tried.
        let adapter_key = match candidate {
            None => "base".to_string(),
            Some(c) if scale == 1.0 => c.hash.clone(),
            Some(c) => format!("{}@{scale}", c.hash),
        };
        let mut out = vec![Cached { mean_nll: f64::NAN, tokens: 0, exact: 0, soft: 0.0, samples: 0 }; tasks.len()];
        let mut todo = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let key = self.cache.key(&adapter_key, &t.samples_hash);
            match self.cache.get(&key) {
                Some(cached) => {
                    out[i] = cached;
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
                    if self.scorer.loaded_adapters() >= MAX_LOADED_ADAPTERS {
                        self.scorer.unload_adapters()?;
                        self.loaded.clear();
                    }
                    let i = self.scorer.add_adapter(&c.path)?;
                    self.loaded.insert(c.hash.clone(), i);
                    i
                }
            }),
        };
        let jobs: Vec<ScoreJob<'_>> = todo.iter().map(|(i, _)| ScoreJob { adapter: adapter_index, scale, samples: &tasks[*i].samples }).collect();
        let results = self.scorer.score(&jobs)?;
        for ((i, key), r) in todo.into_iter().zip(results) {
            self.scored_sequences += tasks[i].samples.len();
            let soft = r.per_sample.iter().map(|s| crate::objective::soft_verdict(s.margin)).sum();
            let cached = Cached { mean_nll: r.mean_nll, tokens: r.tokens, exact: r.exact, soft, samples: tasks[i].samples.len() };
            out[i] = cached;
            self.cache.put(key, cached)?;
        }
        Ok(out)
    }
}

/// Whose scores a cache entry holds: the base's hash and this machine's CPU kernels (another
/// kernel set scores a little differently: its scores are other entries).
pub(crate) fn scoring_id(base_hash: &str, cpu_kernels: &str) -> String {
    format!("{base_hash}+{}", &blake3::hash(cpu_kernels.as_bytes()).to_hex()[..16])
}

/// What a cluster ships, once chosen: the candidate and, for a merge, how it was made.
pub(crate) struct ClusterEval {
    pub candidate: Candidate,
    pub choice: Option<MergeChoice>,
}

impl ClusterEval {
    /// The operator and weight multiplier the candidate was merged with (none for an adapter
    /// that ships as it came).
    pub(crate) fn merged_by(&self) -> Option<(Method, f32)> {
        self.choice.as_ref().and_then(|c| c.method.parse().ok().map(|m| (m, c.scale)))
    }
}

/// The candidates a cluster of tasks can ship: its members merged (any operator, weight
/// multiplier and rank), or a lone task's own adapter (compressed, under a truncation strategy).
pub(crate) struct Pool<'a> {
    pub tasks: &'a [Task],
    /// Every task's own adapter as it would be shipped (in the output dtype).
    pub own: Vec<Candidate>,
    /// What each task ships under a truncation strategy.
    pub compressed: Option<Vec<Candidate>>,
    pub density: f32,
    pub seed: u64,
    /// Every task's inputs, where an operator that needs them (`regmean`) may be tried.
    pub inputs: Option<&'a TaskActivations>,
    /// Whether [`Pool::judge`] cross-fits the merges that are fitted to the examples' inputs.
    pub cross_fit: bool,
}

impl<'a> Pool<'a> {
    /// The pool of a run with `run`'s merge settings.
    pub(crate) fn new(
        tasks: &'a [Task],
        own: Vec<Candidate>,
        compressed: Option<Vec<Candidate>>,
        run: &MergeRunOptions,
        inputs: Option<&'a TaskActivations>,
    ) -> Self {
        Pool { tasks, own, compressed, density: run.density, seed: run.seed, inputs, cross_fit: run.judge == Judge::CrossFit }
    }

    /// The members' average (times `scale`) under `method`, at `rank`, named after its tasks.
    pub(crate) fn merge(&self, members: &[usize], method: Method, scale: f32, rank: usize) -> Result<LoraAdapter> {
        self.merge_fitted(members, method, scale, rank, None)
    }

    /// As [`Self::merge`]; an operator fitted to the examples' inputs sees only fold `fold` of
    /// each member's examples where one is given ([`TaskActivations::fold_of`]).
    fn merge_fitted(&self, members: &[usize], method: Method, scale: f32, rank: usize, fold: Option<usize>) -> Result<LoraAdapter> {
        let inputs: Vec<&LoraAdapter> = members.iter().map(|&i| &*self.tasks[i].adapter).collect();
        let w = scale / members.len() as f32;
        let mo = MergeOptions { method, rank: Some(rank), weights: Some(vec![w; members.len()]), density: self.density, seed: self.seed };
        let mut merged = match (method.needs_inputs(), self.inputs) {
            (true, Some(acts)) => {
                let rows = match fold {
                    None => acts.of(members),
                    Some(f) => acts.fold_of(members, f),
                };
                merge::merge_with_inputs(&inputs, &rows.iter().collect::<Vec<_>>(), &mo)?.0
            }
            (true, None) => return Err(Error::Internal(format!("{method} was tried without the tasks' activations"))),
            (false, _) => merge::merge(&inputs, &mo)?,
        };
        let names: Vec<&str> = members.iter().map(|&i| self.tasks[i].name.as_str()).collect();
        merged.metadata.insert(KEY_TASK_NAME.to_string(), Value::String(names.join(",")));
        Ok(merged)
    }

    /// One cluster at `rank`, and the scores of `scored` under it: a singleton ships its
    /// compressed adapter under a truncation strategy, else, at (or above) its own rank, its own
    /// adapter unchanged; everything else is merged (a singleton below its rank is truncated).
    pub(crate) fn eval(
        &self,
        ev: &mut Evaluator,
        members: &[usize],
        method: Method,
        scale: f32,
        rank: usize,
        scored: &[&Task],
    ) -> Result<(Candidate, Vec<TaskScore>)> {
        let cand = self.candidate(ev, members, method, scale, rank)?;
        let scores = ev.scores(Some(&cand), scored)?;
        Ok((cand, scores))
    }

    /// The adapter [`Self::eval`] ships for the cluster `members`, unscored.
    pub(crate) fn candidate(&self, ev: &mut Evaluator, members: &[usize], method: Method, scale: f32, rank: usize) -> Result<Candidate> {
        if let (Some(cut), [only]) = (&self.compressed, members) {
            Ok(cut[*only].clone())
        } else if members.len() == 1 && scale == 1.0 && rank >= self.tasks[members[0]].adapter.max_rank() {
            Ok(self.own[members[0]].clone())
        } else {
            let merged = self.merge(members, method, scale, rank)?;
            ev.write_candidate(&merged, &self.input_paths())
        }
    }

    /// Whether [`Self::judge`] cross-fits the cluster `members` merged by `method`: a merge
    /// fitted to the examples, of tasks that each have two examples or more.
    pub(crate) fn cross_fits(&self, members: &[usize], method: Method) -> bool {
        self.cross_fit
            && method.needs_inputs()
            && members.len() > 1
            && self.compressed.is_none()
            && members.iter().all(|&i| self.tasks[i].fold_split() > 0)
    }

    /// The scores of `set[i]` for each `i` in `scored` (`set`: every task's examples, in task
    /// order, or the first few of each) under the cluster `members` merged as [`Self::eval`]
    /// merges it, judged out of sample: where `cross_fit` is on and `method` is fitted to the
    /// examples' inputs (`regmean`), two merges are made, each fitted on one half of every
    /// member's examples, and each member's examples are scored under the merge that did not
    /// see them (tasks outside the cluster under the first); every score is taken at
    /// `serve_scale` (the per-task scale llama-server applies). Fitted and judged on the same
    /// examples, every grouping looks nearly as good as the own adapters, and the search
    /// cannot tell which merges will hold on new inputs. What ships is still the fit on every
    /// example ([`Self::eval`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn judge(
        &self,
        ev: &mut Evaluator,
        members: &[usize],
        method: Method,
        scale: f32,
        rank: usize,
        set: &[Task],
        scored: &[usize],
        serve_scale: f32,
    ) -> Result<Vec<TaskScore>> {
        if !self.cross_fits(members, method) {
            let cand = self.candidate(ev, members, method, scale, rank)?;
            return ev.scores_at(Some(&cand), serve_scale, &pick(set, scored));
        }
        let input_paths = self.input_paths();
        // The merges that saw only fold 0 (and only fold 1) of each member's examples.
        let fitted = [0, 1].map(|f| self.merge_fitted(members, method, scale, rank, Some(f)).and_then(|m| ev.write_candidate(&m, &input_paths)));
        let [first, second] = fitted;
        let (first, second) = (first?, second?);
        // views: (entry of `scored` it adds to, examples); under[f]: the views scored under
        // the merge fitted on fold f.
        let mut under = [Vec::new(), Vec::new()];
        // Borrowed where a task is scored on `set[i]` as it is (no copy of its examples).
        let mut views: Vec<(usize, Cow<'_, Task>)> = Vec::new();
        for (at, &i) in scored.iter().enumerate() {
            if !members.contains(&i) {
                views.push((at, Cow::Borrowed(&set[i])));
                under[0].push(views.len() - 1);
                continue;
            }
            // `set[i]` holds the task's first examples; those before the split were fitted
            // by the fold-0 merge and are judged under the fold-1 one, the rest the other way.
            let (split, len) = (self.tasks[i].fold_split(), set[i].samples.len());
            let whole = &self.tasks[i];
            if split > 0 && len > 0 {
                views.push((at, Cow::Owned(whole.examples(0..split.min(len)))));
                under[1].push(views.len() - 1);
            }
            if len > split {
                views.push((at, Cow::Owned(whole.examples(split..len))));
                under[0].push(views.len() - 1);
            }
        }
        let mut total: Vec<Option<Cached>> = vec![None; scored.len()];
        for (fold, candidate) in [(0, &first), (1, &second)] {
            let tasks: Vec<&Task> = under[fold].iter().map(|&v| views[v].1.as_ref()).collect();
            if tasks.is_empty() {
                continue;
            }
            for (&v, got) in under[fold].iter().zip(ev.counts_at(Some(candidate), serve_scale, &tasks)?) {
                let at = views[v].0;
                total[at] = Some(match total[at] {
                    None => got,
                    Some(before) => before.plus(&got),
                });
            }
        }
        total.into_iter().map(|t| t.map(|c| c.task_score()).ok_or_else(|| Error::Internal("a task with no examples was judged".into()))).collect()
    }

    /// Never overwritten by a candidate.
    pub(crate) fn input_paths(&self) -> Vec<&Path> {
        input_paths(self.tasks)
    }
}

/// Every task's ceiling and floor: its examples under its own adapter (as it would be shipped,
/// in the output dtype) and under the base model; and those own adapters as candidates.
pub(crate) fn baselines(ev: &mut Evaluator, tasks: &[Task], objective: ExampleObjective, progress: bool) -> Result<(Baselines, Vec<Candidate>)> {
    let n = tasks.len();
    let input_paths = input_paths(tasks);
    let pb = crate::progress::bar(progress, 2 * n as u64, "own / base scores");
    let all: Vec<&Task> = tasks.iter().collect();
    let base = ev.scores(None, &all)?;
    let tokens: Vec<usize> = tasks.iter().map(|t| ev.cache.get(&ev.cache.key("base", &t.samples_hash)).map(|c| c.tokens).unwrap_or(0)).collect();
    pb.inc(n as u64);
    let mut own = Vec::with_capacity(n);
    let mut own_candidates = Vec::with_capacity(n);
    for task in tasks {
        let c = ev.write_candidate(&task.adapter, &input_paths)?;
        own.push(ev.scores(Some(&c), &[task])?[0]);
        own_candidates.push(c);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((Baselines { objective, own, base, tokens }, own_candidates))
}
