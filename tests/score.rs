//! The scorer against llama.cpp itself: its numbers must equal what the logits say, whatever
//! the batching, and adapters must change them exactly as their scale says.

mod common;

use std::path::{Path, PathBuf};

use d2c_gguf::adapter::DType;
use d2c_gguf::base::BaseModel;
use d2c_gguf::llama::{Batch, Model};
use d2c_gguf::samples::Sample;
use d2c_gguf::score::{token_nll, ScoreJob, ScoreOptions, Scorer, SetScore};
use d2c_gguf::synth;

// One thread: tests of one binary run two at a time on CI's two cores, and llama.cpp's OpenMP
// threads spin at every graph barrier, so oversubscribing them costs far more than it gains.
const THREADS: i32 = 1;

fn opts(n_batch: u32) -> ScoreOptions {
    ScoreOptions { threads: Some(THREADS), n_batch, n_ctx: None, progress: false, ..ScoreOptions::default() }
}

/// A random rank-8 q/v adapter for the test model, written as F32.
fn write_adapter(dir: &Path, name: &str, delta_std: f32, seed: u64) -> PathBuf {
    let base = BaseModel::open(common::base_model()).unwrap();
    let a = synth::random_adapter(&base, &["attn_q", "attn_v"], 8, 16.0, delta_std, seed).unwrap();
    let p = dir.join(name);
    a.write(&p, DType::F32, &[]).unwrap();
    p
}

fn s(prompt: &str, completion: &str) -> Sample {
    Sample { prompt: prompt.into(), completion: completion.into() }
}

/// Samples of varied lengths and kinds (plain text, chat markup, a boundary that merges).
fn samples() -> Vec<Sample> {
    vec![
        s("The capital of France is", " Paris."),
        s("Translate to French: good morning\nFrench:", " bonjour"),
        s("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n", "12 + 30 = 42.<|im_end|>\n"),
        s("Hello wor", "ld, how are you today?"),
        s("List three colours:", " red, green and blue. These are the primary colours of light, which mix to white."),
        s("Q: Is the sky blue?\nA:", " Yes"),
        s("def add(a, b):\n", "    return a + b\n"),
        s(
            "Once upon a time, in a small village at the edge of a great forest, there lived an old \
             woodcutter and his three children. Every morning he walked into the forest",
            " with his axe on his shoulder, and every evening he came home tired but happy, carrying a \
             bundle of wood for the fire and sometimes a basket of mushrooms for supper.",
        ),
        s("2, 4, 6, 8,", " 10, 12, 14"),
        s("The opposite of hot is", " cold"),
    ]
}

fn assert_close(a: &SetScore, b: &SetScore, tol: f64, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: token counts");
    assert_eq!(a.per_sample.len(), b.per_sample.len(), "{what}: sample counts");
    for (i, (x, y)) in a.per_sample.iter().zip(&b.per_sample).enumerate() {
        assert_eq!(x.tokens, y.tokens, "{what}: sample {i} tokens");
        assert!((x.nll - y.nll).abs() <= tol, "{what}: sample {i}: {} vs {}", x.nll, y.nll);
    }
    assert!((a.mean_nll - b.mean_nll).abs() <= tol, "{what}: mean {} vs {}", a.mean_nll, b.mean_nll);
}

#[test]
fn adapter_at_scale_zero_is_the_base_and_at_one_changes_scores() {
    let dir = common::tempdir();
    let adapter = write_adapter(dir.path(), "a.gguf", 0.03, 1);
    let mut scorer = Scorer::new(&common::base_model(), opts(256)).unwrap();
    let a = scorer.add_adapter(&adapter).unwrap();
    let set = samples();
    let jobs = [
        ScoreJob::base(&set),
        ScoreJob { adapter: Some(a), scale: 0.0, samples: &set },
        ScoreJob { adapter: Some(a), scale: 1.0, samples: &set },
        ScoreJob::base(&set),
    ];
    let r = scorer.score(&jobs).unwrap();
    assert_close(&r[1], &r[0], 1e-9, "scale 0 vs base");
    assert_close(&r[3], &r[0], 0.0, "base twice in one call");
    // The adapter must matter, but not wreck the model: a noticeable, bounded change.
    let diffs: Vec<f64> = r[2].per_sample.iter().zip(&r[0].per_sample).map(|(x, y)| (x.nll - y.nll).abs()).collect();
    let mean_diff = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(mean_diff > 0.02, "adapter changed scores by only {mean_diff}");
    assert!(r[2].mean_nll < 3.0 * r[0].mean_nll + 2.0, "adapter wrecked the model: {} vs {}", r[2].mean_nll, r[0].mean_nll);
    // Scores are plausible language-model losses and the token-weighted mean is what it says.
    for set in &r {
        let nats: f64 = set.per_sample.iter().map(|p| p.nll * p.tokens as f64).sum();
        assert!((set.mean_nll - nats / set.tokens as f64).abs() < 1e-12);
        assert!(set.per_sample.iter().all(|p| p.nll.is_finite() && p.nll >= 0.0 && p.tokens >= 1));
    }
    assert!(r[0].mean_nll > 0.1 && r[0].mean_nll < 8.0, "base mean NLL {}", r[0].mean_nll);

    // A second call (new context) on the same scorer reproduces the first.
    let again = scorer.score(&[ScoreJob { adapter: Some(a), scale: 1.0, samples: &set }]).unwrap();
    assert_close(&again[0], &r[2], 1e-6, "second call");
}

#[test]
fn batched_scoring_equals_one_sample_at_a_time() {
    let dir = common::tempdir();
    let adapter = write_adapter(dir.path(), "a.gguf", 0.03, 2);
    let set = samples();
    let mut scorer = Scorer::new(&common::base_model(), opts(256)).unwrap();
    let a = scorer.add_adapter(&adapter).unwrap();
    let batched = scorer.score(&[ScoreJob::base(&set), ScoreJob::with_adapter(a, &set)]).unwrap();

    for (which, adapter) in [(0, None), (1, Some(a))] {
        let alone: Vec<_> = set
            .iter()
            .map(|x| {
                let one = std::slice::from_ref(x);
                scorer.score(&[ScoreJob { adapter, scale: 1.0, samples: one }]).unwrap().remove(0).per_sample[0]
            })
            .collect();
        for (i, (b, o)) in batched[which].per_sample.iter().zip(&alone).enumerate() {
            assert_eq!(b.tokens, o.tokens);
            assert!((b.nll - o.nll).abs() <= 1e-4, "adapter {adapter:?} sample {i}: batched {} alone {}", b.nll, o.nll);
        }
    }

    // Tiny batches (the long samples are decoded in chained chunks that keep their KV cache) and
    // large ones (a KV cache of 512 cells, all attended to).
    for n_batch in [16, 512] {
        let mut other = Scorer::new(&common::base_model(), opts(n_batch)).unwrap();
        let a = other.add_adapter(&adapter).unwrap();
        let r = other.score(&[ScoreJob::base(&set), ScoreJob::with_adapter(a, &set)]).unwrap();
        assert_close(&r[0], &batched[0], 1e-4, &format!("n_batch {n_batch} vs 256, base"));
        assert_close(&r[1], &batched[1], 1e-4, &format!("n_batch {n_batch} vs 256, adapter"));
    }
}

#[test]
fn decodes_of_a_few_tokens_give_the_same_bits_as_large_ones() {
    // llama.cpp's matrix kernels (tinyBLAS) refuse a product whose batch side is narrow (below 2
    // tokens everywhere, 4 with NEON's f32 kernel, 8 with its f16 one) and ggml's row-by-row dot
    // products sum in another order. A short sample decoded alone, or a long one whose last chunk
    // is a token or two, would then score other bits than the same sample packed with others.
    let dir = common::tempdir();
    let adapter = write_adapter(dir.path(), "a.gguf", 0.03, 3);
    let set = vec![s("The opposite of hot is", " cold"), s("2, 4, 6, 8,", " 10, 12, 14"), s("Hello wor", "ld, how are you today?")];
    let score = |n_batch: u32, samples: &[Sample]| {
        let mut scorer = Scorer::new(&common::base_model(), opts(n_batch)).unwrap();
        let a = scorer.add_adapter(&adapter).unwrap();
        scorer.score(&[ScoreJob::base(samples), ScoreJob::with_adapter(a, samples)]).unwrap()
    };
    let packed = score(256, &set);
    for n_batch in 1..=9 {
        for (i, sample) in set.iter().enumerate() {
            let alone = score(n_batch, std::slice::from_ref(sample));
            for (which, name) in [(0, "base"), (1, "adapter")] {
                let (x, y) = (alone[which].per_sample[0], packed[which].per_sample[i]);
                assert_eq!(
                    (x.nll.to_bits(), x.margin.to_bits(), x.exact),
                    (y.nll.to_bits(), y.margin.to_bits(), y.exact),
                    "sample {i}, {name}, alone at n_batch {n_batch} against packed at 256: nll {} vs {}, margin {} vs {}",
                    x.nll,
                    y.nll,
                    x.margin,
                    y.margin
                );
            }
        }
    }
}

/// Decodes `tokens` as one sequence and returns the logits after its last token.
fn last_logits(model: &Model, adapter: Option<(d2c_gguf::llama::AdapterId, f32)>, tokens: &[d2c_gguf::llama::Token]) -> Vec<f32> {
    let mut session = model.session(256, 256, 1, Some(THREADS)).unwrap();
    session.set_adapter(adapter).unwrap();
    let mut batch = Batch::new(256, 1);
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i + 1 == tokens.len()).unwrap();
    }
    session.decode(&mut batch).unwrap();
    session.logits_ith(tokens.len() as i32 - 1).to_vec()
}

fn log_softmax_f64(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

/// Adapters belong to the model they were loaded into (llama.cpp frees them with it): a
/// session refuses another model's adapter instead of applying tensors it does not own.
#[test]
fn a_session_refuses_an_adapter_of_another_model() {
    let dir = common::tempdir();
    let adapter_path = write_adapter(dir.path(), "a.gguf", 0.03, 3);
    let mut first = Model::load(common::base_model()).unwrap();
    let mut second = Model::load(common::base_model()).unwrap();
    let of_first = first.load_adapter(&adapter_path).unwrap();
    let of_second = second.load_adapter(&adapter_path).unwrap();
    assert_ne!(of_first, of_second);
    let mut session = second.session(64, 64, 1, Some(THREADS)).unwrap();
    let err = session.set_adapter(Some((of_first, 1.0))).unwrap_err().to_string();
    assert!(err.contains("was not loaded into"), "{err}");
    assert_eq!(session.active_adapter(), None, "a refused adapter must not become active");
    session.set_adapter(Some((of_second, 1.0))).unwrap();
    assert_eq!(session.active_adapter(), Some((of_second, 1.0)));
}

#[test]
fn one_token_completion_equals_log_softmax_of_raw_logits() {
    let dir = common::tempdir();
    let adapter_path = write_adapter(dir.path(), "a.gguf", 0.03, 3);
    let mut model = Model::load(common::base_model()).unwrap();
    let loaded = model.load_adapter(&adapter_path).unwrap();
    let mut scorer = Scorer::new(&common::base_model(), opts(256)).unwrap();
    let a = scorer.add_adapter(&adapter_path).unwrap();

    let mut compared = 0;
    for prompt in ["The capital of France is", "1, 2, 3, 4,", "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"] {
        let mut prompt_tokens = Vec::new();
        if model.adds_bos() {
            prompt_tokens.push(model.bos());
        }
        prompt_tokens.extend(model.tokenize(prompt, true));
        for (setting, job_adapter) in [(None, None), (Some((loaded, 1.0)), Some(a))] {
            let logits = last_logits(&model, setting, &prompt_tokens);
            // The best, the 3rd and the 20th candidate, as long as their text tokenises back to
            // exactly that one token after the prompt; all scored in one call (one batch).
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
            let mut candidates: Vec<(usize, Vec<Sample>)> = Vec::new();
            for &rank in &[0usize, 2, 19] {
                let target = order[rank];
                let Ok(text) = String::from_utf8(model.token_bytes(d2c_gguf::llama::Token(target as i32))) else { continue };
                if text.is_empty() {
                    continue;
                }
                let sample = s(prompt, &text);
                let st = scorer.tokenize_sample(&sample).unwrap();
                if st.first_scored != prompt_tokens.len() || st.n_scored() != 1 || st.tokens[st.first_scored].0 as usize != target {
                    continue;
                }
                candidates.push((target, vec![sample]));
            }
            let jobs: Vec<ScoreJob<'_>> = candidates.iter().map(|(_, one)| ScoreJob { adapter: job_adapter, scale: 1.0, samples: one }).collect();
            let got = scorer.score(&jobs).unwrap();
            for ((target, one), got) in candidates.iter().zip(&got) {
                let expected = -log_softmax_f64(&logits, *target);
                assert_eq!(got.tokens, 1);
                assert!(
                    (got.mean_nll - expected).abs() < 1e-4,
                    "prompt {prompt:?} completion {:?} adapter {setting:?}: scorer {} direct {expected}",
                    one[0].completion,
                    got.mean_nll
                );
                assert!((token_nll(&logits, *target) - expected).abs() < 1e-5);
                compared += 1;
            }
        }
    }
    assert!(compared >= 10, "only {compared} candidate tokens could be compared");
}

#[test]
fn token_nll_matches_f64_log_softmax() {
    let mut rng = synth::rng(7);
    for (n, spread) in [(49152usize, 10.0f32), (1000, 40.0), (17, 3.0), (5, 200.0)] {
        let logits: Vec<f32> = (0..n).map(|_| synth::normal(&mut rng) * spread).collect();
        for target in [0, n / 3, n - 1] {
            let want = -log_softmax_f64(&logits, target);
            let got = token_nll(&logits, target);
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "n {n} spread {spread}: {got} vs {want}");
        }
    }
    // Masked entries, and a NaN that must not pass silently.
    let mut l = vec![f32::NEG_INFINITY; 64];
    l[3] = 1.0;
    l[9] = 1.0;
    assert!((token_nll(&l, 3) - std::f64::consts::LN_2).abs() < 1e-7);
    assert_eq!(token_nll(&l, 4), f64::INFINITY);
    l[5] = f32::NAN;
    assert!(token_nll(&l, 3).is_nan());
}

#[test]
fn tokenisation_boundary_is_honest() {
    let scorer = Scorer::new(&common::base_model(), opts(256)).unwrap();
    let model = scorer.model();
    let bytes = |ts: &[d2c_gguf::llama::Token]| ts.iter().flat_map(|&t| model.token_bytes(t)).collect::<Vec<u8>>();
    let bos = usize::from(model.adds_bos());

    // A clean boundary: exactly the completion's tokens are scored.
    let clean = s("The capital of France is", " Paris.");
    let t = scorer.tokenize_sample(&clean).unwrap();
    assert_eq!(t.first_scored, bos + model.tokenize(&clean.prompt, true).len());
    assert_eq!(bytes(&t.tokens[t.first_scored..]), b" Paris.");

    // A merged boundary: scoring starts at the first token that differs from the prompt's own
    // tokenisation, so the scored bytes are the completion plus the merged prompt characters.
    let merged = s("Hello wor", "ld");
    let t = scorer.tokenize_sample(&merged).unwrap();
    let prompt_len = bos + model.tokenize(&merged.prompt, true).len();
    assert!(t.first_scored < prompt_len, "expected \"wor\" + \"ld\" to merge");
    let scored = bytes(&t.tokens[t.first_scored..]);
    let unscored = bytes(&t.tokens[..t.first_scored]);
    assert!(scored.ends_with(b"ld") && scored.len() > 2, "{:?}", String::from_utf8_lossy(&scored));
    assert_eq!([unscored, scored].concat(), b"Hello world");
}

#[test]
fn refuses_samples_too_long_or_jobs_that_make_no_sense() {
    let dir = common::tempdir();
    let long_line = format!("{{\"prompt\": \"{}\", \"completion\": \" end\"}}", "word ".repeat(60));
    let text = format!("{{\"prompt\": \"Question: a\", \"completion\": \" b\"}}\n\n{long_line}\n");
    let path = dir.path().join("long.jsonl");
    std::fs::write(&path, text).unwrap();
    let scorer = Scorer::new(&common::base_model(), ScoreOptions { n_ctx: Some(32), ..opts(256) }).unwrap();
    let err = scorer.read_samples(&path).expect_err("too long accepted").to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("line 3"), "{err}");
    assert!(err.contains("longer than the context allows (32)"), "{err}");

    // SmolLM2 adds no BOS token: a sample that is one token in all has nothing predictable.
    assert!(!scorer.model().adds_bos());
    let one = dir.path().join("one-token.jsonl");
    std::fs::write(&one, "{\"prompt\": \"Question: a\", \"completion\": \" b\"}\n{\"prompt\": \"\", \"completion\": \"Hello\"}\n").unwrap();
    let err = scorer.read_samples(&one).expect_err("unscorable sample accepted").to_string();
    assert!(err.contains(&one.display().to_string()) && err.contains("line 2: nothing to score"), "{err}");

    let mut scorer = Scorer::new(&common::base_model(), opts(256)).unwrap();
    let set = samples();
    let err = scorer.score(&[ScoreJob::with_adapter(0, &set)]).expect_err("missing adapter accepted");
    assert!(err.to_string().contains("no adapter #0"), "{err}");
    let err = scorer.score(&[ScoreJob::base(&[])]).expect_err("empty job accepted");
    assert!(err.to_string().contains("no samples"), "{err}");
    let err = scorer.add_adapter(&dir.path().join("missing.gguf")).expect_err("missing adapter file accepted");
    assert!(err.to_string().contains("missing.gguf"), "{err}");
}

#[test]
fn cli_scores_base_and_adapters_as_json_and_table() {
    let dir = common::tempdir();
    let adapter = write_adapter(dir.path(), "a.gguf", 0.03, 4);
    let set = samples();
    let (first, second) = set.split_at(6);
    let write_jsonl = |name: &str, xs: &[Sample]| {
        let p = dir.path().join(name);
        let text: String = xs.iter().map(|x| serde_json::to_string(x).unwrap() + "\n").collect();
        std::fs::write(&p, text).unwrap();
        p
    };
    let f1 = write_jsonl("one.jsonl", first);
    let f2 = write_jsonl("two.jsonl", second);
    let base = common::base_model();
    let args = [
        "score",
        "--base",
        common::path_str(&base),
        "--samples",
        common::path_str(&f1),
        common::path_str(&f2),
        "--adapter",
        common::path_str(&adapter),
        "--threads",
        "1",
        "--json",
    ];
    let (code, out, err) = common::run_cli(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);

    let mut scorer = Scorer::new(&base, opts(256)).unwrap();
    let a = scorer.add_adapter(&adapter).unwrap();
    let expected =
        scorer.score(&[ScoreJob::base(first), ScoreJob::base(second), ScoreJob::with_adapter(a, first), ScoreJob::with_adapter(a, second)]).unwrap();
    for (i, (r, e)) in results.iter().zip(&expected).enumerate() {
        let want_adapter = if i < 2 { serde_json::Value::Null } else { serde_json::json!(common::path_str(&adapter)) };
        assert_eq!(r["adapter"], want_adapter);
        assert_eq!(r["samples_file"], serde_json::json!(common::path_str(if i % 2 == 0 { &f1 } else { &f2 })));
        assert_eq!(r["tokens"].as_u64().unwrap() as usize, e.tokens);
        assert!((r["mean_nll"].as_f64().unwrap() - e.mean_nll).abs() < 1e-4);
        let per = r["per_sample"].as_array().unwrap();
        assert_eq!(per.len(), e.per_sample.len());
        for (p, q) in per.iter().zip(&e.per_sample) {
            assert_eq!(p["tokens"].as_u64().unwrap() as usize, q.tokens);
            assert!((p["nll"].as_f64().unwrap() - q.nll).abs() < 1e-4);
        }
    }

    let (code, out, err) = common::run_cli(&args[..args.len() - 1]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(base)") && out.contains("mean NLL") && out.contains(common::path_str(&adapter)), "{out}");
    assert_eq!(out.lines().count(), 5, "{out}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n").unwrap();
    let (code, _, err) = common::run_cli(&["score", "--base", common::path_str(&base), "--samples", common::path_str(&bad)]);
    assert_eq!(code, 1);
    assert!(err.contains(common::path_str(&bad)) && err.contains("line 2: completion: missing"), "{err}");
}

/// `--score-end newline` scores exactly what the completion written with its newline scores
/// (and adds no second newline to one that has it); `eog` adds one scored token, the model's
/// end of turn, whose cost is charged on top of the completion's.
#[test]
fn completion_end_scores_the_stop_after_the_answer() {
    use d2c_gguf::score::CompletionEnd;
    let plain: Vec<Sample> = samples().into_iter().filter(|x| !x.completion.ends_with('\n')).collect();
    let written: Vec<Sample> = plain.iter().map(|x| s(&x.prompt, &format!("{}\n", x.completion))).collect();
    let score = |end: CompletionEnd, set: &[Sample]| {
        let mut scorer = Scorer::new(&common::base_model(), ScoreOptions { end, ..opts(256) }).unwrap();
        scorer.score(&[ScoreJob::base(set)]).unwrap().remove(0)
    };
    let none = score(CompletionEnd::None, &plain);
    let written_none = score(CompletionEnd::None, &written);
    assert_close(&score(CompletionEnd::Newline, &plain), &written_none, 0.0, "newline end vs newline written");
    assert_close(&score(CompletionEnd::Newline, &written), &written_none, 0.0, "newline end on a written newline");
    let eog = score(CompletionEnd::Eog, &plain);
    for (i, (e, n)) in eog.per_sample.iter().zip(&none.per_sample).enumerate() {
        assert_eq!(e.tokens, n.tokens + 1, "sample {i}: eog adds one token");
        let (e_sum, n_sum) = (e.nll * e.tokens as f64, n.nll * n.tokens as f64);
        assert!(e_sum > n_sum + 1e-6, "sample {i}: the end-of-turn token costs nothing ({e_sum} vs {n_sum})");
    }
}
