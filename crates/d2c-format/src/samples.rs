//! Task examples: JSONL files with one `{"prompt": ..., "completion": ...}` object per line.
//!
//! These few examples per task are the "data" of data-driven clustering, so a file that cannot be
//! read exactly is refused with the file and line named, rather than half-used.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// A task is described by a few examples that are scored in one context window; 64 MiB of
/// JSONL is thousands of long examples, far past any use, and read whole into memory.
pub const MAX_SAMPLES_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// One example must fit a context window once tokenised: 1 MiB of text is ~250k tokens, more
/// than any model llama.cpp runs can attend to.
pub const MAX_SAMPLE_LINE_BYTES: usize = 1024 * 1024;

/// One example: the completion is what the scorer measures, given the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
}

/// The samples of one file, with the 1-based line each came from (for error messages that a
/// user can act on, e.g. a sample too long for the context, found only once tokenised).
#[derive(Debug, Clone)]
pub struct SampleFile {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    pub lines: Vec<usize>,
}

impl SampleFile {
    /// `file:line` of sample `index`, for messages.
    pub fn location(&self, index: usize) -> String {
        match self.lines.get(index) {
            Some(line) => format!("{}:{line}", self.path.display()),
            None => format!("{} (sample #{index})", self.path.display()),
        }
    }
}

/// Reads a JSONL sample file (see [`read_sample_file`]).
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    Ok(read_sample_file(path)?.samples)
}

/// Reads a JSONL sample file: one JSON object per line with string fields `prompt` and
/// `completion` (other keys are ignored); blank lines are skipped. The completion must not be
/// empty, the prompt may be. A file without any sample is refused: it would score as nothing.
pub fn read_sample_file(path: &Path) -> Result<SampleFile> {
    let bytes = crate::fsutil::read_capped(path, MAX_SAMPLES_FILE_BYTES, "file size")?;
    sample_file_from_bytes(path, &bytes)
}

/// [`read_sample_file`] for file contents already in memory (same checks); `path` only names
/// the source in errors.
pub fn sample_file_from_bytes(path: &Path, bytes: &[u8]) -> Result<SampleFile> {
    let file = parse_samples(path, bytes)?;
    if file.samples.is_empty() {
        return Err(Error::invalid(path, "samples", "the file holds no samples (one JSON object per line expected)"));
    }
    Ok(file)
}

/// Parses JSONL sample text; `path` only names the source in errors. An empty input gives an
/// empty set.
pub fn parse_samples(path: &Path, bytes: &[u8]) -> Result<SampleFile> {
    if bytes.len() as u64 > MAX_SAMPLES_FILE_BYTES {
        return Err(Error::Format {
            path: path.to_path_buf(),
            field: "file size".into(),
            reason: format!("{} bytes exceeds the limit of {MAX_SAMPLES_FILE_BYTES} bytes", bytes.len()),
        });
    }
    let mut samples = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let field = |name: &str| format!("line {line_no}: {name}");
        if raw.len() > MAX_SAMPLE_LINE_BYTES {
            return Err(Error::Format {
                path: path.to_path_buf(),
                field: format!("line {line_no}"),
                reason: format!("{} bytes exceeds the limit of {MAX_SAMPLE_LINE_BYTES} bytes per line", raw.len()),
            });
        }
        let text = std::str::from_utf8(raw).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            field: format!("line {line_no}"),
            reason: format!("not valid UTF-8 ({e})"),
        })?;
        // A UTF-8 byte-order mark is common in files saved by Windows editors.
        let text = if line_no == 1 { text.strip_prefix('\u{feff}').unwrap_or(text) } else { text };
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            field: format!("line {line_no}"),
            reason: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::Format {
                path: path.to_path_buf(),
                field: format!("line {line_no}"),
                reason: format!("expected a JSON object with \"prompt\" and \"completion\", found {}", kind(&value)),
            });
        };
        let get = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(Error::invalid(path, field(name), format!("must be a string, found {}", kind(other)))),
                None => Err(Error::invalid(path, field(name), "missing")),
            }
        };
        let prompt = get("prompt")?;
        let completion = get("completion")?;
        if completion.is_empty() {
            return Err(Error::invalid(path, field("completion"), "is empty: there would be nothing to score"));
        }
        samples.push(Sample { prompt, completion });
        lines.push(line_no);
    }
    Ok(SampleFile { path: path.to_path_buf(), samples, lines })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
