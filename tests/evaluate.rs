//! `eval`: batched greedy generation must be exactly the one-prompt-at-a-time greedy decode, the
//! counting must be exact, and a manifest must route each task to its adapter after its hashes
//! check out.

mod common;

use std::path::{Path, PathBuf};

use d2c_gguf::adapter::DType;
use d2c_gguf::base::BaseModel;
use d2c_gguf::evaluate::{evaluate, prediction_of, AdapterChoice, EvalOptions};
use d2c_gguf::generate::{greedy, SYNTH_PROMPTS};
use d2c_gguf::llama::Model;
use d2c_gguf::synth;

const MAX_TOKENS: usize = 8;

fn opts() -> EvalOptions {
    // A small batch forces prompts across batch boundaries; one sequence at a time makes the
    // result exactly that of single greedy decoding (see the parallel test for why).
    EvalOptions { max_tokens: MAX_TOKENS, threads: Some(1), n_batch: 16, n_parallel: 1, keep_predictions: true, progress: false }
}

fn write_adapter(path: &Path, seed: u64) {
    let base = BaseModel::open(common::base_model()).unwrap();
    let a = synth::random_adapter(&base, &["attn_q", "attn_v"], 8, 16.0, 0.05, seed).unwrap();
    a.write(path, DType::F32, &[]).unwrap();
}

/// First lines of greedy generations, one prompt at a time, under `adapter` (or the base).
fn reference_first_lines(adapter: Option<&Path>, prompts: &[&str], max_tokens: usize) -> Vec<String> {
    let mut model = Model::load(common::base_model()).unwrap();
    let active = adapter.map(|p| (model.load_adapter(p).unwrap(), 1.0));
    let mut session = model.session(256, 256, 1, Some(1)).unwrap();
    session.set_adapter(active).unwrap();
    prompts.iter().map(|p| prediction_of(&greedy(&model, &mut session, p, max_tokens).unwrap()).to_string()).collect()
}

fn write_tests(path: &Path, rows: &[(&str, String)]) {
    let text: String = rows.iter().map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// Builds tasks `alpha` and `beta` whose test completions are the reference greedy answers under
/// their own adapters for every other prompt and a wrong answer for the rest. Returns the root
/// (`tests/`, `adapters/`) and the expected number of correct answers per task.
fn task_set() -> (tempfile::TempDir, Vec<(String, usize, Vec<String>)>) {
    let dir = common::tempdir();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    let mut expected = vec![];
    for (task, seed) in [("alpha", 11), ("beta", 12)] {
        let adapter = dir.path().join("adapters").join(format!("{task}.gguf"));
        write_adapter(&adapter, seed);
        // Prompts whose answer under this adapter is not an empty first line (a completion must
        // not be empty), at most 6.
        let all = reference_first_lines(Some(&adapter), &SYNTH_PROMPTS, MAX_TOKENS);
        let (prompts, answers): (Vec<&str>, Vec<String>) = SYNTH_PROMPTS.iter().copied().zip(all).filter(|(_, a)| !a.is_empty()).take(6).unzip();
        assert!(prompts.len() >= 4, "{task}: the adapter leaves too few non-empty answers");
        let mut rows = vec![];
        let mut correct = 0;
        for (i, (p, a)) in prompts.iter().zip(&answers).enumerate() {
            if i % 2 == 0 {
                rows.push((*p, format!(" {a}")));
                correct += 1;
            } else {
                rows.push((*p, format!(" not {a} at all")));
            }
        }
        write_tests(&dir.path().join("tests").join(format!("{task}.jsonl")), &rows);
        expected.push((task.to_string(), correct, answers));
    }
    (dir, expected)
}

#[test]
fn generation_equals_single_greedy_and_counts_exactly() {
    let (dir, expected) = task_set();
    let tests = dir.path().join("tests");
    let report = evaluate(&common::base_model(), &tests, &AdapterChoice::PerTask(dir.path().join("adapters")), &opts()).unwrap();
    assert_eq!(report.tasks.len(), 2);
    for (task, correct, answers) in &expected {
        let got = &report.tasks[task];
        let predicted: Vec<&str> = got.predictions.iter().map(|p| p.predicted.as_str()).collect();
        assert_eq!(predicted, answers.iter().map(|s| s.as_str()).collect::<Vec<_>>(), "{task}: predictions");
        assert_eq!(got.correct, *correct, "{task}: correct count");
        assert_eq!(got.total, answers.len());
        assert!(got.correct > 0 && got.correct < got.total, "{task}: the set mixes right and wrong answers");
        assert_eq!(got.adapter.as_deref(), Some(dir.path().join("adapters").join(format!("{task}.gguf")).as_path()));
    }
    let mean = expected.iter().map(|(t, c, _)| *c as f64 / report.tasks[t].total as f64).sum::<f64>() / 2.0;
    assert!((report.mean_accuracy - mean).abs() < 1e-12);

    // The base model is evaluated when no adapter is given, again exactly as single decoding.
    let base = evaluate(&common::base_model(), &tests, &AdapterChoice::Base, &opts()).unwrap();
    let prompts: Vec<&str> = base.tasks["alpha"].predictions.iter().map(|p| p.prompt.as_str()).collect();
    let reference = reference_first_lines(None, &prompts, MAX_TOKENS);
    let predicted: Vec<String> = base.tasks["alpha"].predictions.iter().map(|p| p.predicted.clone()).collect();
    assert_eq!(predicted, reference);
    assert!(base.tasks["alpha"].adapter.is_none());
    assert_ne!(predicted, expected[0].2, "the random adapter changes what the model generates");
}

fn cli(args: &[&str]) -> (i32, String, String) {
    common::run_cli(args)
}

/// `merge` of a small task set (`SET/adapters`, `SET/samples`) into `merged`, which must succeed.
fn merge_small_set(set: &Path, merged: &Path, extra: &[&str]) {
    let (base, adapters, samples) = (common::base_model(), set.join("adapters"), set.join("samples"));
    let mut args = vec!["merge", "--base", common::path_str(&base), "--adapters", common::path_str(&adapters)];
    args.extend_from_slice(&["--samples", common::path_str(&samples), "--threads", "1", "--out", common::path_str(merged)]);
    args.extend_from_slice(extra);
    let (code, _, err) = cli(&args);
    assert_eq!(code, 0, "{err}");
}

/// `eval --json --predictions` of `tests` (5 tokens per answer) with `extra`, which must succeed.
fn eval_json(tests: &Path, extra: &[&str]) -> serde_json::Value {
    let base = common::base_model();
    let mut args = vec!["eval", "--base", common::path_str(&base), "--tests", common::path_str(tests), "--threads", "1"];
    args.extend_from_slice(&["--max-tokens", "5", "--predictions", "--json"]);
    args.extend_from_slice(extra);
    let (code, stdout, err) = cli(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn manifest_routes_tasks_and_refuses_tampered_adapters() {
    let set = common::small_task_set(1, 2, 5);
    let out = common::tempdir();
    let merged = out.path().join("merged");
    let base = common::base_model();
    merge_small_set(&set, &merged, &["--budget", "2"]);
    let manifest = merged.join("manifest.json");
    let tests = set.join("samples");
    let eval_json = |extra: &[&str]| eval_json(&tests, extra);
    // With K >= N the manifest keeps every task's own adapter, so routing through it must give
    // exactly the per-task result.
    let via_manifest = eval_json(&["--manifest", common::path_str(&manifest)]);
    let own = eval_json(&["--adapters", common::path_str(&set.join("adapters"))]);
    assert_eq!(via_manifest["tasks"].as_object().unwrap().len(), 2);
    for (task, r) in own["tasks"].as_object().unwrap() {
        assert_eq!(via_manifest["tasks"][task]["correct"], r["correct"], "{task}");
        assert_eq!(via_manifest["tasks"][task]["total"], r["total"], "{task}");
        assert_eq!(via_manifest["tasks"][task]["predictions"], r["predictions"], "{task}");
        let routed = PathBuf::from(via_manifest["tasks"][task]["adapter"].as_str().unwrap());
        assert!(routed.starts_with(&merged), "{task} routed to {}", routed.display());
    }
    // The examples are 5-token greedy continuations under the prototypes, of which the noisy
    // task copies reproduce some; what matters here is that routing changes nothing.
    let base_run = eval_json(&[]);
    assert_ne!(base_run["tasks"], own["tasks"], "adapters change the generations");

    // One flipped byte in a merged adapter: refused, naming the manifest field.
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let file = merged.join(m["adapters"][0]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let (code, _, err) =
        cli(&["eval", "--base", common::path_str(&base), "--tests", common::path_str(&tests), "--manifest", common::path_str(&manifest)]);
    assert_eq!(code, 1);
    assert!(err.contains("adapters[0].blake3") && err.contains("manifest.json"), "{err}");
}

#[test]
fn refuses_missing_tests_and_adapters_before_any_work() {
    let dir = common::tempdir();
    let base = common::base_model();
    let (code, _, err) = cli(&["eval", "--base", common::path_str(&base), "--tests", common::path_str(dir.path())]);
    assert_eq!(code, 1);
    assert!(err.contains("no <task>.jsonl files") && err.contains(common::path_str(dir.path())), "{err}");

    write_tests(&dir.path().join("gamma.jsonl"), &[("Q: 1+1?\nA:", " 2".to_string())]);
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let (code, _, err) =
        cli(&["eval", "--base", common::path_str(&base), "--tests", common::path_str(dir.path()), "--adapters", common::path_str(&adapters)]);
    assert_eq!(code, 1);
    assert!(err.contains("gamma.gguf") && err.contains("task gamma"), "{err}");

    std::fs::write(dir.path().join("delta.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let (code, _, err) = cli(&["eval", "--base", common::path_str(&base), "--tests", common::path_str(dir.path())]);
    assert_eq!(code, 1);
    assert!(err.contains("delta.jsonl") && err.contains("line 1"), "{err}");
}

/// Decoding many prompts together changes llama.cpp's floating-point summation order (the batch
/// shape picks the matmul kernel and its blocking), so a near-tie between two tokens may go the
/// other way. A mix-up between sequences would instead derail most generations: allow the first,
/// catch the second. Parallel runs are still deterministic for fixed options.
#[test]
fn parallel_decoding_agrees_with_single_decoding_and_is_deterministic() {
    let dir = common::tempdir();
    let tests = dir.path().join("tests");
    std::fs::create_dir_all(&tests).unwrap();
    let rows: Vec<(&str, String)> = SYNTH_PROMPTS.iter().map(|p| (*p, " x".to_string())).collect();
    write_tests(&tests.join("t.jsonl"), &rows);
    let run = |n_parallel: usize, n_batch: u32| -> Vec<String> {
        let o = EvalOptions { max_tokens: 16, n_parallel, n_batch, ..opts() };
        let report = evaluate(&common::base_model(), &tests, &AdapterChoice::Base, &o).unwrap();
        report.tasks["t"].predictions.iter().map(|p| p.predicted.clone()).collect()
    };
    let single = run(1, 16);
    let reference = reference_first_lines(None, &SYNTH_PROMPTS, 16);
    assert_eq!(single, reference, "one sequence at a time is exactly single greedy decoding");
    for (n_parallel, n_batch) in [(8, 256), (24, 64)] {
        let parallel = run(n_parallel, n_batch);
        let same = parallel.iter().zip(&single).filter(|(a, b)| a == b).count();
        assert!(same >= 20, "{n_parallel} parallel: only {same}/24 generations agree: {parallel:?} vs {single:?}");
        assert_eq!(run(n_parallel, n_batch), parallel, "{n_parallel} parallel: deterministic");
    }
}

/// The scorer's one-pass verdict (every completion token the argmax, then a token that ends
/// the line) against `eval --parallel 1` on the same examples: the demo set's four real
/// adapters, each under its own adapter and under the base model (80 judgements, right and
/// wrong ones both). They may differ only where the completion is tokenised differently after
/// its prompt than greedy decoding produces it; each difference is printed.
#[test]
fn the_scorers_exact_verdict_agrees_with_greedy_eval() {
    use d2c_gguf::samples::read_samples;
    use d2c_gguf::score::{ScoreJob, ScoreOptions, Scorer};
    let set = common::demo_set();
    let mut scorer = Scorer::new(&common::base_model(), ScoreOptions { threads: Some(2), ..ScoreOptions::default() }).unwrap();
    let tasks = ["arith-add", "arith-mul", "case-kebab", "case-snake"];
    let samples: Vec<_> = tasks.iter().map(|t| read_samples(&set.join(format!("samples/{t}.jsonl"))).unwrap()).collect();
    let adapters: Vec<usize> = tasks.iter().map(|t| scorer.add_adapter(&set.join(format!("adapters/{t}.gguf"))).unwrap()).collect();
    let mut jobs = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        jobs.push(ScoreJob::with_adapter(adapters[i], s));
        jobs.push(ScoreJob::base(s));
    }
    let scores = scorer.score(&jobs).unwrap();
    drop(scorer);
    let eval_opts = EvalOptions { n_parallel: 1, max_tokens: 32, keep_predictions: true, threads: Some(2), ..EvalOptions::default() };
    let own = evaluate(&common::base_model(), &set.join("samples"), &AdapterChoice::PerTask(set.join("adapters")), &eval_opts).unwrap();
    let base = evaluate(&common::base_model(), &set.join("samples"), &AdapterChoice::Base, &eval_opts).unwrap();
    let (mut agree, mut total, mut right) = (0, 0, 0);
    let (mut near_edge, mut far) = (0, 0);
    for (i, task) in tasks.iter().enumerate() {
        for (score, report) in [(&scores[2 * i], &own), (&scores[2 * i + 1], &base)] {
            for (s, p) in score.per_sample.iter().zip(&report.tasks[*task].predictions) {
                total += 1;
                right += p.correct as usize;
                // The margin is the verdict's distance from flipping: its sign is the verdict.
                assert!(s.margin.is_finite() && (s.margin > 0.0) == s.exact, "{task}: margin {} with verdict {}", s.margin, s.exact);
                if s.margin.abs() < 1.0 {
                    near_edge += 1;
                } else {
                    far += 1;
                }
                if s.exact == p.correct {
                    agree += 1;
                } else {
                    eprintln!("{task}: verdict {} but eval {} ({:?} -> {:?}, expected {:?})", s.exact, p.correct, p.prompt, p.predicted, p.expected);
                }
            }
        }
    }
    eprintln!("one-pass verdict agrees with eval --parallel 1 on {agree}/{total} examples ({right} right by eval)");
    assert_eq!(total, 80);
    // Both outcomes occur, so agreement is not trivial.
    assert!(right > 10 && right < 70, "{right} of 80 right");
    assert!(agree >= 78, "verdict agrees with greedy eval on only {agree}/{total}");
    eprintln!("margins: {near_edge} within 1 logit of flipping, {far} farther");
    assert!(far > 0, "every margin near zero: not a logit difference");
}

#[test]
fn eval_serves_each_task_at_its_manifest_scale() {
    // Two tasks in one merged adapter; the manifest serves the first at 2. Its answers must be
    // those of the same adapter with lora_b doubled (exact in f16), the other task's unchanged.
    let set = common::small_task_set(1, 2, 5);
    let out = common::tempdir();
    let merged = out.path().join("merged");
    let base = common::base_model();
    merge_small_set(&set, &merged, &["--budget", "1", "--no-tune"]);
    let manifest_path = merged.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let tasks: Vec<String> = m["tasks"].as_object().unwrap().keys().cloned().collect();
    assert!(m.get("task_scales").is_none(), "--no-tune serves every task at 1: {}", m["task_scales"]);
    m["task_scales"] = serde_json::json!({ &tasks[0]: 2.0 });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&m).unwrap()).unwrap();

    let shared = merged.join(m["adapters"][0]["file"].as_str().unwrap());
    let mut doubled = d2c_gguf::adapter::LoraAdapter::read(&shared).unwrap();
    for t in doubled.targets.values_mut() {
        t.b.iter_mut().for_each(|b| *b *= 2.0);
    }
    let by_hand = out.path().join("by-hand");
    std::fs::create_dir_all(&by_hand).unwrap();
    doubled.write(&by_hand.join(format!("{}.gguf", tasks[0])), DType::F16, &[]).unwrap();
    std::fs::copy(&shared, by_hand.join(format!("{}.gguf", tasks[1]))).unwrap();

    let tests = set.join("samples");
    let eval_json = |extra: &[&str]| eval_json(&tests, extra);
    let scaled = eval_json(&["--manifest", common::path_str(&manifest_path)]);
    let reference = eval_json(&["--adapters", common::path_str(&by_hand)]);
    for t in &tasks {
        assert_eq!(scaled["tasks"][t]["predictions"], reference["tasks"][t]["predictions"], "task {t}");
    }
    assert_eq!(scaled["tasks"][&tasks[0]]["scale"], 2.0);
    assert_eq!(scaled["tasks"][&tasks[1]]["scale"], 1.0);
    // At 1 the first task answers otherwise, or the scale could have been dropped unseen.
    m["task_scales"] = serde_json::json!({});
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let at_one = eval_json(&["--manifest", common::path_str(&manifest_path)]);
    assert_ne!(at_one["tasks"][&tasks[0]]["predictions"], scaled["tasks"][&tasks[0]]["predictions"]);

    // A scale the manifest cannot carry is refused, naming the field.
    m["task_scales"] = serde_json::json!({ &tasks[0]: -1.0 });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let (code, _, err) = cli(&[
        "eval",
        "--base",
        common::path_str(&base),
        "--tests",
        common::path_str(&set.join("samples")),
        "--manifest",
        common::path_str(&manifest_path),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("task_scales.{}", tasks[0])) && err.contains("manifest.json"), "{err}");
}
