//! Scoring speed against its limit: the raw `llama_decode` throughput of the same model, same
//! threads, same batch size, in-process; and the time to switch adapters.
//!
//!     cargo bench --bench score -- [--threads N] [--batch N] [--samples N] [--reps N] [--model PATH]
//!
//! Workload: seeded English-like samples (prompt 40-160 tokens, completion 8-64 tokens).
//! Reported:
//! - raw decode: full batches of `--batch` tokens, one sequence, logits for the last token only
//!   (the plain limit), and with logits at the same share of positions as the scorer requests
//!   (the limit for this workload, since each requested row costs an output projection);
//! - scorer: every token decoded per second (prompt + completion) and completion tokens per
//!   second, base model and a rank-8 q/v adapter applied;
//! - adapter switch: extra time of a decode right after switching adapters (llama.cpp rebuilds its
//!   graph reservation on the next decode), median of many switches.

use std::path::PathBuf;
use std::time::Instant;

use d2c_gguf::adapter::DType;
use d2c_gguf::base::BaseModel;
use d2c_gguf::llama::{Batch, Model, Session, SessionConfig, Token};
use d2c_gguf::samples::Sample;
use d2c_gguf::score::{token_nll, ScoreJob, ScoreOptions, Scorer};
use d2c_gguf::synth;
use rand::Rng;

struct Args {
    model: PathBuf,
    threads: i32,
    batch: u32,
    samples: usize,
    reps: usize,
}

fn args() -> Args {
    let mut a = Args { model: d2c_test_assets::base_model(), threads: d2c_gguf::llama::default_threads(), batch: 256, samples: 96, reps: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()),
            "--threads" => a.threads = value().parse().expect("--threads N"),
            "--batch" => a.batch = value().parse().expect("--batch N"),
            "--samples" => a.samples = value().parse().expect("--samples N"),
            "--reps" => a.reps = value().parse::<usize>().expect("--reps N").max(1),
            "--bench" => {} // added by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

const WORDS: &[&str] = &[
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "river",
    "house",
    "small",
    "green",
    "quickly",
    "because",
    "morning",
    "answer",
    "question",
    "number",
    "seven",
    "translate",
    "French",
    "city",
    "travelled",
    "across",
    "mountain",
    "under",
    "library",
    "bright",
    "computer",
    "program",
    "returns",
    "value",
    "list",
    "sorted",
    "order",
    "people",
    "often",
    "forget",
    "weather",
    "tomorrow",
    "yesterday",
    "colour",
    "blue",
    "reason",
    "simple",
    "example",
    "between",
];

fn text(rng: &mut impl Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if rng.random_range(0..12) == 0 { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        if rng.random_range(0..15) == 0 {
            s.push('.');
        }
    }
    s
}

fn workload(n: usize) -> Vec<Sample> {
    let mut rng = synth::rng(42);
    (0..n)
        .map(|_| {
            let p = rng.random_range(35..140);
            let c = rng.random_range(6..55);
            Sample { prompt: format!("Question: {}\nAnswer:", text(&mut rng, p)), completion: format!(" {}", text(&mut rng, c)) }
        })
        .collect()
}

/// Tokens per second of `rounds` decodes of one full `n_batch`-token sequence, requesting
/// logits at every `1/logit_share`-th position (and always the last).
fn raw_decode_rate(session: &mut Session<'_>, tokens: &[Token], n_batch: usize, logit_share: f64, rounds: usize) -> f64 {
    let mut batch = Batch::new(n_batch, 1);
    let fill = |batch: &mut Batch, round: usize| {
        batch.clear();
        let mut owed = 0.0;
        for i in 0..n_batch {
            owed += logit_share;
            let want = owed >= 1.0 || i + 1 == n_batch;
            if owed >= 1.0 {
                owed -= 1.0;
            }
            batch.add(tokens[(round * 7919 + i) % tokens.len()], i as i32, &[0], want).unwrap();
        }
    };
    // Warm-up: the first decode reserves buffers.
    fill(&mut batch, 0);
    session.decode(&mut batch).unwrap();
    session.clear_kv();
    let t = Instant::now();
    for r in 0..rounds {
        fill(&mut batch, r + 1);
        session.decode(&mut batch).unwrap();
        session.clear_kv();
    }
    (rounds * n_batch) as f64 / t.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args = args();
    let dir = tempfile::tempdir().unwrap();
    let base = BaseModel::open(&args.model).unwrap();
    let adapter_paths: Vec<PathBuf> = (0..2)
        .map(|k| {
            let a = synth::random_adapter(&base, &["attn_q", "attn_v"], 8, 16.0, 0.03, 100 + k).unwrap();
            let p = dir.path().join(format!("a{k}.gguf"));
            a.write(&p, DType::F32, &[]).unwrap();
            p
        })
        .collect();
    let samples = workload(args.samples);
    let n_batch = args.batch as usize;
    println!("model {}  threads {}  batch {}  samples {}  repetitions {}", args.model.display(), args.threads, args.batch, samples.len(), args.reps);

    let opts = ScoreOptions { threads: Some(args.threads), n_batch: args.batch, n_ctx: None, progress: false, ..ScoreOptions::default() };
    let mut scorer = Scorer::new(&args.model, opts).unwrap();
    let a0 = scorer.add_adapter(&adapter_paths[0]).unwrap();
    let tokenised: Vec<_> = samples.iter().map(|s| scorer.tokenize_sample(s).unwrap()).collect();
    let all_tokens: usize = tokenised.iter().map(|t| t.tokens.len()).sum();
    let scored_tokens: usize = tokenised.iter().map(|t| t.n_scored()).sum();
    let logit_share = scored_tokens as f64 / all_tokens as f64;
    println!("workload: {all_tokens} tokens, {scored_tokens} scored ({:.0} %)", 100.0 * logit_share);

    // The log-softmax of one vocabulary row, done on our side for every scored token.
    let row: Vec<f32> = {
        let mut rng = synth::rng(5);
        (0..scorer.model().n_vocab()).map(|_| synth::normal(&mut rng) * 8.0).collect()
    };
    let t = Instant::now();
    let mut acc = 0.0;
    for i in 0..2000 {
        acc += token_nll(&row, i);
    }
    assert!(acc.is_finite());
    println!("log-softmax of one {}-logit row: {:.1} us", row.len(), t.elapsed().as_secs_f64() / 2000.0 * 1e6);

    // Raw decode on a second instance of the model with the same adapters.
    let mut model = Model::load(&args.model).unwrap();
    let adapters: Vec<_> = adapter_paths.iter().map(|p| model.load_adapter(p).unwrap()).collect();
    let corpus: Vec<Token> = tokenised.iter().flat_map(|t| t.tokens.iter().copied()).collect();
    let rounds = all_tokens.div_ceil(n_batch).max(2);
    let cfg = SessionConfig { n_ctx: args.batch, n_batch: args.batch, n_seq: 1, threads: Some(args.threads), ..SessionConfig::default() };
    let mut fa_session = model.session_with(SessionConfig { flash_attention: true, ..cfg }).unwrap();
    // The scorer's own setting: plain attention (see crates/d2c-runtime/src/score.rs).
    let mut session = model.session_with(cfg).unwrap();

    // Scorer and raw decode alternate, so that a change in machine load hits both alike; the
    // ratios are taken within each repetition, then the median is reported.
    let mut score_once = |adapter: Option<usize>| {
        let job = [ScoreJob { adapter, scale: 1.0, samples: &samples }];
        let t = Instant::now();
        scorer.score(&job).unwrap();
        all_tokens as f64 / t.elapsed().as_secs_f64()
    };
    // Warm-up: first decodes reserve buffers.
    score_once(None);
    score_once(Some(a0));
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for rep in 0..args.reps {
        session.set_adapter(None).unwrap();
        let raw_last = raw_decode_rate(&mut session, &corpus, n_batch, 0.0, rounds);
        let raw_same = raw_decode_rate(&mut session, &corpus, n_batch, logit_share, rounds);
        let scored_base = score_once(None);
        session.set_adapter(Some((adapters[0], 1.0))).unwrap();
        let raw_lora = raw_decode_rate(&mut session, &corpus, n_batch, logit_share, rounds);
        let scored_lora = score_once(Some(a0));
        let raw_fa = raw_decode_rate(&mut fa_session, &corpus, n_batch, 0.0, rounds);
        println!(
            "rep {rep}: raw {raw_last:.0} / same-logits {raw_same:.0} / +adapter {raw_lora:.0} / flash-attn {raw_fa:.0}; \
             scorer {scored_base:.0} / +adapter {scored_lora:.0} tokens/s"
        );
        rows.push([raw_last, raw_same, raw_lora, raw_fa, scored_base, scored_lora, 0.0]);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let ratio = |a: usize, b: usize| median(rows.iter().map(|r| r[a] / r[b]).collect());

    // Adapter switch: a short decode right after a switch, against the same decode without one.
    let short = 8usize;
    let mut batch = Batch::new(n_batch, 1);
    let mut short_decode = |session: &mut Session<'_>| {
        batch.clear();
        for i in 0..short {
            batch.add(corpus[i], i as i32, &[0], i + 1 == short).unwrap();
        }
        let t = Instant::now();
        session.decode(&mut batch).unwrap();
        t.elapsed().as_secs_f64()
    };
    let mut plain = Vec::new();
    let mut switched = Vec::new();
    let mut set_only = Vec::new();
    for k in 0..30 {
        let t = Instant::now();
        session.set_adapter(Some((adapters[k % 2], 1.0))).unwrap();
        set_only.push(t.elapsed().as_secs_f64());
        switched.push(short_decode(&mut session));
        session.clear_kv();
        plain.push(short_decode(&mut session));
        session.clear_kv();
    }
    let switch_ms = (median(switched) - median(plain.clone())) * 1e3;

    println!();
    println!("medians over {} repetitions, tokens/s (prompt + completion tokens):", rows.len());
    println!("  raw llama_decode, logits for the last token only   {:>8.0}", col(0));
    println!("  raw llama_decode, logits at {:>3.0} % of positions     {:>8.0}", 100.0 * logit_share, col(1));
    println!("  raw llama_decode, same, adapter applied            {:>8.0}", col(2));
    println!("  raw llama_decode, flash attention, last logits     {:>8.0}  (not used: see crates/d2c-runtime/src/score.rs)", col(3));
    println!(
        "  scorer, base model                                 {:>8.0}  = {:.1} % of raw same-logits, {:.1} % of raw last-only",
        col(4),
        100.0 * ratio(4, 1),
        100.0 * ratio(4, 0)
    );
    println!(
        "  scorer, adapter applied                            {:>8.0}  = {:.1} % of raw same-logits with the adapter",
        col(5),
        100.0 * ratio(5, 2)
    );
    println!(
        "adapter switch (rank 8, attn_q + attn_v, 30 layers): {:.2} ms extra on the next decode \
         (llama_set_adapters_lora itself {:.3} ms; {short}-token decode {:.2} ms)",
        switch_ms,
        median(set_only) * 1e3,
        median(plain) * 1e3
    );
}
