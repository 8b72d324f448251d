//! Scoring through llama.cpp: the mean negative log-likelihood (nats per token) of example
//! completions given their prompts, under the base model or any loaded adapter. Every decision of
//! D2C is made from these numbers, so they come from llama.cpp's own forward pass.
//!
//! How a sample becomes tokens: the prompt alone and prompt + completion are both tokenised
//! (special markers parsed, as llama-server does; a BOS token first when the model wants one).
//! The scored tokens are those of prompt + completion after the longest common token prefix of
//! the two. Usually that prefix is the whole prompt; when the tokeniser merges the last prompt
//! characters with the first completion characters into one token, scoring starts at that first
//! differing token, so the merged token (and so a few prompt characters) is scored too: that is
//! the only honest way to score exactly the bytes of the completion with whole tokens. Each scored
//! token contributes `-log softmax(logits)[token]` of the logits at the position before it. A
//! model that adds no BOS token (SmolLM2) never predicts the first token of a sequence, so with
//! an empty prompt, or one that merges with the completion into the first token, that first
//! token is not scored (and a sample of one token in all is refused).
//!
//! Attention runs without flash attention: llama.cpp's CPU flash attention accumulates in F16
//! below 64 tokens per decode and in F32 from 64 up, so a sample's score would depend on what it
//! is batched with (on SmolLM2 by 0.02 nats per sample, up to 0.1 nats on single tokens); plain
//! attention gives the same numbers for any batching, which lets scores from different calls be
//! compared. (llama-server run with `-fa off` agrees with the scorer to 3e-4 nats.)
//!
//! How it stays fast: whole samples are packed into batches of up to `n_batch` tokens (one
//! sequence id each, first-fit decreasing), logits are requested only where a completion token
//! is predicted, the KV cache is sized to the batch and cleared after each decode, and jobs are
//! grouped by adapter so each adapter is switched to once per call. Samples longer than
//! `n_batch` are decoded alone, in chunks that keep their KV cache between decodes.
//!
//! How it stays exact whatever the batching: besides plain attention (above), every packed
//! sample starts at a KV cell aligned to the SIMD width of llama.cpp's attention kernel, padded
//! with a few filler tokens after the previous sample (see [`kv_align`]), and every decode has
//! a shape the matrix kernels treat alike (see [`MIN_DECODE_TOKENS`]): at least 8 tokens, a
//! multiple of 4 of them, and a multiple of 4 rows of logits; a sample then gets bit for bit
//! the logits it gets when decoded alone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::llama::{self, AdapterId, Batch, Model, Token};
use d2c_format::error::{Error, Result};
use d2c_format::samples::{self, Sample, SampleFile};

/// What is scored after each completion. Generation must stop after the answer as well as
/// produce it: an adapter that runs on (`18700` -> `187000`) gives every completion token its
/// right probability, and only scoring the stop that should follow charges it for that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CompletionEnd {
    /// The completion's own tokens only.
    #[default]
    None,
    /// A newline after the completion (unless it already ends with one): where `eval` and
    /// line-oriented serving stop.
    Newline,
    /// The model's end-of-turn token (end-of-sequence where it has none) after the completion:
    /// for adapters trained to end their answers with it.
    Eog,
}

d2c_format::value_names!(CompletionEnd, "completion end");

/// How to run the scorer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreOptions {
    /// CPU threads for llama.cpp; `None` uses every available core.
    pub threads: Option<i32>,
    /// Tokens per `llama_decode` call (also the KV cache size for packed samples); raised to at
    /// least [`MIN_DECODE_TOKENS`] and to a multiple of [`DECODE_ROWS_MULTIPLE`].
    pub n_batch: u32,
    /// The longest sample (prompt + completion, in tokens) accepted; `None` is the model's
    /// training context.
    pub n_ctx: Option<u32>,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// What is scored after each completion.
    pub end: CompletionEnd,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        // 256: llama.cpp pads the KV cache to 256 cells, and without flash attention each token
        // attends to all of them, so larger batches pay more attention per token.
        ScoreOptions { threads: None, n_batch: 256, n_ctx: None, progress: false, end: CompletionEnd::None }
    }
}

/// The score of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleScore {
    /// Mean negative log-likelihood of the scored tokens, in nats per token.
    pub nll: f64,
    /// How many tokens were scored.
    pub tokens: usize,
    /// Whether greedy decoding would give exactly this completion and then stop, judged in the
    /// same pass: every scored token is the argmax at its position, and the argmax after the
    /// last one ends the line (a token whose text is optional blanks then a newline) or the
    /// turn. This is `eval`'s exact match (first line, trimmed) without generating, up to how
    /// the completion is tokenised after its prompt.
    pub exact: bool,
    /// How far the sample is from flipping that verdict, in logits: the smallest, over its
    /// scored tokens, of the token's logit less the best other one, and, where the stop is
    /// judged, of the best line-ending logit less the best other one. Positive where `exact`
    /// holds (up to ties), negative by how much the worst position missed where it does not.
    pub margin: f64,
}

/// The score of a sample set under one adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetScore {
    /// Token-weighted mean NLL over all samples (total nats / total scored tokens).
    pub mean_nll: f64,
    pub tokens: usize,
    /// How many samples greedy decoding reproduces exactly ([`SampleScore::exact`]).
    pub exact: usize,
    pub per_sample: Vec<SampleScore>,
}

/// One unit of work: a sample set under an adapter (`None` = the base model) at `scale`.
#[derive(Debug, Clone, Copy)]
pub struct ScoreJob<'a> {
    pub adapter: Option<usize>,
    pub scale: f32,
    pub samples: &'a [Sample],
}

impl<'a> ScoreJob<'a> {
    pub fn base(samples: &'a [Sample]) -> Self {
        ScoreJob { adapter: None, scale: 1.0, samples }
    }

    pub fn with_adapter(adapter: usize, samples: &'a [Sample]) -> Self {
        ScoreJob { adapter: Some(adapter), scale: 1.0, samples }
    }
}

/// A sample as the model sees it: `tokens[first_scored..]` are scored, each from the logits
/// at the position before it (so `first_scored >= 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleTokens {
    pub tokens: Vec<Token>,
    pub first_scored: usize,
}

impl SampleTokens {
    pub fn n_scored(&self) -> usize {
        self.tokens.len() - self.first_scored
    }
}

/// A base model loaded once, with every adapter loaded once, scoring sample sets.
pub struct Scorer {
    model: Model,
    adapters: Vec<AdapterId>,
    opts: ScoreOptions,
    /// Per vocabulary entry: does greedy generation stop on it (see [`SampleScore::exact`]).
    ends_line: Vec<bool>,
}

impl Scorer {
    pub fn new(base: &Path, opts: ScoreOptions) -> Result<Self> {
        if opts.n_batch == 0 {
            return Err(Error::Usage("n_batch must be at least 1".into()));
        }
        if let Some(t) = opts.threads {
            if t < 1 {
                return Err(Error::Usage(format!("threads must be at least 1 (got {t})")));
            }
        }
        if opts.n_ctx == Some(0) {
            return Err(Error::Usage("n_ctx must be at least 1".into()));
        }
        let model = Model::load(base)?;
        let ends_line = (0..model.n_vocab() as i32)
            .map(|t| {
                let t = Token(t);
                let text = model.token_bytes(t);
                let blanks = text.iter().take_while(|b| matches!(b, b' ' | b'\t' | b'\r')).count();
                model.is_eog(t) || text.get(blanks) == Some(&b'\n')
            })
            .collect();
        Ok(Scorer { model, adapters: Vec::new(), opts, ends_line })
    }

    /// Loads an adapter into the model (llama.cpp checks it against the model here); the
    /// returned index names it in [`ScoreJob::adapter`].
    pub fn add_adapter(&mut self, path: &Path) -> Result<usize> {
        let adapter = self.model.load_adapter(path)?;
        self.adapters.push(adapter);
        Ok(self.adapters.len() - 1)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Frees every loaded adapter (llama.cpp frees a model's adapters with it, and llama-cpp-2's
    /// adapter handle has no drop of its own), so a long search's candidates do not pile up in
    /// memory: the base is loaded again and earlier adapter indices become invalid.
    pub fn unload_adapters(&mut self) -> Result<()> {
        self.adapters.clear();
        let path = self.model.path.clone();
        self.model = Model::load(&path)?;
        Ok(())
    }

    /// How many adapters are loaded now.
    pub fn loaded_adapters(&self) -> usize {
        self.adapters.len()
    }

    pub fn options(&self) -> &ScoreOptions {
        &self.opts
    }

    /// The most tokens (BOS included) one sample may have.
    pub fn max_sample_tokens(&self) -> usize {
        self.opts.n_ctx.unwrap_or_else(|| self.model.n_ctx_train()).max(1) as usize
    }

    /// Tokenises a sample as described in the module documentation. The error is a reason
    /// without a location (the caller knows the file and line).
    pub fn tokenize_sample(&self, sample: &Sample) -> std::result::Result<SampleTokens, String> {
        let prompt = self.model.tokenize_sequence(&sample.prompt);
        let newline = self.opts.end == CompletionEnd::Newline && !sample.completion.ends_with('\n');
        let mut full = self.model.tokenize_sequence(&format!("{}{}{}", sample.prompt, sample.completion, if newline { "\n" } else { "" }));
        if self.opts.end == CompletionEnd::Eog {
            full.push(self.model.end_of_turn());
        }
        let common = prompt.iter().zip(&full).take_while(|(a, b)| a == b).count();
        // Without a BOS token the first token of a sequence has no logits predicting it.
        let first_scored = common.max(1);
        let max = self.max_sample_tokens();
        if full.len() > max {
            return Err(format!("prompt + completion is {} tokens, longer than the context allows ({max})", full.len()));
        }
        if full.len() <= first_scored {
            return Err(if common == 0 {
                format!(
                    "nothing to score: prompt + completion is a single token, and this model adds no \
                     BOS token, so the first token of a sequence is never predicted ({} token(s))",
                    full.len()
                )
            } else {
                "the completion adds no tokens after the prompt's".into()
            });
        }
        Ok(SampleTokens { tokens: full, first_scored })
    }

    /// Checks that every sample of `file` can be scored (fits the context, has tokens to score),
    /// naming the file and line of the first that cannot.
    pub fn check_samples(&self, file: &SampleFile) -> Result<()> {
        for (i, s) in file.samples.iter().enumerate() {
            self.tokenize_sample(s).map_err(|reason| Error::Invalid {
                path: file.path.clone(),
                field: format!("line {}", file.lines.get(i).copied().unwrap_or(i + 1)),
                reason,
            })?;
        }
        Ok(())
    }

    /// Reads a JSONL sample file and checks it against this model ([`Self::check_samples`]).
    pub fn read_samples(&self, path: &Path) -> Result<SampleFile> {
        let file = samples::read_sample_file(path)?;
        self.check_samples(&file)?;
        Ok(file)
    }

    /// Scores every (adapter, sample set) job, adapter `None` = the base, at the job's scale;
    /// results are in job order. One context is created per call: adapters are loaded through
    /// `&mut Model`, so a context cannot outlive the call.
    pub fn score(&mut self, jobs: &[ScoreJob<'_>]) -> Result<Vec<SetScore>> {
        // Sample sets are told apart by identity (the same slice in several jobs is tokenised
        // and, under the same adapter, decoded once).
        let mut set_of_slice: HashMap<(usize, usize), usize> = HashMap::new();
        let mut sets: Vec<Vec<SampleTokens>> = Vec::new();
        let mut job_set = Vec::with_capacity(jobs.len());
        for (j, job) in jobs.iter().enumerate() {
            if let Some(a) = job.adapter {
                if a >= self.adapters.len() {
                    return Err(Error::Internal(format!("job #{j}: no adapter #{a} ({} loaded)", self.adapters.len())));
                }
            }
            if !job.scale.is_finite() {
                return Err(Error::Internal(format!("job #{j}: adapter scale {} is not finite", job.scale)));
            }
            if job.samples.is_empty() {
                return Err(Error::Internal(format!("job #{j}: no samples to score")));
            }
            let key = (job.samples.as_ptr() as usize, job.samples.len());
            let set = match set_of_slice.get(&key) {
                Some(&s) => s,
                None => {
                    let tokens = job
                        .samples
                        .iter()
                        .enumerate()
                        .map(|(i, s)| self.tokenize_sample(s).map_err(|r| Error::Usage(format!("job #{j}, sample #{i}: {r}"))))
                        .collect::<Result<Vec<_>>>()?;
                    sets.push(tokens);
                    set_of_slice.insert(key, sets.len() - 1);
                    sets.len() - 1
                }
            };
            job_set.push(set);
        }

        // Groups of work under one adapter setting, in order of first appearance.
        let mut groups: Vec<Group> = Vec::new();
        for (job, &set) in jobs.iter().zip(&job_set) {
            let key = (job.adapter, job.scale.to_bits());
            let g = match groups.iter().position(|g| g.key == key) {
                Some(g) => g,
                None => {
                    groups.push(Group { key, sets: Vec::new(), plan: Vec::new() });
                    groups.len() - 1
                }
            };
            if !groups[g].sets.contains(&set) {
                groups[g].sets.push(set);
            }
        }
        let n_batch = decode_shape(self.opts.n_batch as usize);
        let align = kv_align();
        for g in &mut groups {
            g.plan = plan_decodes(&sets, &g.sets, n_batch, align);
        }
        let n_seq = groups.iter().flat_map(|g| &g.plan).map(|d| d.pieces.len()).max().unwrap_or(1) as u32;
        // KV cells a decode reaches: the last chunk of a long sample, widened, can pass its length.
        let cells = groups.iter().flat_map(|g| &g.plan).flat_map(|d| &d.pieces).map(|p| p.end + p.pad).max().unwrap_or(1);
        let total_tokens: u64 = groups.iter().flat_map(|g| &g.sets).flat_map(|&s| &sets[s]).map(|s| s.tokens.len() as u64).sum();

        let progress = if self.opts.progress {
            let bar = ProgressBar::new(total_tokens);
            bar.set_style(
                ProgressStyle::with_template("scoring {bar:40} {pos}/{len} tokens ({per_sec}, {eta} left)").expect("valid progress template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };

        let cfg = llama::SessionConfig {
            n_ctx: cells.max(n_batch) as u32,
            n_batch: n_batch as u32,
            n_seq,
            threads: self.opts.threads,
            // Batch-independent numbers (see the module documentation).
            flash_attention: false,
        };
        let mut session = self.model.session_with(cfg)?;
        let mut batch = Batch::new(n_batch, 1);
        // Per group, per set, per sample.
        let mut results: Vec<HashMap<usize, Vec<Tally>>> = Vec::with_capacity(groups.len());
        for g in &groups {
            let active = g.key.0.map(|a| (self.adapters[a], f32::from_bits(g.key.1)));
            session.set_adapter(active)?;
            let mut sums: HashMap<usize, Vec<Tally>> = g.sets.iter().map(|&s| (s, vec![Tally::default(); sets[s].len()])).collect();
            for decode in &g.plan {
                let judge_stop = (self.opts.end == CompletionEnd::None).then_some(self.ends_line.as_slice());
                let scored = run_decode(&mut session, &mut batch, &sets, decode, judge_stop)?;
                for (piece, outcome) in scored {
                    let slot = &mut sums.get_mut(&piece.0).expect("planned set")[piece.1];
                    match outcome {
                        Outcome::Token { nll, argmax, margin } => {
                            slot.nats += nll;
                            slot.tokens += 1;
                            slot.all_argmax &= argmax;
                            slot.margin = slot.margin.min(margin);
                        }
                        Outcome::Stop { ends, margin } => {
                            slot.stops = Some(ends);
                            slot.margin = slot.margin.min(margin);
                        }
                    }
                }
                if decode.clear_after {
                    session.clear_kv();
                }
                progress.inc(decode.pieces.iter().map(|p| (p.end - p.start) as u64).sum());
            }
            for (&set, per_sample) in &sums {
                if let Some((i, _)) = per_sample.iter().enumerate().find(|(_, t)| !t.nats.is_finite()) {
                    let what = match g.key.0 {
                        Some(a) => format!("adapter {}", self.model.adapter_path(self.adapters[a])?.display()),
                        None => "the base model".into(),
                    };
                    let job = job_set.iter().position(|&s| s == set).unwrap_or(0);
                    return Err(Error::Llama(format!("{what} gave non-finite logits on sample #{i} of job #{job}")));
                }
            }
            results.push(sums);
        }
        progress.finish_and_clear();

        Ok(jobs
            .iter()
            .zip(&job_set)
            .map(|(job, &set)| {
                let key = (job.adapter, job.scale.to_bits());
                let g = groups.iter().position(|g| g.key == key).expect("grouped job");
                set_score(&results[g][&set])
            })
            .collect())
    }
}

/// What one sample's decodes added up to.
#[derive(Debug, Clone, Copy)]
struct Tally {
    nats: f64,
    tokens: usize,
    /// Every scored token so far was the argmax at its position.
    all_argmax: bool,
    /// Whether the argmax after the last token ends the line; `None` where the scored tokens
    /// already end with the stop (`--end newline|eog`).
    stops: Option<bool>,
    /// The smallest margin so far ([`SampleScore::margin`]).
    margin: f64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { nats: 0.0, tokens: 0, all_argmax: true, stops: None, margin: f64::INFINITY }
    }
}

/// What one requested logits row told about its sample.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// A scored token: its NLL, whether it was the argmax, and its logit less the best other.
    Token { nll: f64, argmax: bool, margin: f64 },
    /// The row after the sample's last token: does its argmax end the line, and the best
    /// line-ending logit less the best other.
    Stop { ends: bool, margin: f64 },
}

fn set_score(sums: &[Tally]) -> SetScore {
    let nats: f64 = sums.iter().map(|s| s.nats).sum();
    let tokens: usize = sums.iter().map(|s| s.tokens).sum();
    let per_sample: Vec<SampleScore> = sums
        .iter()
        .map(|t| SampleScore { nll: t.nats / t.tokens as f64, tokens: t.tokens, exact: t.all_argmax && t.stops.unwrap_or(true), margin: t.margin })
        .collect();
    SetScore { mean_nll: nats / tokens as f64, tokens, exact: per_sample.iter().filter(|s| s.exact).count(), per_sample }
}

struct Group {
    key: (Option<usize>, u32),
    sets: Vec<usize>,
    plan: Vec<Decode>,
}

/// Tokens `start..end` of sample `sample` of set `set`, as sequence id = index in the decode,
/// followed by `pad` filler tokens of the same sequence (after the sample, so they change none
/// of its logits) that move the next sequence to an aligned KV cell.
#[derive(Debug, Clone, Copy)]
struct Piece {
    set: usize,
    sample: usize,
    start: usize,
    end: usize,
    pad: usize,
}

/// One `llama_decode` call.
#[derive(Debug, Clone)]
struct Decode {
    pieces: Vec<Piece>,
    /// The KV cache is cleared after this decode (false between chunks of one long sample).
    clear_after: bool,
}

/// Tokens every decode carries, filler included. llama.cpp's matrix kernels (tinyBLAS) take a
/// product only when its batch side is wide enough (2 tokens on x86-64; on Arm 4 for f32 and 8
/// for f16, which the attention's K and V are) and leave narrower ones to ggml's row-by-row dot
/// products, which sum in another order: a sample decoded alone, or the last chunk of a long
/// one, would score other bits than the same sample packed with others (on aarch64, up to 0.2
/// nats on one example). A smaller `n_batch` is raised to this.
pub const MIN_DECODE_TOKENS: usize = 8;

/// Every decode's tokens, and the rows of logits it asks for, are a multiple of this. ggml
/// repacks some weight types for the CPU it runs on (Q4_0 on x86-64 and Arm, Q8_0 on Arm: a Q8_0
/// output matrix, as in SmolLM2's Q4_1 files) and multiplies them four activation rows at a time,
/// the rows left over one by one, in another order: a row's bits would depend on whether it fell
/// in the remainder (on aarch64, 2e-6 nats on one example). Filler tokens, and logits asked of
/// tokens that need none, fill the last group.
pub const DECODE_ROWS_MULTIPLE: usize = 4;

/// The tokens a decode of `tokens` carries, filler included: at least [`MIN_DECODE_TOKENS`], a
/// multiple of [`DECODE_ROWS_MULTIPLE`].
fn decode_shape(tokens: usize) -> usize {
    tokens.max(MIN_DECODE_TOKENS).next_multiple_of(DECODE_ROWS_MULTIPLE)
}

/// Every packed sequence starts at a KV cell that is a multiple of this. llama.cpp multiplies the
/// attention probabilities by V with a SIMD kernel (tinyBLAS) whose lanes follow the KV cell
/// index, so a sequence at another offset sums in another order; the Q8 quantisation of
/// activations then turns that last-bit noise into differences of 0.01 nats. Aligned to the lane
/// count (8 floats with AVX2, 16 with AVX-512, SVE's vector length), a sample scores bit for
/// bit as it does alone. The lanes are those of the ggml CPU kernels that run, which with
/// run-time CPU variants are chosen when the backend loads, not when this crate is compiled:
/// so the alignment is asked of ggml ([`kv_align`]), never taken from `cfg!(target_feature)`.
pub fn kv_align() -> usize {
    static ALIGN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ALIGN.get_or_init(|| {
        // The CPU backend must be registered (loaded) before its features can be read.
        let _ = crate::llama::backend();
        kv_align_for(&crate::ffi::cpu_backend_features())
    })
}

/// [`kv_align`] for a list of ggml CPU features: at least 8 (which also covers 4-lane SSE and
/// NEON), 16 with AVX-512, the f32 lane count of SVE.
pub fn kv_align_for(features: &[(String, String)]) -> usize {
    let has = |name: &str| features.iter().any(|(n, v)| n == name && v != "0");
    let sve_lanes = features.iter().find(|(n, _)| n == "SVE_CNT").and_then(|(_, v)| v.parse::<usize>().ok()).map(|bytes| bytes / 4);
    let lanes = if has("AVX512") { 16 } else { 8 };
    lanes.max(sve_lanes.unwrap_or(0)).next_power_of_two()
}

/// Packs whole samples into decodes of at most `n_batch` tokens and `MAX_SEQUENCES` sequences,
/// first-fit decreasing (near-full batches, so throughput stays near the raw decode rate), each
/// sample starting at a multiple of `kv_align` (see [`kv_align`]); samples longer than a batch
/// get their own chained decodes.
fn plan_decodes(sets: &[Vec<SampleTokens>], which: &[usize], n_batch: usize, kv_align: usize) -> Vec<Decode> {
    let mut items: Vec<(usize, usize, usize)> =
        which.iter().flat_map(|&set| sets[set].iter().enumerate().map(move |(i, s)| (set, i, s.tokens.len()))).collect();
    items.sort_by_key(|item| std::cmp::Reverse(item.2));
    let max_seq = llama::MAX_SEQUENCES as usize;
    let mut plan = Vec::new();
    // Open batches: tokens used so far (the last piece's padding included), pieces.
    let mut open: Vec<(usize, Vec<Piece>)> = Vec::new();
    for (set, sample, len) in items {
        if len > n_batch {
            let mut start = 0;
            while start < len {
                let end = (start + n_batch).min(len);
                plan.push(Decode { pieces: vec![Piece { set, sample, start, end, pad: 0 }], clear_after: end == len });
                start = end;
            }
            continue;
        }
        let pad = len.next_multiple_of(kv_align) - len;
        let piece = Piece { set, sample, start: 0, end: len, pad };
        match open.iter_mut().find(|(used, pieces)| *used + len <= n_batch && pieces.len() < max_seq) {
            Some((used, pieces)) => {
                *used += len + pad;
                pieces.push(piece);
            }
            None => open.push((len + pad, vec![piece])),
        }
    }
    plan.extend(open.into_iter().map(|(_, pieces)| Decode { pieces, clear_after: true }));
    // Nothing follows the last sample of a decode, so it needs no alignment; its filler gives the
    // decode its shape ([`decode_shape`]) instead. Only a decode that clears the KV cache after
    // it, so no later chunk sees the filler (the others are n_batch tokens, already that shape).
    for d in plan.iter_mut().filter(|d| d.clear_after) {
        if let Some((last, rest)) = d.pieces.split_last_mut() {
            let tokens = rest.iter().map(|p| p.end - p.start + p.pad).sum::<usize>() + last.end - last.start;
            last.pad = decode_shape(tokens) - tokens;
        }
    }
    plan
}

/// Decodes one planned batch and returns, for every scored token, its (set, sample) and NLL.
/// `ends_line` is given when the stop after a completion is not itself scored: the row after
/// each sample's last token is then requested too, to judge whether greedy decoding stops.
fn run_decode(
    session: &mut llama::Session<'_>,
    batch: &mut Batch,
    sets: &[Vec<SampleTokens>],
    decode: &Decode,
    ends_line: Option<&[bool]>,
) -> Result<Vec<((usize, usize), Outcome)>> {
    batch.clear();
    let add = |batch: &mut Batch, token: Token, pos: usize, seq: usize, logits: bool| {
        batch.add(token, pos as i32, &[seq as i32], logits).map_err(|e| Error::Llama(format!("batch: {e}")))
    };
    // Every token in batch order: (token, position, sequence, what its row of logits is for:
    // (set, sample) and the target token, None for the row after the last token).
    type Wants = Option<((usize, usize), Option<usize>)>;
    let mut planned: Vec<(Token, usize, usize, Wants)> = Vec::new();
    for (seq, p) in decode.pieces.iter().enumerate() {
        let s = &sets[p.set][p.sample];
        for pos in p.start..p.end {
            let predicts_scored = pos + 1 >= s.first_scored && pos + 1 < s.tokens.len();
            let predicts_stop = ends_line.is_some() && pos + 1 == s.tokens.len();
            let wants = if predicts_scored {
                Some(((p.set, p.sample), Some(s.tokens[pos + 1].0 as usize)))
            } else if predicts_stop {
                Some(((p.set, p.sample), None))
            } else {
                None
            };
            planned.push((s.tokens[pos], pos, seq, wants));
        }
        let filler = s.tokens[p.end - 1];
        planned.extend((p.end..p.end + p.pad).map(|pos| (filler, pos, seq, None)));
    }
    // Rows asked of tokens that need none complete the last group of DECODE_ROWS_MULTIPLE.
    let wanted = planned.iter().filter(|t| t.3.is_some()).count();
    let mut spare_rows = wanted.next_multiple_of(DECODE_ROWS_MULTIPLE) - wanted;
    // (batch index, (set, sample), target token; None for the row after the last token)
    let mut outputs: Vec<(i32, (usize, usize), Option<usize>)> = Vec::with_capacity(wanted);
    for (token, pos, seq, wants) in planned {
        let spare = wants.is_none() && spare_rows > 0;
        spare_rows -= usize::from(spare);
        if let Some((sample, target)) = wants {
            outputs.push((batch.n_tokens(), sample, target));
        }
        add(batch, token, pos, seq, wants.is_some() || spare)?;
    }
    debug_assert_eq!(spare_rows, 0, "a decode's tokens are a multiple of DECODE_ROWS_MULTIPLE");
    session.decode(batch)?;
    let logits: Vec<&[f32]> = outputs.iter().map(|o| session.logits_ith(o.0)).collect();
    Ok(outputs
        .par_iter()
        .zip(logits.par_iter())
        .map(|(o, l)| {
            let best = llama::greedy_token(l).0 as usize;
            let outcome = match o.2 {
                Some(target) => {
                    Outcome::Token { nll: token_nll(l, target), argmax: best == target, margin: best_in_less_best_out(l, |j| j == target) }
                }
                None => {
                    let ends = |j: usize| ends_line.is_some_and(|e| e.get(j).copied().unwrap_or(false));
                    Outcome::Stop { ends: ends(best), margin: best_in_less_best_out(l, ends) }
                }
            };
            (o.1, outcome)
        })
        .collect())
}

/// The largest logit of the entries `inside` holds less the largest of the others: how far the
/// argmax is from leaving (or entering) that set.
fn best_in_less_best_out(logits: &[f32], inside: impl Fn(usize) -> bool) -> f64 {
    let (mut best_in, mut best_out) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (j, &v) in logits.iter().enumerate() {
        if inside(j) {
            best_in = best_in.max(v);
        } else {
            best_out = best_out.max(v);
        }
    }
    best_in as f64 - best_out as f64
}

/// `-log softmax(logits)[target]` in nats. The exponentials use a polynomial that the compiler
/// vectorises (a libm call per vocabulary entry would cost a noticeable part of a decode), with
/// a relative error below 1e-6 per term, and are summed in f64 blocks.
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    if logits.is_empty() || target >= logits.len() {
        return f64::NAN;
    }
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            if c[k] > lane_max[k] {
                lane_max[k] = c[k];
            }
        }
    }
    // NaN never wins a `>` comparison; it reaches the sum below instead and makes the result NaN.
    let max = lane_max.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        return f64::NAN;
    }
    let mut sum = 0f64;
    // Blocks of 1024 keep the f32 partial sums short, so their rounding stays below 1e-7.
    for block in logits.chunks(1024) {
        let mut lanes = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                lanes[k] += exp_nonpositive(c[k] - max);
            }
        }
        sum += lanes.iter().map(|&v| v as f64).sum::<f64>();
        sum += tail.iter().map(|&v| exp_nonpositive(v - max) as f64).sum::<f64>();
    }
    sum.ln() + max as f64 - logits[target] as f64
}

/// `e^x` for `x <= 0`: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-7 Taylor polynomial for
/// `e^r` (truncation error below 2e-8 relative), scaled by `2^n` through the exponent bits.
/// Inputs below -87 (where f32 would turn subnormal) give about `e^-87`, which is far below the
/// precision of any sum that also holds the `e^0 = 1` of the maximum.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| <= 127 (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    // A comparison, not `f32::max`, so that NaN stays NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The integer n sits in the low mantissa bits of `shifted`: reading it there instead of with
    // a float-to-int cast keeps the loop vectorised (Rust's saturating cast is not).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    p * scale
}

/// One row of a `score` report: a samples file under an adapter (`None` = the base model).
#[derive(Debug, Clone, Serialize)]
pub struct ScoreResult {
    pub adapter: Option<String>,
    pub samples_file: String,
    pub mean_nll: f64,
    pub tokens: usize,
    /// Samples that greedy decoding reproduces exactly ([`SampleScore::exact`]).
    pub exact: usize,
    pub per_sample: Vec<SampleScore>,
}

/// What `d2c-gguf score` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub results: Vec<ScoreResult>,
}

/// Scores every samples file under the base model and under each adapter (the work of
/// `d2c-gguf score`). Files are read and checked before anything is decoded.
pub fn score_files(base: &Path, sample_files: &[PathBuf], adapters: &[PathBuf], opts: ScoreOptions) -> Result<ScoreReport> {
    if sample_files.is_empty() {
        return Err(Error::Usage("no samples files given".into()));
    }
    let mut scorer = Scorer::new(base, opts)?;
    let files = sample_files.iter().map(|p| scorer.read_samples(p)).collect::<Result<Vec<_>>>()?;
    let mut indices = vec![None];
    for a in adapters {
        indices.push(Some(scorer.add_adapter(a)?));
    }
    let jobs: Vec<ScoreJob<'_>> =
        indices.iter().flat_map(|&adapter| files.iter().map(move |f| ScoreJob { adapter, scale: 1.0, samples: &f.samples })).collect();
    let scores = scorer.score(&jobs)?;
    let results = jobs
        .iter()
        .zip(scores)
        .zip(indices.iter().flat_map(|&a| files.iter().map(move |f| (a, f))))
        .map(|((_, s), (a, f))| ScoreResult {
            adapter: a.map(|i| adapters[i].display().to_string()),
            samples_file: f.path.display().to_string(),
            mean_nll: s.mean_nll,
            tokens: s.tokens,
            exact: s.exact,
            per_sample: s.per_sample,
        })
        .collect();
    Ok(ScoreReport { results })
}

impl ScoreReport {
    /// A readable table: one row per (adapter, samples file).
    pub fn to_table(&self) -> String {
        let adapter_name = |r: &ScoreResult| r.adapter.clone().unwrap_or_else(|| "(base)".into());
        let wa = self.results.iter().map(|r| adapter_name(r).len()).chain([7]).max().unwrap_or(7);
        let ws = self.results.iter().map(|r| r.samples_file.len()).chain([7]).max().unwrap_or(7);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<wa$}  {:<ws$}  {:>9}  {:>10}  {:>7}  {:>7}  {:>7}",
            "adapter", "samples", "mean NLL", "perplexity", "tokens", "samples", "exact"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<wa$}  {:<ws$}  {:>9.4}  {:>10.3}  {:>7}  {:>7}  {:>7}",
                adapter_name(r),
                r.samples_file,
                r.mean_nll,
                r.mean_nll.exp(),
                r.tokens,
                r.per_sample.len(),
                r.exact
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::kv_align_for;

    fn f(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn kv_alignment_follows_the_loaded_kernels_lanes() {
        assert_eq!(kv_align_for(&[]), 8);
        assert_eq!(kv_align_for(&f(&[("SSE3", "1"), ("SSSE3", "1")])), 8);
        assert_eq!(kv_align_for(&f(&[("AVX", "1"), ("AVX2", "1"), ("FMA", "1")])), 8);
        assert_eq!(kv_align_for(&f(&[("AVX2", "1"), ("AVX512", "1")])), 16);
        assert_eq!(kv_align_for(&f(&[("NEON", "1"), ("DOTPROD", "1")])), 8);
        // SVE_CNT is the vector length in bytes: 64 bytes = 16 f32 lanes.
        assert_eq!(kv_align_for(&f(&[("NEON", "1"), ("SVE", "1"), ("SVE_CNT", "64")])), 16);
        assert_eq!(kv_align_for(&f(&[("SVE", "1"), ("SVE_CNT", "16")])), 8);
    }
}
