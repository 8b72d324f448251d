//! `add` and `remove` on a deployed set, with real llama.cpp scoring and the demo set's real
//! adapters: `add` writes at most the one adapter file it changes (every other file stays
//! byte-identical), `remove` of the same task gives back the files `merge` wrote, and both
//! refuse a base, an input or an output that would not give the set back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use d2c_gguf::manifest::Manifest;

/// Adapter file name -> bytes, for every adapter of the set at `dir`.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let m = Manifest::read(&dir.join("manifest.json")).unwrap();
    m.adapters.iter().map(|a| (a.file.clone(), std::fs::read(dir.join(&a.file)).unwrap())).collect()
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run_cli(args);
    assert_eq!(code, 0, "d2c-gguf {args:?} failed:\n{out}\n{err}");
    out
}

fn refused(args: &[&str]) -> String {
    let (code, out, err) = run_cli(args);
    assert_ne!(code, 0, "d2c-gguf {args:?} should have been refused:\n{out}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn add_writes_one_file_and_remove_gives_the_merged_set_back() {
    let dir = tempdir();
    let (adapters, samples) = demo_subset(dir.path(), &["arith-add", "arith-mul", "case-kebab"]);
    let base = base_model();
    let cache = dir.path().join("cache");
    let (merged, added, removed) = (dir.path().join("merged"), dir.path().join("added"), dir.path().join("removed"));
    let common = ["--threads", "2", "--cache", path_str(&cache)];
    ok(&[
        &["merge", "--base", path_str(&base), "--adapters", path_str(&adapters), "--samples", path_str(&samples), "--budget", "2"][..],
        &["--tune-methods", "svd,ties", "--tune-scales", "1,1.5", "--serve-scales", "1,1.5", "--out", path_str(&merged)],
        &common,
    ]
    .concat());
    let before = Manifest::read(&merged.join("manifest.json")).unwrap();
    assert_eq!(before.inputs.len(), 3, "merge records where each task came from");
    assert_eq!(before.inputs["arith-mul"].adapter, adapters.join("arith-mul.gguf").canonicalize().unwrap());

    let snake = demo_set().join("adapters/case-snake.gguf");
    let snake_samples = demo_set().join("samples/case-snake.jsonl");
    let merged_manifest = merged.join("manifest.json");
    let add = |out: &Path, extra: &[&str]| {
        let args = [
            &["add", "--manifest", path_str(&merged_manifest), "--adapter", path_str(&snake)][..],
            &["--samples", path_str(&snake_samples), "--out", path_str(out)],
            extra,
            &common,
        ]
        .concat();
        ok(&args);
        Manifest::read(&out.join("manifest.json")).unwrap()
    };
    let after = add(&added, &[]);
    assert_eq!(after.tasks.len(), 4);
    assert!(after.adapters.len() <= 2, "--budget 2: the task joins a cluster");
    let change = after.lineage.last().expect("lineage records the add");
    assert_eq!((change.change.as_str(), change.task.as_str()), ("add", "case-snake"));
    assert_eq!(change.previous_manifest_blake3, d2c_gguf::manifest::hash_file(&merged.join("manifest.json")).unwrap());
    eprintln!(
        "add: case-snake {} (wrote {:?}; {} scored, {} cached, {:.1} s)",
        change.placement, change.written, change.scored_sequences, change.cached_sequences, change.seconds
    );
    let (old_files, new_files) = (files(&merged), files(&added));
    let differing: Vec<&String> = new_files.iter().filter(|(f, bytes)| old_files.get(*f) != Some(bytes)).map(|(f, _)| f).collect();
    assert_eq!(
        differing.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
        change.written.iter().map(String::as_str).collect::<Vec<_>>(),
        "only the written file changed"
    );
    match change.placement.as_str() {
        "joined" => assert!(differing.is_empty()),
        "re-merged" => assert_eq!(differing.len(), 1),
        other => panic!("placement {other} under a full budget"),
    }
    let snake_adapter = after.tasks["case-snake"];
    assert!(after.adapters[snake_adapter].tasks.contains(&"case-snake".to_string()));
    assert!(after.scores.contains_key("case-snake") && after.inputs.contains_key("case-snake"));
    for (task, scores) in &before.scores {
        if after.tasks[task] != snake_adapter {
            assert_eq!(&after.scores[task], scores, "{task}'s cluster did not change, nor did its scores");
        }
    }

    ok(&[&["remove", "--manifest", path_str(&added.join("manifest.json")), "--task", "case-snake", "--out", path_str(&removed)][..], &common]
        .concat());
    let back = Manifest::read(&removed.join("manifest.json")).unwrap();
    assert_eq!(files(&removed), old_files, "add then remove gives back merge's files, byte for byte");
    assert_eq!(back.tasks, before.tasks);
    assert_eq!(back.task_scales, before.task_scales);
    assert_eq!(back.scores, before.scores);
    assert_eq!(back.inputs, before.inputs);
    assert_eq!(back.lineage.iter().map(|c| c.change.as_str()).collect::<Vec<_>>(), ["add", "remove"]);

    // With room in the budget, keeping its own adapter is an option; whatever wins, the other
    // files stay as they were.
    let roomy = add(&dir.path().join("roomy"), &["--budget", "3"]);
    let change = roomy.lineage.last().unwrap();
    eprintln!("add --budget 3: case-snake {} (wrote {:?})", change.placement, change.written);
    let roomy_files = files(&dir.path().join("roomy"));
    for (f, bytes) in &old_files {
        if !change.written.contains(f) {
            assert_eq!(roomy_files.get(f), Some(bytes), "{f} must be untouched");
        }
    }
    if change.placement == "own" {
        assert_eq!(roomy.adapters.len(), 3);
        let own = &roomy.adapters[roomy.tasks["case-snake"]];
        assert_eq!((own.file.as_str(), own.tasks.as_slice()), (change.written[0].as_str(), &["case-snake".to_string()][..]));
        assert_eq!(d2c_gguf::manifest::hash_file(&dir.path().join("roomy").join(&own.file)).unwrap(), own.blake3);
    }

    // Removing a task that was alone drops its file and renumbers nothing else's name.
    let lone = dir.path().join("lone");
    let lone_task = before.adapters.iter().find(|a| a.tasks.len() == 1).map(|a| a.tasks[0].clone());
    if let Some(task) = lone_task {
        ok(&[&["remove", "--manifest", path_str(&merged.join("manifest.json")), "--task", &task, "--out", path_str(&lone)][..], &common].concat());
        let m = Manifest::read(&lone.join("manifest.json")).unwrap();
        assert_eq!(m.adapters.len(), 1);
        assert_eq!(m.lineage[0].placement, "dropped");
        let kept = &m.adapters[0];
        assert_eq!(std::fs::read(lone.join(&kept.file)).unwrap(), old_files[&kept.file]);
        assert!(m.tasks.values().all(|&a| a == 0));
    }
}

#[test]
fn updates_refuse_what_would_not_give_the_set_back() {
    let dir = tempdir();
    let (adapters, samples) = demo_subset(dir.path(), &["arith-add", "case-kebab"]);
    let base = base_model();
    let merged = dir.path().join("merged");
    ok(&[
        "merge",
        "--base",
        path_str(&base),
        "--adapters",
        path_str(&adapters),
        "--samples",
        path_str(&samples),
        "--budget",
        "1",
        "--strategy",
        "single",
        "--no-tune",
        "--threads",
        "2",
        "--out",
        path_str(&merged),
    ]);
    let manifest = merged.join("manifest.json");
    let out = dir.path().join("out");
    let snake = demo_set().join("adapters/case-snake.gguf");
    let snake_samples = demo_set().join("samples/case-snake.jsonl");
    let add = |extra: &[&str]| -> Vec<String> {
        [&["add", "--manifest", path_str(&manifest), "--adapter", path_str(&snake), "--samples", path_str(&snake_samples)][..], extra]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| refused(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Another base model: named, with both hashes.
    let other_base = dir.path().join("other-base.gguf");
    let mut bytes = std::fs::read(&base).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&other_base, &bytes).unwrap();
    let err = run(add(&["--base", path_str(&other_base), "--out", path_str(&out)]));
    assert!(err.contains(path_str(&other_base)) && err.contains("not the one"), "{err}");

    // Never into the set's own directory; never a task it has.
    let err = run(add(&["--out", path_str(&merged)]));
    assert!(err.contains("holds the set being updated"), "{err}");
    let err = run(add(&["--task", "arith-add", "--out", path_str(&out)]));
    assert!(err.contains("already in"), "{err}");
    let err = refused(&["remove", "--manifest", path_str(&manifest), "--task", "nope", "--out", path_str(&out)]);
    assert!(err.contains("nope") && err.contains("arith-add"), "{err}");

    // An input changed since the merge: re-merging it would not give the set back.
    let mut edited = std::fs::read_to_string(samples.join("arith-add.jsonl")).unwrap();
    edited.push_str("{\"prompt\": \"1+1=\", \"completion\": \"2\"}\n");
    std::fs::write(samples.join("arith-add.jsonl"), edited).unwrap();
    let err = refused(&["remove", "--manifest", path_str(&manifest), "--task", "case-kebab", "--out", path_str(&out)]);
    assert!(err.contains("inputs.arith-add.samples_blake3") && err.contains("arith-add.jsonl"), "{err}");

    // A tampered adapter of the set itself.
    let shipped = Manifest::read(&manifest).unwrap().adapters[0].file.clone();
    let mut bytes = std::fs::read(merged.join(&shipped)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(merged.join(&shipped), &bytes).unwrap();
    let err = run(add(&["--out", path_str(&out)]));
    assert!(err.contains(&shipped) && err.contains("blake3"), "{err}");
    assert!(!out.exists(), "a refused update leaves no output");
}
