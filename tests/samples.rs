//! JSONL sample files: what is read, and that every refusal names the file and the line.

mod common;

use std::path::{Path, PathBuf};

use d2c_gguf::samples::{parse_samples, read_sample_file, read_samples, Sample};
use d2c_gguf::Error;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn sample(p: &str, c: &str) -> Sample {
    Sample { prompt: p.into(), completion: c.into() }
}

#[test]
fn reads_samples_skipping_blank_lines_and_extra_keys() {
    let dir = common::tempdir();
    let text = "\u{feff}{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n\
                \n   \n\
                {\"completion\": \" Paris\", \"prompt\": \"Capital of France:\", \"task\": \"geo\", \"id\": 7}\r\n\
                {\"prompt\": \"\", \"completion\": \"<|im_end|>\\n\"}";
    let p = write(dir.path(), "ok.jsonl", text.as_bytes());
    let file = read_sample_file(&p).unwrap();
    assert_eq!(file.samples, vec![sample("2+2=", "4"), sample("Capital of France:", " Paris"), sample("", "<|im_end|>\n")]);
    assert_eq!(file.lines, vec![1, 4, 5]);
    assert_eq!(file.location(1), format!("{}:4", p.display()));
    assert_eq!(read_samples(&p).unwrap(), file.samples);
}

/// The error's text and its file/field, for each kind of bad line.
fn expect_error(bytes: &[u8], line: usize, needle: &str) {
    let dir = common::tempdir();
    let p = write(dir.path(), "bad.jsonl", bytes);
    let err = read_samples(&p).expect_err("bad file accepted");
    let text = err.to_string();
    assert!(text.contains(&p.display().to_string()), "{text}");
    assert!(text.contains(&format!("line {line}")), "{text}");
    assert!(text.contains(needle), "{text}");
    match err {
        Error::Format { path, .. } | Error::Invalid { path, .. } => assert_eq!(path, p),
        other => panic!("unexpected error kind {other:?}"),
    }
}

#[test]
fn refuses_bad_lines_naming_file_and_line() {
    let good = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";
    expect_error(format!("{good}\n{{\"prompt\": \"a\", \"completion\": }}\n").as_bytes(), 3, "invalid JSON");
    expect_error(format!("{good}{{\"prompt\": \"a\"}}\n").as_bytes(), 2, "completion: missing");
    expect_error(format!("{good}{good}{{\"completion\": \"a\"}}\n").as_bytes(), 3, "prompt: missing");
    expect_error(format!("{{\"prompt\": 3, \"completion\": \"b\"}}\n{good}").as_bytes(), 1, "prompt: must be a string, found a number");
    expect_error(format!("{good}{{\"prompt\": \"a\", \"completion\": null}}").as_bytes(), 2, "completion: must be a string");
    expect_error(format!("{good}{{\"prompt\": \"a\", \"completion\": \"\"}}\n").as_bytes(), 2, "completion: is empty");
    expect_error(format!("{good}[\"a\", \"b\"]\n").as_bytes(), 2, "expected a JSON object");
    expect_error(format!("{good}\"just text\"\n").as_bytes(), 2, "found a string");
    let mut bytes = good.as_bytes().to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"\xff\", \"completion\": \"b\"}\n");
    expect_error(&bytes, 2, "not valid UTF-8");
}

#[test]
fn refuses_empty_and_missing_files() {
    let dir = common::tempdir();
    for (name, text) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")] {
        let p = write(dir.path(), name, text.as_bytes());
        let err = read_samples(&p).expect_err("empty file accepted").to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains("no samples"), "{err}");
    }
    let missing = dir.path().join("missing.jsonl");
    let err = read_samples(&missing).expect_err("missing file accepted").to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[test]
fn parse_keeps_exact_text() {
    // Escapes, unicode and whitespace inside strings are part of the sample, byte for byte.
    let text = "{\"prompt\": \"  tab\\there\\n\", \"completion\": \" caf\u{e9} \\u00e9\\\"q\\\" \"}";
    let file = parse_samples(Path::new("mem.jsonl"), text.as_bytes()).unwrap();
    assert_eq!(file.samples, vec![sample("  tab\there\n", " caf\u{e9} \u{e9}\"q\" ")]);
}
