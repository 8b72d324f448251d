//! `d2c-gguf merge` end to end on a task set with known structure: prototype adapters, tasks
//! that are noisy copies of them, examples decoded greedily under each prototype.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use d2c_gguf::adapter::{DType, LoraAdapter};
use d2c_gguf::base::BaseModel;
use d2c_gguf::cluster;
use d2c_gguf::generate::{synth_tasks, SynthTaskOptions};
use d2c_gguf::manifest::{hash_file, Manifest};
use d2c_gguf::synth;

const GROUPS: usize = 2;
const PER_GROUP: usize = 2;

/// The task set, generated once per test binary.
fn task_set() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::tempdir().keep();
        let opts = SynthTaskOptions {
            groups: GROUPS,
            tasks_per_group: PER_GROUP,
            examples: 6,
            completion_tokens: 5,
            prototype_std: 0.05,
            noise: 0.2,
            seed: 3,
            ..Default::default()
        };
        synth_tasks(&common::base_model(), &dir, &opts).expect("synthetic tasks");
        dir
    })
}

fn merge(extra: &[&str], out: &Path) -> (i32, String, String) {
    merge_set(task_set(), extra, out)
}

/// `merge` of the task set in `set` (its `adapters/` and `samples/`).
fn merge_set(set: &Path, extra: &[&str], out: &Path) -> (i32, String, String) {
    let base = common::base_model();
    let mut args = vec![
        "merge".to_string(),
        "--base".into(),
        base.display().to_string(),
        "--adapters".into(),
        set.join("adapters").display().to_string(),
        "--samples".into(),
        set.join("samples").display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--threads".into(),
        "2".into(),
        "--tune-scales".into(),
        "1,1.5".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run_cli(&refs)
}

fn groups_of(m: &Manifest) -> BTreeSet<BTreeSet<String>> {
    m.adapters.iter().map(|a| a.tasks.iter().cloned().collect()).collect()
}

fn true_groups() -> BTreeSet<BTreeSet<String>> {
    (0..GROUPS).map(|g| (0..PER_GROUP).map(|t| format!("g{g}-t{t}")).collect()).collect()
}

/// A seed whose random partition of the 4 tasks into 2 clusters splits the true groups.
fn bad_random_seed() -> u64 {
    (0..100)
        .find(|&s| {
            let a = cluster::random_partition(GROUPS * PER_GROUP, GROUPS, s);
            // tasks are sorted by name: g0-t0, g0-t1, g1-t0, g1-t1
            a[0] != a[1]
        })
        .unwrap()
}

/// Total bytes of the task set's input adapters.
fn input_bytes() -> u64 {
    std::fs::read_dir(task_set().join("adapters")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Every adapter of a merge output passes `validate` against the base, as llama.cpp's loader
/// checks it.
fn assert_valid_adapters(out: &Path, m: &Manifest) {
    for a in &m.adapters {
        let p = out.join(&a.file);
        let (code, o, e) = common::run_cli(&["validate", "--base", common::path_str(&common::base_model()), common::path_str(&p)]);
        assert_eq!(code, 0, "{}: {o}{e}", a.file);
    }
}

/// A budget nothing fits: a clear error naming --budget-bytes, and nothing written.
fn assert_budget_refused(args: &[&str], out: &Path) {
    let (code, _, e) = merge(args, out);
    assert_eq!(code, 1);
    assert!(e.contains("--budget-bytes"), "{e}");
    assert!(!out.exists());
}

fn check_manifest(out: &Path) -> Manifest {
    let m = Manifest::read(&out.join("manifest.json")).unwrap();
    assert_eq!(hash_file(&m.base.file).unwrap(), m.base.blake3);
    for a in &m.adapters {
        let p = out.join(&a.file);
        assert_eq!(hash_file(&p).unwrap(), a.blake3, "{}", a.file);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), a.bytes);
    }
    // Every task exactly once, in the adapter the task map names.
    let mut seen = BTreeSet::new();
    for (i, a) in m.adapters.iter().enumerate() {
        for t in &a.tasks {
            assert!(seen.insert(t.clone()), "task {t} twice");
            assert_eq!(m.tasks[t], i);
        }
    }
    assert_eq!(seen.len(), GROUPS * PER_GROUP);
    assert_eq!(seen, m.tasks.keys().cloned().collect());
    // Serve scales come from the grid, and only for tasks that share an adapter.
    let grid: Vec<f32> = m.settings["serve_scales"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    for (t, s) in &m.task_scales {
        assert!(grid.contains(s) || *s == 1.0, "task {t} at {s}, grid {grid:?}");
        assert!(m.adapters[m.tasks[t]].tasks.len() > 1 || *s == 1.0, "task {t} keeps its own adapter, yet is served at {s}");
    }
    m
}

#[test]
fn d2c_recovers_the_groups_from_a_bad_start() {
    let dir = common::tempdir();
    let seed = bad_random_seed().to_string();
    // One start only: the rounds alone must find the groups, whichever screen picks the moves
    // to judge (the activation model, or every task scored under every cluster).
    for screen in ["activations", "scored"] {
        let out = dir.path().join(format!("out-{screen}"));
        let (code, stdout, stderr) = merge(&["--budget", "2", "--init", "random", "--seed", &seed, "--restarts", "1", "--screen", screen], &out);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let m = check_manifest(&out);
        assert_eq!(m.settings["screen"], screen);
        let start: BTreeSet<BTreeSet<String>> = m.rounds[0].clusters.iter().map(|c| c.iter().cloned().collect()).collect();
        assert_ne!(start, true_groups(), "the start must be wrong for this test to mean anything");
        assert_eq!(groups_of(&m), true_groups(), "{screen} screen, rounds: {:?}", m.rounds);
        assert!(m.objective.best < m.rounds[0].objective, "objective did not improve: {:?}", m.rounds);
        assert!(m.rounds.len() >= 2);
        // The activation model ran (N forward passes) and was set against what scoring found.
        let fit = m.interference.as_ref().expect("manifest.interference");
        assert!(fit.pairs >= 2, "{fit:?}");
        assert!(m.timings.contains_key("activations"));
        // The report shows every task.
        for t in m.tasks.keys() {
            assert!(stdout.contains(t.as_str()), "{stdout}");
        }
        // The outputs are real adapters for the base.
        let base = BaseModel::open(common::base_model()).unwrap();
        for a in &m.adapters {
            let problems = d2c_gguf::validate::validate_adapter(&base, &out.join(&a.file));
            assert!(problems.is_empty(), "{problems:?}");
        }
    }

    // With restarts (the default) the same bad start is one of several, each scored on its own
    // clusters, and the rounds start from the best: the groups are found, from a start no
    // worse than the bad one.
    let restarted = dir.path().join("restarted");
    let (code, stdout, stderr) = merge(&["--budget", "2", "--init", "random", "--seed", &seed], &restarted);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let r = check_manifest(&restarted);
    let starts = r.settings["starts"].as_array().expect("settings.starts");
    // Four asked for; four tasks split 2 + 2 have only three distinct partitions.
    assert!((2..=4).contains(&starts.len()), "{starts:?}");
    assert_eq!(starts[0]["start"], "random");
    let best_start = starts.iter().map(|s| s["objective"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
    assert!((r.rounds[0].objective - best_start).abs() < 1e-9, "round 0 is the best start: {:?} vs {starts:?}", r.rounds[0]);
    assert!(best_start <= starts[0]["objective"].as_f64().unwrap());
    assert_eq!(groups_of(&r), true_groups(), "rounds: {:?}", r.rounds);
}

#[test]
fn d2c_from_anticlusters_lets_kmeans_compete_where_alike_tasks_merge_well() {
    // Here alike adapters are noisy copies of one skill, so the anticluster start (each
    // prototype split) is the wrong one; k-medoids competes among the starts and the scored
    // objective must prefer it, and the rounds keep the groups.
    let dir = common::tempdir();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = merge(&["--budget", "2", "--init", "anticluster"], &out);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = check_manifest(&out);
    assert_eq!(m.settings["init"], "anticluster");
    let starts = m.settings["starts"].as_array().expect("settings.starts");
    assert_eq!((starts[0]["start"].as_str(), starts[1]["start"].as_str()), (Some("anticluster"), Some("kmeans")), "{starts:?}");
    let objective = |i: usize| starts[i]["objective"].as_f64().unwrap();
    let similarity = |i: usize| starts[i]["within_similarity"].as_f64().unwrap();
    assert!(similarity(0) < similarity(1), "anticlusters gather the less alike: {starts:?}");
    assert!(objective(1) < objective(0), "merging copies of one skill serves them better: {starts:?}");
    assert!((m.rounds[0].objective - objective(1)).abs() < 1e-9, "the rounds start from k-medoids: {:?}", m.rounds[0]);
    assert_eq!(groups_of(&m), true_groups(), "rounds: {:?}", m.rounds);
}

#[test]
fn baselines_behave_as_defined() {
    let dir = common::tempdir();
    let single = dir.path().join("single");
    let (code, o, e) = merge(&["--budget", "2", "--strategy", "single", "--no-tune"], &single);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&single);
    assert_eq!(m.adapters.len(), 1);
    assert_eq!(m.rounds.len(), 1);

    let kmeans = dir.path().join("kmeans");
    let (code, o, e) = merge(&["--budget", "2", "--strategy", "kmeans", "--no-tune"], &kmeans);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&kmeans);
    assert_eq!(m.adapters.len(), 2);
    assert_eq!(m.rounds.len(), 1, "kmeans does not refine");
    // Noisy copies of one prototype are nearest neighbours in weight space.
    assert_eq!(groups_of(&m), true_groups());

    // Anticlusters keep alike adapters apart: here each cluster holds one copy of each
    // prototype, the opposite of k-means.
    let anti = dir.path().join("anticluster");
    let (code, o, e) = merge(&["--budget", "2", "--strategy", "anticluster", "--no-tune"], &anti);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&anti);
    assert_eq!(m.rounds.len(), 1, "anticluster does not refine");
    for a in &m.adapters {
        let prototypes: BTreeSet<&str> = a.tasks.iter().map(|t| &t[..2]).collect();
        assert_eq!((a.tasks.len(), prototypes.len()), (PER_GROUP, GROUPS), "{:?}", m.adapters);
    }

    let seed = bad_random_seed().to_string();
    let random = dir.path().join("random");
    let (code, o, e) = merge(&["--budget", "2", "--strategy", "random", "--seed", &seed, "--no-tune"], &random);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&random);
    assert_eq!(m.adapters.len(), 2);
    assert_ne!(groups_of(&m), true_groups());
    assert!(m.adapters.iter().all(|a| !a.tasks.is_empty()));
}

#[test]
fn budget_at_least_n_keeps_each_task_adapter() {
    let dir = common::tempdir();
    let out = dir.path().join("out");
    let (code, o, e) = merge(&["--budget", "9", "--dtype", "f32"], &out);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&out);
    assert_eq!(m.adapters.len(), GROUPS * PER_GROUP);
    for a in &m.adapters {
        assert_eq!(a.tasks.len(), 1);
        assert!(a.merge.is_none());
        let ours = LoraAdapter::read(out.join(&a.file)).unwrap();
        let input = LoraAdapter::read(task_set().join("adapters").join(format!("{}.gguf", a.tasks[0]))).unwrap();
        // Same deltas (the inputs are f16, the output f32: values carry over exactly).
        assert_eq!(ours.targets.len(), input.targets.len());
        for (name, t) in &input.targets {
            let o = &ours.targets[name];
            assert_eq!((&o.a, &o.b, o.rank), (&t.a, &t.b, t.rank), "{} {name}", a.tasks[0]);
        }
        assert_eq!(ours.alpha, input.alpha);
        assert!(m.scores[&a.tasks[0]].regret.abs() < 1e-9);
    }
}

#[test]
fn same_inputs_and_seed_give_identical_outputs_and_the_cache_saves_work() {
    let dir = common::tempdir();
    let cache = dir.path().join("cache");
    let cache_s = cache.display().to_string();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let args = ["--budget", "2", "--init", "random", "--seed", "5", "--cache", &cache_s];
    let (code, o, e) = merge(&args, &a);
    assert_eq!(code, 0, "{o}{e}");
    let (code, o, e) = merge(&args, &b);
    assert_eq!(code, 0, "{o}{e}");
    let (ma, mb) = (check_manifest(&a), check_manifest(&b));
    for (x, y) in ma.adapters.iter().zip(&mb.adapters) {
        assert_eq!(std::fs::read(a.join(&x.file)).unwrap(), std::fs::read(b.join(&y.file)).unwrap());
    }
    let strip = |m: &Manifest| {
        let mut m = m.clone();
        m.timings.clear();
        m.peak_memory_mib.clear();
        for r in &mut m.rounds {
            r.scored_sequences = 0;
            r.cached_sequences = 0;
        }
        m.scoring.scored_sequences = 0;
        m.scoring.cached_sequences = 0;
        m
    };
    assert_eq!(strip(&ma), strip(&mb));
    assert!(ma.scoring.scored_sequences > 0);
    assert_eq!(mb.scoring.scored_sequences, 0, "the second run must reuse every score from --cache");
    assert_eq!(mb.scoring.cached_sequences, ma.scoring.scored_sequences + ma.scoring.cached_sequences);
}

#[test]
fn bad_inputs_are_refused_before_any_work_and_nothing_is_written() {
    let set = task_set();
    let dir = common::tempdir();
    let out = dir.path().join("out");
    let base = common::base_model();

    // Budget 0.
    let (code, _, e) = merge(&["--budget", "0"], &out);
    assert_eq!(code, 1);
    assert!(e.contains("--budget"), "{e}");
    assert!(!out.exists());

    // A task without samples and samples without a task.
    let adapters = dir.path().join("adapters");
    let samples = dir.path().join("samples");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::create_dir_all(&samples).unwrap();
    std::fs::copy(set.join("adapters/g0-t0.gguf"), adapters.join("alpha.gguf")).unwrap();
    std::fs::copy(set.join("samples/g0-t1.jsonl"), samples.join("beta.jsonl")).unwrap();
    let run = |adapters: &Path, samples: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--base",
            common::path_str(&base),
            "--adapters",
            common::path_str(adapters),
            "--samples",
            common::path_str(samples),
            "--budget",
            "1",
            "--out",
            common::path_str(&out),
        ];
        args.extend_from_slice(extra);
        common::run_cli(&args)
    };
    let (code, _, e) = run(&adapters, &samples, &[]);
    assert_eq!(code, 1);
    assert!(e.contains("task alpha") && e.contains("alpha.jsonl"), "{e}");
    assert!(e.contains("task beta") && e.contains("beta.gguf"), "{e}");
    assert!(!out.exists());

    // An adapter for another base model.
    std::fs::copy(set.join("samples/g0-t0.jsonl"), samples.join("alpha.jsonl")).unwrap();
    let mut other = LoraAdapter::read(set.join("adapters/g0-t1.gguf")).unwrap();
    other.architecture = "qwen2".into();
    other.write(&adapters.join("beta.gguf"), DType::F16, &[]).unwrap();
    let (code, _, e) = run(&adapters, &samples, &[]);
    assert_eq!(code, 1);
    assert!(e.contains("task beta") && e.contains("general.architecture") && e.contains("qwen2"), "{e}");
    assert!(!out.exists());

    // A broken samples file names the file and line.
    synth::random_adapter(&BaseModel::open(&base).unwrap(), &["attn_q"], 4, 4.0, 0.01, 1)
        .unwrap()
        .write(&adapters.join("beta.gguf"), DType::F16, &[])
        .unwrap();
    std::fs::write(samples.join("beta.jsonl"), "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n").unwrap();
    let (code, _, e) = run(&adapters, &samples, &[]);
    assert_eq!(code, 1);
    assert!(e.contains("beta.jsonl") && e.contains('2'), "{e}");
    assert!(!out.exists());

    // A non-empty --out is refused without --force, and left alone.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let (code, _, e) = merge(&["--budget", "2", "--no-tune"], &out);
    assert_eq!(code, 1);
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    let (code, o, e) = merge(&["--budget", "2", "--no-tune", "--force"], &out);
    assert_eq!(code, 0, "{o}{e}");
    assert!(!out.join("keep.txt").exists());
    check_manifest(&out);
}

#[test]
fn a_killed_run_leaves_no_output_and_resumes_from_its_cache() {
    let set = task_set();
    let dir = common::tempdir();
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let base = common::base_model();
    let (adapters, samples) = (set.join("adapters"), set.join("samples"));
    let args = [
        "merge",
        "--base",
        common::path_str(&base),
        "--adapters",
        common::path_str(&adapters),
        "--samples",
        common::path_str(&samples),
        "--budget",
        "2",
        "--out",
        common::path_str(&out),
        "--cache",
        common::path_str(&cache),
        "--threads",
        "2",
    ];
    let mut child =
        std::process::Command::new(common::bin()).args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it once it has scored something (the cache file grows), well before it can finish.
    let scores = cache.join("scores.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if std::fs::metadata(&scores).map(|m| m.len() > 0).unwrap_or(false) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run must not leave --out");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf") || n == "manifest.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let cached_before = std::fs::read_to_string(&scores).unwrap().lines().count();
    assert!(cached_before > 0);

    let out_run = common::run_cli(&args);
    assert_eq!(out_run.0, 0, "{}{}", out_run.1, out_run.2);
    let m = check_manifest(&out);
    assert!(m.scoring.cached_sequences >= cached_before, "resume did not reuse the cache: {:?}", m.scoring);
}

#[test]
fn own_targets_hold_each_task_to_what_its_own_adapter_answers() {
    // Trained adapters (the demo set's), with three of case-snake's completions made wrong:
    // its own adapter answers those otherwise, and `--targets own` judges them by its answers.
    let dir = common::tempdir();
    let (_, samples) = common::demo_subset(dir.path(), &["case-kebab", "case-snake"]);
    let written = std::fs::read_to_string(samples.join("case-snake.jsonl")).unwrap();
    let mut lines: Vec<serde_json::Value> = written.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, line) in lines.iter_mut().take(3).enumerate() {
        line["completion"] = format!(" not_the_answer_{i}").into();
    }
    let corrupted: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(samples.join("case-snake.jsonl"), corrupted).unwrap();

    // What the own adapters answer, through `eval` (generation, not the scorer's verdict).
    let (code, o, e) = common::run_cli(&[
        "eval",
        "--base",
        common::path_str(&common::base_model()),
        "--tests",
        common::path_str(&dir.path().join("samples")),
        "--adapters",
        common::path_str(&dir.path().join("adapters")),
        "--max-tokens",
        "64",
        "--threads",
        "2",
        "--predictions",
        "--json",
    ]);
    assert_eq!(code, 0, "{o}{e}");
    let report: serde_json::Value = serde_json::from_str(&o).unwrap();
    let differing = |task: &str| {
        report["tasks"][task]["predictions"].as_array().unwrap().iter().filter(|p| p["predicted"] != "" && p["predicted"] != p["expected"]).count()
    };
    assert!(differing("case-snake") >= 3, "{}", report["tasks"]["case-snake"]);

    let args = ["--budget", "1", "--method", "svd", "--no-tune"];
    let (code, o, e) = merge_set(dir.path(), &[&args[..], &["--targets", "own"]].concat(), &dir.path().join("own"));
    assert_eq!(code, 0, "{o}{e}");
    let own = Manifest::read(&dir.path().join("own/manifest.json")).unwrap();
    let (code, o, e) = merge_set(dir.path(), &args, &dir.path().join("written"));
    assert_eq!(code, 0, "{o}{e}");
    let written = Manifest::read(&dir.path().join("written/manifest.json")).unwrap();
    assert_eq!(own.settings["targets"], "own");
    assert_eq!(written.settings["targets"], "examples");
    for task in ["case-kebab", "case-snake"] {
        assert_eq!(own.settings["targets_replaced"][task], differing(task), "{task}: the examples replaced are those eval's answers differ on");
        // Every example is now what the own adapter answers, and the scorer's one-pass verdict
        // agrees that it reproduces them; judged by the written completions it cannot
        // reproduce the three made wrong.
        assert_eq!(own.scores[task].exact_own, 1.0, "{task}: {:?}", own.scores[task]);
    }
    assert!(written.scores["case-snake"].exact_own <= 0.7, "{:?}", written.scores["case-snake"]);

    // `add` and `remove` judge as the set was merged: the new task against its own adapter's
    // answers too, and the counts follow the task in and out.
    let added = dir.path().join("own-add");
    let base = common::base_model();
    let update_tail = ["--base", common::path_str(&base), "--threads", "2"];
    let (code, o, e) = common::run_cli(
        &[
            &[
                "add",
                "--manifest",
                common::path_str(&dir.path().join("own/manifest.json")),
                "--adapter",
                common::path_str(&common::demo_set().join("adapters/arith-add.gguf")),
                "--samples",
                common::path_str(&common::demo_set().join("samples/arith-add.jsonl")),
                "--out",
                common::path_str(&added),
            ][..],
            &update_tail,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{o}{e}");
    let with_new = Manifest::read(&added.join("manifest.json")).unwrap();
    assert_eq!(with_new.settings["targets"], "own");
    assert!(with_new.settings["targets_replaced"]["arith-add"].is_u64(), "{}", with_new.settings);
    assert_eq!(with_new.scores["arith-add"].exact_own, 1.0, "{:?}", with_new.scores["arith-add"]);
    let removed = dir.path().join("own-removed");
    let (code, o, e) = common::run_cli(
        &[
            &["remove", "--manifest", common::path_str(&added.join("manifest.json")), "--task", "arith-add", "--out", common::path_str(&removed)][..],
            &update_tail,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{o}{e}");
    let without = Manifest::read(&removed.join("manifest.json")).unwrap();
    assert_eq!(without.settings["targets_replaced"], own.settings["targets_replaced"]);
}

#[test]
fn the_soft_objective_counts_each_example_by_its_margin() {
    // Trained adapters (the demo set's), so that the own adapters reproduce examples: the
    // synthetic set's reproduce none and would leave the soft term unused.
    let dir = common::tempdir();
    common::demo_subset(dir.path(), &["case-kebab", "case-snake"]);
    let out = dir.path().join("soft");
    let (code, o, e) = merge_set(dir.path(), &["--budget", "1", "--method", "svd", "--no-tune", "--objective", "soft"], &out);
    assert_eq!(code, 0, "{o}{e}");
    let m = Manifest::read(&out.join("manifest.json")).unwrap();
    assert_eq!(m.scores.len(), 2);
    assert_eq!(m.settings["objective"], "soft");
    assert!(m.settings["objective_definition"].as_str().unwrap().contains("margin"));
    for (task, s) in &m.scores {
        assert!(s.exact_own > 0.5, "{task}: the demo adapters reproduce their examples: {s:?}");
        // A soft share lies strictly between 0 and 1 and within a half of the exact share:
        // each example's verdict is 1 exactly where its soft verdict is above a half.
        for (soft, exact) in [(s.soft_own, s.exact_own), (s.soft_merged, s.exact_merged)] {
            assert!(soft > 0.0 && soft < 1.0, "{task}: soft {soft}");
            assert!((soft - exact).abs() < 0.5, "{task}: soft {soft} against exact {exact}");
        }
        // The regret is the soft loss, with the NLL's small term.
        let nll = d2c_gguf::objective::nll_regret(s.nll_merged, s.nll_own, s.nll_base);
        let expected = (s.soft_own - s.soft_merged) / s.soft_own + 0.05 * nll;
        assert!((s.regret - expected).abs() < 1e-9, "{task}: regret {} against {expected}", s.regret);
        // One adapter for two tasks moves every margin: the soft share sees it.
        assert!(s.soft_merged != s.soft_own, "{task}: {s:?}");
    }
}

#[test]
fn a_byte_budget_is_met_by_choosing_ranks() {
    let dir = common::tempdir();
    let full = dir.path().join("full");
    let (code, o, e) = merge(&["--budget", "2", "--no-tune"], &full);
    assert_eq!(code, 0, "{o}{e}");
    let m_full = check_manifest(&full);
    // Half of what two rank-8 adapters take forces ranks down.
    let budget = m_full.storage.bytes / 2;
    let small = dir.path().join("small");
    let b = budget.to_string();
    let (code, o, e) = merge(&["--budget", "2", "--strategy", "d2c", "--no-tune", "--budget-bytes", &b], &small);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&small);
    assert!(m.storage.bytes <= budget, "{} > {budget}", m.storage.bytes);
    assert!(m.adapters.iter().any(|a| a.rank < 8), "{:?}", m.adapters);
    assert_eq!(m.storage.budget_bytes, Some(budget));
    // An impossible budget is a clear error and writes nothing.
    assert_budget_refused(&["--budget", "2", "--strategy", "d2c", "--no-tune", "--budget-bytes", "1000"], &dir.path().join("none"));
}

#[test]
fn the_allocator_keeps_tasks_apart_while_they_fit_and_merges_only_below_that() {
    let dir = common::tempdir();
    let n = GROUPS * PER_GROUP;
    let input_bytes = input_bytes();
    // The sizes a task can take do not depend on the budget: one cache serves all three runs.
    let cache = dir.path().join("cache");
    let cache = common::path_str(&cache);
    // A quarter of the bytes, no count given: the default under --budget-bytes is the allocator.
    let quarter = dir.path().join("quarter");
    let budget = input_bytes / 4;
    let (code, o, e) = merge(&["--budget-bytes", &budget.to_string(), "--cache", cache], &quarter);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&quarter);
    assert_eq!(m.settings["strategy"], "allocate");
    assert_eq!(m.settings["objective"], "exact");
    assert_eq!(m.adapters.len(), n, "every task keeps an adapter of its own: {:?}", m.adapters);
    assert!(m.adapters.iter().all(|a| a.tasks.len() == 1 && a.merge.is_none()));
    assert!(m.storage.bytes <= budget, "{} > {budget}", m.storage.bytes);
    // Most of the bytes are spent: an unspent half would mean the knapsack stopped early.
    assert!(m.storage.bytes > budget / 2, "{} of {budget}", m.storage.bytes);
    assert!(m.adapters.iter().all(|a| a.rank < 8), "{:?}", m.adapters);
    assert_valid_adapters(&quarter, &m);
    // On the examples it is never worse than the truncation baselines at the same bytes by
    // more than the tie margin (0.02: what ten examples cannot resolve).
    for strategy in ["truncate", "truncate-energy"] {
        let out = dir.path().join(strategy);
        let n_str = n.to_string();
        let (code, o, e) = merge(&["--budget-bytes", &budget.to_string(), "--budget", &n_str, "--strategy", strategy, "--cache", cache], &out);
        assert_eq!(code, 0, "{o}{e}");
        let t = check_manifest(&out);
        assert!(m.objective.best <= t.objective.best + 0.02 + 1e-9, "allocate {} vs {strategy} {}", m.objective.best, t.objective.best);
    }

    // A cap on files below the tasks forces merging; the bytes still hold.
    let capped = dir.path().join("capped");
    let (code, o, e) = merge(&["--budget-bytes", &budget.to_string(), "--budget", "2", "--cache", cache], &capped);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&capped);
    assert!(m.adapters.len() <= 2, "{:?}", m.adapters);
    assert!(m.storage.bytes <= budget);
    assert_eq!(m.tasks.len(), n, "every task is served");
    assert_valid_adapters(&capped, &m);

    // The same bytes with the lower-bit types (the default): a q4_0 `lora_a` holds more
    // directions per byte, so every task still keeps its own adapter, (some) in q4_0.
    let low_bit = dir.path().join("low-bit");
    let (code, o, e) = merge(&["--budget-bytes", &(input_bytes / 160).to_string(), "--cache", cache], &low_bit);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&low_bit);
    assert_eq!(m.adapters.len(), n, "{:?}", m.adapters);
    assert!(m.adapters.iter().all(|a| a.tasks.len() == 1) && m.adapters.iter().any(|a| a.dtype == "q4_0"), "{:?}", m.adapters);
    assert!(m.storage.bytes <= input_bytes / 160);
    assert_valid_adapters(&low_bit, &m);

    // Below the smallest own adapters, only merging fits. In f16 alone (`--storage-types none`)
    // those are 1/16 of rank 1's bytes each, about 1/128 of the inputs; the q4_0 sizes go
    // lower still, so this part keeps to f16 where the threshold is known.
    let tiny = dir.path().join("tiny");
    let tiny_budget = input_bytes / 160;
    let (code, o, e) = merge(&["--budget-bytes", &tiny_budget.to_string(), "--storage-types", "none", "--cache", cache], &tiny);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&tiny);
    assert!(m.adapters.len() < n, "{:?}", m.adapters);
    assert!(m.adapters.iter().any(|a| a.tasks.len() > 1 && a.merge.is_some()), "{:?}", m.adapters);
    assert!(m.storage.bytes <= tiny_budget);
    assert_eq!(m.tasks.len(), n, "every task is served");
    assert_valid_adapters(&tiny, &m);

    // And where nothing fits at all: a clear error naming the flag, and nothing written.
    assert_budget_refused(&["--budget-bytes", "2000"], &dir.path().join("none"));
}

#[test]
fn truncation_keeps_every_task_apart_within_the_bytes() {
    let dir = common::tempdir();
    let n = GROUPS * PER_GROUP;
    let input_bytes = input_bytes();
    let n_str = n.to_string();
    // A quarter of the bytes: rank 8 cannot fit, some lower rank must.
    let budget = input_bytes / 4;
    let b = budget.to_string();
    for strategy in ["truncate", "truncate-energy"] {
        let out = dir.path().join(strategy);
        let (code, o, e) = merge(&["--budget", &n_str, "--strategy", strategy, "--budget-bytes", &b], &out);
        assert_eq!(code, 0, "{strategy}: {o}{e}");
        let m = check_manifest(&out);
        assert_eq!(m.adapters.len(), n, "{strategy}: one adapter per task");
        assert!(m.storage.bytes <= budget, "{strategy}: {} > {budget}", m.storage.bytes);
        assert!(m.adapters.iter().all(|a| a.merge.is_none() && a.tasks.len() == 1), "{strategy}: {:?}", m.adapters);
        assert_valid_adapters(&out, &m);
        if strategy == "truncate" {
            let ranks: BTreeSet<usize> = m.adapters.iter().map(|a| a.rank).collect();
            assert_eq!(ranks.len(), 1, "one uniform rank: {ranks:?}");
            let r = *ranks.iter().next().unwrap();
            assert!((1..8).contains(&r), "{r}");
            assert_eq!(m.settings["rank"], r);
        }
        // Cutting ranks costs the examples something, measured on the shipped bytes.
        assert!(m.scores.values().all(|s| s.nll_merged.is_finite()) && m.scores.values().any(|s| s.regret > 0.0), "{strategy}: {:?}", m.scores);
    }
    // With room for every adapter as it is, truncate ships the own adapters unchanged.
    let out = dir.path().join("roomy");
    let b = (2 * input_bytes).to_string();
    let (code, o, e) = merge(&["--budget", &n_str, "--strategy", "truncate", "--budget-bytes", &b], &out);
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&out);
    assert!(m.adapters.iter().all(|a| a.rank == 8), "{:?}", m.adapters);
    assert!(m.scores.values().all(|s| s.regret == 0.0), "{:?}", m.scores);
    let b = budget.to_string();
    // A count budget below the task count contradicts keeping every task apart.
    let out = dir.path().join("few");
    let (code, _, e) = merge(&["--budget", "2", "--strategy", "truncate", "--budget-bytes", &b], &out);
    assert_eq!(code, 1);
    assert!(e.contains("--budget") && e.contains("at least"), "{e}");
    assert!(!out.exists());
}

/// Cache entries (adapter hash, samples key) of a `--cache` directory's scores.
fn cached_scores(cache: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(cache.join("scores.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let key = v["key"].as_str().unwrap();
            let mut parts = key.rsplitn(3, ':');
            let samples = parts.next().unwrap().to_string();
            let adapter = parts.next().unwrap().to_string();
            (adapter, samples)
        })
        .collect()
}

#[test]
fn cross_fitted_tuning_judges_each_operator_and_serve_scale_on_the_fold_fits() {
    // The tuning and the serve scales choose by the objective the search uses: in sample a
    // regmean fit to the examples looks best at its own scale, whatever holds on new inputs.
    let dir = common::tempdir();
    let (out, cache) = (dir.path().join("out"), dir.path().join("cache"));
    let seed = bad_random_seed().to_string();
    let (code, o, e) = merge(
        &[
            "--budget",
            "2",
            "--strategy",
            "random",
            "--seed",
            &seed,
            "--tune-methods",
            "regmean",
            "--tune-scales",
            "1,1.5",
            "--serve-scales",
            "1,1.5",
            "--cache",
            common::path_str(&cache),
        ],
        &out,
    );
    assert_eq!(code, 0, "{o}{e}");
    let m = check_manifest(&out);
    assert_eq!(m.settings["judge"], "cross-fit");
    let scores = cached_scores(&cache);
    for (task, &c) in &m.tasks {
        assert_eq!(m.adapters[c].merge.as_ref().unwrap().method, "regmean", "{task}");
        let samples = task_set().join("samples").join(format!("{task}.jsonl"));
        let h = hash_file(&samples).unwrap();
        let n = std::fs::read_to_string(&samples).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
        let first_half = format!("{h}[..{}]", n.div_ceil(2));
        let judged: Vec<&String> = scores.iter().filter(|(_, s)| *s == first_half).map(|(a, _)| a).collect();
        // Both weight multipliers fitted on the other fold (two merges at scale 1 each).
        let at_one: HashSet<&String> = judged.iter().copied().filter(|a| !a.contains('@')).collect();
        assert_eq!(at_one.len(), 2, "{task}: {judged:?}");
        // The serve scale climbed on the fold fit too, not on the shipped merge.
        assert!(judged.iter().any(|a| a.ends_with("@1.5")), "{task}: {judged:?}");
        let shipped = &m.adapters[c].blake3;
        assert!(!judged.contains(&shipped), "{task}: a half scored under the merge fitted on it");
    }
}

#[test]
fn cross_fitting_scores_each_half_of_the_examples_under_the_merge_fitted_on_the_other() {
    let dir = common::tempdir();
    let seed = bad_random_seed().to_string();
    let run = |judge: &str| {
        let (out, cache) = (dir.path().join(format!("out-{judge}")), dir.path().join(format!("cache-{judge}")));
        let (code, o, e) = merge(
            &["--budget", "2", "--strategy", "random", "--seed", &seed, "--no-tune", "--judge", judge, "--cache", common::path_str(&cache)],
            &out,
        );
        assert_eq!(code, 0, "{o}{e}");
        let m = check_manifest(&out);
        assert_eq!(m.settings["judge"], judge);
        assert_eq!(m.settings["method"], "regmean");
        (m, cached_scores(&cache))
    };
    let (m, scores) = run("cross-fit");
    for (task, &c) in &m.tasks {
        assert_eq!(m.adapters[c].tasks.len(), 2, "{task}: every cluster of this partition is shared");
        let samples = task_set().join("samples").join(format!("{task}.jsonl"));
        let h = hash_file(&samples).unwrap();
        let n = std::fs::read_to_string(&samples).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
        assert!(n >= 2, "{task}: {n} examples cannot be split");
        // The first half (rounded up) judged under one merge, the rest under another, neither
        // of them the merge fitted on all of them (what ships, scored on all of them).
        let split = n.div_ceil(2);
        let under = |range: &str| -> Vec<&String> { scores.iter().filter(|(_, s)| *s == format!("{h}{range}")).map(|(a, _)| a).collect() };
        let (first, second) = (under(&format!("[..{split}]")), under(&format!("[{split}..{n}]")));
        assert_eq!((first.len(), second.len()), (1, 1), "{task}: {scores:?}");
        assert_ne!(first[0], second[0], "{task}: both halves scored under one merge");
        let shipped = &m.adapters[c].blake3;
        assert!(first[0] != shipped && second[0] != shipped, "{task}: a half scored under the merge fitted on it");
        assert!(scores.iter().any(|(a, s)| a == shipped && *s == h), "{task}: the shipped merge is scored on every example");
    }
    // The two halves' merges are fitted on different examples, so they differ from the full
    // fit; judged in sample, no half is ever scored.
    let (m_in, scores_in) = run("in-sample");
    assert!(scores_in.iter().all(|(_, s)| !s.contains('[')), "{scores_in:?}");
    assert_eq!(groups_of(&m_in), groups_of(&m));
    // What ships is the same fit either way: the judge only changes what the search sees.
    let files = |m: &Manifest| m.adapters.iter().map(|a| a.blake3.clone()).collect::<Vec<_>>();
    assert_eq!(files(&m_in), files(&m));
    assert!(m.rounds[0].objective.is_finite() && m_in.rounds[0].objective.is_finite());
}
