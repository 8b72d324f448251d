//! The score cache: every score llama.cpp computed, keyed by content (base and CPU kernels,
//! adapter bytes, examples), so that no candidate is scored twice, across runs too with
//! `--cache`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::objective::TaskScore;

/// Scores keyed by content: (base hash and the CPU kernels that score, adapter file hash or
/// "base", samples hash). Optionally appended to a file as they are computed, so an
/// interrupted run resumes without rescoring.
pub(crate) struct ScoreCache {
    map: HashMap<String, Cached>,
    file: Option<(PathBuf, std::fs::File)>,
    scoring_id: String,
}

/// One sample set's score under one adapter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cached {
    pub mean_nll: f64,
    pub tokens: usize,
    /// Samples greedy decoding reproduces, of `samples`.
    pub exact: usize,
    /// Sum of the samples' soft verdicts ([`crate::objective::soft_verdict`] of their margins).
    pub soft: f64,
    pub samples: usize,
}

impl Cached {
    pub(crate) fn task_score(&self) -> TaskScore {
        let n = self.samples.max(1) as f64;
        TaskScore { nll: self.mean_nll, exact: self.exact as f64 / n, soft: self.soft / n }
    }

    /// Two disjoint example sets' scores as one: the NLL weighted by tokens, the counts added.
    pub(crate) fn plus(&self, other: &Cached) -> Cached {
        let tokens = self.tokens + other.tokens;
        let mean_nll = if tokens == 0 {
            (self.mean_nll + other.mean_nll) / 2.0
        } else {
            (self.mean_nll * self.tokens as f64 + other.mean_nll * other.tokens as f64) / tokens as f64
        };
        Cached { mean_nll, tokens, exact: self.exact + other.exact, soft: self.soft + other.soft, samples: self.samples + other.samples }
    }
}

impl ScoreCache {
    pub(crate) fn open(dir: Option<&Path>, scoring_id: &str) -> Result<Self> {
        let mut map = HashMap::new();
        let file = match dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let path = dir.join("scores.jsonl");
                if path.exists() {
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                    // A kill mid-append leaves a line without its newline; cut it off, or the
                    // next append would be glued to it and that finished score lost too.
                    if !text.is_empty() && !text.ends_with('\n') {
                        let keep = text.rfind('\n').map_or(0, |i| i + 1) as u64;
                        let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
                        f.set_len(keep).map_err(|e| Error::io(&path, e))?;
                    }
                    for line in text.lines() {
                        // A line cut short by a kill is simply not reused, nor one written before
                        // exact-match counts and soft verdicts were kept.
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                            let field = |name: &str| v[name].as_u64().map(|x| x as usize);
                            if let (Some(k), Some(mean_nll), Some(tokens), Some(exact), Some(soft), Some(samples)) =
                                (v["key"].as_str(), v["mean_nll"].as_f64(), field("tokens"), field("exact"), v["soft"].as_f64(), field("samples"))
                            {
                                map.insert(k.to_string(), Cached { mean_nll, tokens, exact, soft, samples });
                            }
                        }
                    }
                }
                let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
                Some((path, f))
            }
        };
        Ok(ScoreCache { map, file, scoring_id: scoring_id.to_string() })
    }

    pub(crate) fn key(&self, adapter_hash: &str, samples_hash: &str) -> String {
        format!("{}:{adapter_hash}:{samples_hash}", self.scoring_id)
    }

    pub(crate) fn get(&self, key: &str) -> Option<Cached> {
        self.map.get(key).copied()
    }

    pub(crate) fn put(&mut self, key: String, value: Cached) -> Result<()> {
        if let Some((path, f)) = &mut self.file {
            // One write per line (O_APPEND): a kill leaves whole lines or one cut-off tail.
            let line = json!({"key": key, "mean_nll": value.mean_nll, "tokens": value.tokens, "exact": value.exact, "soft": value.soft, "samples": value.samples})
                .to_string()
                + "\n";
            f.write_all(line.as_bytes()).map_err(|e| Error::io(path, e))?;
        }
        self.map.insert(key, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Cached;

    #[test]
    fn two_halves_add_up_to_the_whole() {
        let a = Cached { mean_nll: 1.0, tokens: 30, exact: 2, soft: 2.5, samples: 5 };
        let b = Cached { mean_nll: 2.0, tokens: 10, exact: 4, soft: 4.0, samples: 5 };
        let both = a.plus(&b);
        assert_eq!((both.tokens, both.exact, both.samples), (40, 6, 10));
        assert!((both.mean_nll - 1.25).abs() < 1e-12, "token-weighted: {}", both.mean_nll);
        assert!((both.task_score().exact - 0.6).abs() < 1e-12);
        assert!((both.task_score().soft - 0.65).abs() < 1e-12);
    }
}
