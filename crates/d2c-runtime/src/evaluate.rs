//! Held-out evaluation: exact-match accuracy of greedy generation through llama.cpp.
//!
//! This is how the quality benchmark judges a set of adapters, and how a user checks a merged
//! set before shipping it: every task's test prompts are completed greedily under the adapter
//! the task would be served with (its own, the one a manifest assigns, or none), and the first
//! line of the generation, trimmed, must equal the trimmed expected completion.
//!
//! Prompts are tokenised as the scorer tokenises them (BOS if the model wants one, special
//! tokens parsed), and many prompts are decoded together, one sequence id each, so that the
//! cost is that of batched prompt processing rather than one decode call per token per prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::llama::{AdapterId, Batch, Model, Session, SessionConfig, Token};
use d2c_format::convert;
use d2c_format::error::{Error, Result};
use d2c_format::manifest::{self, Manifest};
use d2c_format::samples::{self, Sample};

/// Which adapter each task is evaluated under.
#[derive(Debug, Clone)]
pub enum AdapterChoice {
    /// The base model for every task.
    Base,
    /// `DIR/<task>.gguf` for every task (its own adapter).
    PerTask(PathBuf),
    /// The adapter a `merge` manifest assigns to the task (hashes checked).
    Manifest(PathBuf),
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Most tokens generated per prompt; a generation also stops at a newline or end of
    /// generation.
    pub max_tokens: usize,
    pub threads: Option<i32>,
    /// Most tokens per decode call.
    pub n_batch: u32,
    /// Most prompts decoded together.
    pub n_parallel: usize,
    /// Keep every prediction in the report.
    pub keep_predictions: bool,
    /// A progress bar on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { max_tokens: 24, threads: None, n_batch: 256, n_parallel: 64, keep_predictions: false, progress: false }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub prompt: String,
    pub expected: String,
    pub predicted: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskAccuracy {
    /// The adapter file, or `None` for the base model.
    pub adapter: Option<PathBuf>,
    /// The scale it was applied at (a manifest's `task_scales`; else 1).
    pub scale: f32,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<Prediction>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub tasks: BTreeMap<String, TaskAccuracy>,
    /// Unweighted mean of the per-task accuracies.
    pub mean_accuracy: f64,
    /// Prompts completed, tokens decoded (prompt + generated) and wall time.
    pub prompts: usize,
    pub decoded_tokens: usize,
    pub seconds: f64,
}

impl EvalReport {
    pub fn to_table(&self) -> String {
        let width = self.tasks.keys().map(|t| t.len()).max().unwrap_or(4).max(4);
        let mut out = format!("{:width$}  {:>8}  {:>7}  adapter\n", "task", "accuracy", "correct");
        for (task, a) in &self.tasks {
            let mut adapter = a.adapter.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(base)".into());
            if a.scale != 1.0 {
                adapter += &format!(" x{}", a.scale);
            }
            out += &format!("{task:width$}  {:>8.3}  {:>3}/{:<3}  {adapter}\n", a.accuracy, a.correct, a.total);
        }
        out += &format!(
            "mean accuracy {:.4} over {} tasks ({} prompts, {} tokens decoded, {:.1} s)\n",
            self.mean_accuracy,
            self.tasks.len(),
            self.prompts,
            self.decoded_tokens,
            self.seconds
        );
        out
    }
}

/// What a generation is judged on: its first line, trimmed.
pub fn prediction_of(generated: &str) -> &str {
    generated.split('\n').next().unwrap_or("").trim()
}

/// Evaluates every `<task>.jsonl` of `tests_dir` under the adapter `choice` gives it.
pub fn evaluate(base: &Path, tests_dir: &Path, choice: &AdapterChoice, opts: &EvalOptions) -> Result<EvalReport> {
    if opts.max_tokens == 0 || opts.n_parallel == 0 || opts.n_batch == 0 {
        return Err(Error::Usage("--max-tokens, --parallel and --batch must be at least 1".into()));
    }
    let tests = read_tests(tests_dir)?;
    // Converted PEFT adapters live here until the evaluation ends.
    let mut scratch = convert::PeftScratch::default();
    let mut shown = BTreeMap::new();
    let mut scales: BTreeMap<String, f32> = BTreeMap::new();
    let assignment = adapter_files(base, &tests, choice, &mut scratch, &mut shown, &mut scales)?;
    let scale_of = |task: &str| scales.get(task).copied().unwrap_or(1.0);

    let started = std::time::Instant::now();
    let mut model = Model::load(base)?;
    // Load each distinct adapter once; tasks sharing a merged adapter are decoded together.
    let mut files: Vec<PathBuf> = assignment.values().flatten().cloned().collect();
    files.sort();
    files.dedup();
    let mut adapters: Vec<AdapterId> = Vec::with_capacity(files.len());
    for f in &files {
        adapters.push(model.load_adapter(f)?);
    }

    let prompts_of: BTreeMap<&str, Vec<Vec<Token>>> =
        tests.iter().map(|(task, samples)| (task.as_str(), samples.iter().map(|s| model.tokenize_sequence(&s.prompt)).collect())).collect();
    let longest = prompts_of.values().flatten().map(|p| p.len()).max().unwrap_or(1);
    check_fits(&model, tests_dir, longest, opts.max_tokens)?;
    let (mut session, n_parallel) = generation_session(&model, longest, opts)?;

    // Tasks served alike (one adapter at one scale) are decoded together.
    let mut groups: BTreeMap<(Option<usize>, u32), Vec<&str>> = BTreeMap::new();
    for (task, file) in &assignment {
        let index = file.as_ref().map(|f| files.binary_search(f).expect("every assigned file was loaded"));
        groups.entry((index, scale_of(task).to_bits())).or_default().push(task.as_str());
    }
    let progress = d2c_format::progress::bar(opts.progress, tests.values().map(|s| s.len() as u64).sum(), "evaluating");
    let mut generated: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut decoded_tokens = 0;
    for ((adapter, scale), group) in &groups {
        session.set_adapter(adapter.map(|i| (adapters[i], f32::from_bits(*scale))))?;
        let prompts: Vec<&[Token]> = group.iter().flat_map(|t| prompts_of[t].iter().map(|p| p.as_slice())).collect();
        let (outputs, tokens) = complete_all(&model, &mut session, &prompts, n_parallel, opts.max_tokens, &progress)?;
        decoded_tokens += tokens;
        let mut outputs = outputs.into_iter();
        for task in group {
            generated.insert(task, outputs.by_ref().take(prompts_of[task].len()).collect());
        }
    }
    progress.finish_and_clear();

    let mut report_tasks = BTreeMap::new();
    for (task, samples) in &tests {
        let texts = &generated[task.as_str()];
        let mut predictions = Vec::new();
        let mut correct = 0;
        for (s, text) in samples.iter().zip(texts) {
            let predicted = prediction_of(text);
            let ok = predicted == s.completion.trim();
            correct += ok as usize;
            if opts.keep_predictions {
                predictions.push(Prediction {
                    prompt: s.prompt.clone(),
                    expected: s.completion.trim().to_string(),
                    predicted: predicted.to_string(),
                    correct: ok,
                });
            }
        }
        let total = samples.len();
        let adapter = assignment[task].as_ref().map(|f| shown.get(f).unwrap_or(f).clone());
        report_tasks.insert(
            task.clone(),
            TaskAccuracy { adapter, scale: scale_of(task), correct, total, accuracy: correct as f64 / total as f64, predictions },
        );
    }
    let mean_accuracy = report_tasks.values().map(|a| a.accuracy).sum::<f64>() / report_tasks.len() as f64;
    Ok(EvalReport {
        mean_accuracy,
        prompts: tests.values().map(|s| s.len()).sum(),
        decoded_tokens,
        seconds: started.elapsed().as_secs_f64(),
        tasks: report_tasks,
    })
}

/// Reads `<task>.jsonl` for every task in `dir` (sorted by name); at least one task, and at
/// least one example per task.
fn read_tests(dir: &Path) -> Result<BTreeMap<String, Vec<Sample>>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut tests = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        let task = path.file_stem().and_then(|s| s.to_str()).ok_or_else(|| Error::invalid(&path, "file name", "not valid UTF-8"))?.to_string();
        let samples = samples::read_samples(&path)?;
        if samples.is_empty() {
            return Err(Error::invalid(&path, "examples", "no test examples"));
        }
        tests.insert(task, samples);
    }
    if tests.is_empty() {
        return Err(Error::invalid(dir, "tests", "no <task>.jsonl files"));
    }
    Ok(tests)
}

/// The adapter file of every task (`None`: the base), checked to exist before any work.
/// PEFT directories are converted into `scratch` first; `shown` maps such a converted file to
/// the directory the user named, which is what the report shows. A manifest's serve scales go
/// into `scales`.
fn adapter_files(
    base: &Path,
    tests: &BTreeMap<String, Vec<Sample>>,
    choice: &AdapterChoice,
    scratch: &mut convert::PeftScratch,
    shown: &mut BTreeMap<PathBuf, PathBuf>,
    scales: &mut BTreeMap<String, f32>,
) -> Result<BTreeMap<String, Option<PathBuf>>> {
    let mut out = BTreeMap::new();
    match choice {
        AdapterChoice::Base => {
            for task in tests.keys() {
                out.insert(task.clone(), None);
            }
        }
        AdapterChoice::PerTask(dir) => {
            let sources = convert::task_adapters(dir)?;
            for task in tests.keys() {
                let source = sources.get(task).ok_or_else(|| {
                    Error::invalid(
                        &dir.join(format!("{task}.gguf")),
                        format!("task {task}"),
                        format!("no adapter for this task's tests (neither {task}.gguf nor a PEFT directory {task}/)"),
                    )
                })?;
                let file = scratch.file(task, source, base)?;
                if let convert::AdapterSource::Peft(dir) = source {
                    shown.insert(file.clone(), dir.clone());
                }
                out.insert(task.clone(), Some(file));
            }
        }
        AdapterChoice::Manifest(path) => {
            let m = Manifest::read(path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let base_hash = manifest::hash_file(base)?;
            if base_hash != m.base.blake3 {
                return Err(Error::invalid(path, "base.blake3", format!("{} is not the base model this manifest was made for", base.display())));
            }
            let mut checked = vec![false; m.adapters.len()];
            for task in tests.keys() {
                let &i = m
                    .tasks
                    .get(task)
                    .ok_or_else(|| Error::invalid(path, "tasks", format!("task {task} has tests but no adapter in the manifest")))?;
                let entry = &m.adapters[i];
                let file = dir.join(&entry.file);
                if !checked[i] {
                    let hash = manifest::hash_file(&file)?;
                    if hash != entry.blake3 {
                        return Err(Error::invalid(
                            path,
                            format!("adapters[{i}].blake3"),
                            format!("{} does not match its recorded hash", file.display()),
                        ));
                    }
                    checked[i] = true;
                }
                scales.insert(task.clone(), m.task_scale(task));
                out.insert(task.clone(), Some(file));
            }
        }
    }
    Ok(out)
}

/// What greedy decoding answers to each prompt of each job under the job's adapter (scale 1):
/// the first generated line, trimmed, as `eval` judges it; one list per job, in order. `merge
/// --targets own` holds a task's merged adapter to these answers of its own adapter.
/// Each job: the adapter, the file its prompts come from (named in errors), the prompts.
pub fn adapter_answers(base: &Path, jobs: &[(PathBuf, PathBuf, Vec<String>)], opts: &EvalOptions) -> Result<Vec<Vec<String>>> {
    if opts.max_tokens == 0 || opts.n_parallel == 0 || opts.n_batch == 0 {
        return Err(Error::Usage("max tokens, parallel sequences and batch must be at least 1".into()));
    }
    let mut model = Model::load(base)?;
    let adapters: Vec<AdapterId> = jobs.iter().map(|(file, _, _)| model.load_adapter(file)).collect::<Result<_>>()?;
    let prompts: Vec<Vec<Vec<Token>>> = jobs.iter().map(|(_, _, ps)| ps.iter().map(|p| model.tokenize_sequence(p)).collect()).collect();
    for ((_, source, _), job) in jobs.iter().zip(&prompts) {
        check_fits(&model, source, job.iter().map(|p| p.len()).max().unwrap_or(1), opts.max_tokens)?;
    }
    let longest = prompts.iter().flatten().map(|p| p.len()).max().unwrap_or(1);
    let (mut session, n_parallel) = generation_session(&model, longest, opts)?;
    let progress = d2c_format::progress::bar(opts.progress, prompts.iter().map(|p| p.len() as u64).sum(), "own adapters' answers");
    let mut answers = Vec::with_capacity(jobs.len());
    for (&adapter, job) in adapters.iter().zip(&prompts) {
        session.set_adapter(Some((adapter, 1.0)))?;
        let refs: Vec<&[Token]> = job.iter().map(|p| p.as_slice()).collect();
        let (texts, _) = complete_all(&model, &mut session, &refs, n_parallel, opts.max_tokens, &progress)?;
        answers.push(texts.iter().map(|t| prediction_of(t).to_string()).collect());
    }
    progress.finish_and_clear();
    Ok(answers)
}

/// An error naming `what` where a prompt of `longest` tokens plus `max_tokens` generated ones
/// does not fit the model's context.
fn check_fits(model: &Model, what: &Path, longest: usize, max_tokens: usize) -> Result<()> {
    if longest + max_tokens > model.n_ctx_train() as usize {
        return Err(Error::Usage(format!(
            "{}: a prompt of {longest} tokens plus {max_tokens} generated tokens exceeds the model's context ({})",
            what.display(),
            model.n_ctx_train()
        )));
    }
    Ok(())
}

/// A session for greedy generation of prompts of up to `longest` tokens plus `opts.max_tokens`,
/// as many at once as one decode step fits; and that number of sequences.
fn generation_session<'m>(model: &'m Model, longest: usize, opts: &EvalOptions) -> Result<(Session<'m>, usize)> {
    let per_seq = longest + opts.max_tokens;
    // Every running sequence adds one token per generation step, so a step must fit one batch.
    let n_parallel = opts.n_parallel.min(crate::llama::MAX_SEQUENCES as usize).min(opts.n_batch as usize);
    let n_ctx = (per_seq * n_parallel).max(opts.n_batch as usize);
    let cfg = SessionConfig { n_ctx: n_ctx as u32, n_batch: opts.n_batch, n_seq: n_parallel as u32, threads: opts.threads, flash_attention: false };
    Ok((model.session_with(cfg)?, n_parallel))
}

/// Greedy continuations of `prompts` under the session's adapter, `n_parallel` at a time; the
/// texts in order and the tokens decoded.
fn complete_all(
    model: &Model,
    session: &mut Session<'_>,
    prompts: &[&[Token]],
    n_parallel: usize,
    max_tokens: usize,
    progress: &indicatif::ProgressBar,
) -> Result<(Vec<String>, usize)> {
    let mut outputs = Vec::with_capacity(prompts.len());
    let mut decoded = 0;
    for chunk in prompts.chunks(n_parallel) {
        let (texts, tokens) = greedy_batch(model, session, chunk, max_tokens)?;
        decoded += tokens;
        progress.inc(chunk.len() as u64);
        outputs.extend(texts);
    }
    Ok((outputs, decoded))
}

/// Greedy continuations of `prompts` (one sequence id each, all in one KV cache), each ending at
/// end of generation, at a newline or after `max_tokens`. Returns the texts and the number of
/// tokens decoded.
fn greedy_batch(model: &Model, session: &mut Session<'_>, prompts: &[&[Token]], max_tokens: usize) -> Result<(Vec<String>, usize)> {
    let llama_err = |e: llama_cpp_2::llama_batch::BatchAddError| Error::Llama(e.to_string());
    session.clear_kv();
    let n_batch = session.n_batch as usize;
    let mut batch = Batch::new(n_batch, 1);
    let mut next: Vec<Option<Token>> = vec![None; prompts.len()];
    let mut decoded = 0;

    // Prompt processing: fill batches across prompt boundaries; a prompt's last token asks for
    // logits, read right after the decode that holds it (logits live until the next decode).
    let mut waiting: Vec<(usize, i32)> = Vec::new();
    for (seq, prompt) in prompts.iter().enumerate() {
        for (pos, &t) in prompt.iter().enumerate() {
            if batch.n_tokens() as usize == n_batch {
                decode_and_pick(session, &mut batch, &mut waiting, &mut next)?;
                decoded += n_batch;
            }
            let last = pos + 1 == prompt.len();
            if last {
                waiting.push((seq, batch.n_tokens()));
            }
            batch.add(t, pos as i32, &[seq as i32], last).map_err(llama_err)?;
        }
    }
    if batch.n_tokens() > 0 {
        decoded += batch.n_tokens() as usize;
        decode_and_pick(session, &mut batch, &mut waiting, &mut next)?;
    }

    let mut texts: Vec<Vec<u8>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    for step in 0..max_tokens {
        for (seq, token) in next.iter().enumerate() {
            if done[seq] {
                continue;
            }
            let token = token.expect("every prompt was decoded");
            if model.is_eog(token) {
                done[seq] = true;
                continue;
            }
            texts[seq].extend(model.token_bytes(token));
            if texts[seq].contains(&b'\n') || step + 1 == max_tokens {
                done[seq] = true;
                continue;
            }
            let pos = (prompts[seq].len() + step) as i32;
            waiting.push((seq, batch.n_tokens()));
            batch.add(token, pos, &[seq as i32], true).map_err(llama_err)?;
        }
        if batch.n_tokens() == 0 {
            break;
        }
        decoded += batch.n_tokens() as usize;
        decode_and_pick(session, &mut batch, &mut waiting, &mut next)?;
    }
    Ok((texts.into_iter().map(|t| String::from_utf8_lossy(&t).into_owned()).collect(), decoded))
}

fn decode_and_pick(session: &mut Session<'_>, batch: &mut Batch, waiting: &mut Vec<(usize, i32)>, next: &mut [Option<Token>]) -> Result<()> {
    session.decode(batch)?;
    for (seq, index) in waiting.drain(..) {
        next[seq] = Some(crate::llama::greedy_token(session.logits_ith(index)));
    }
    batch.clear();
    Ok(())
}
