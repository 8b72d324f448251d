//! The inputs the base model's projections see on a task's examples, captured with llama.cpp's
//! graph eval callback (what llama-imatrix does): the activations that interference between
//! adapters is measured on.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::ffi::InputCapture;
pub use crate::ffi::ProjectionInputs;
use crate::score::SampleTokens;
use d2c_format::error::{Error, Result};

/// A base model run with a callback that keeps the inputs of chosen projections.
pub struct ActivationProbe {
    capture: InputCapture,
    path: std::path::PathBuf,
}

impl ActivationProbe {
    /// `weights`: base tensor names (`blk.0.attn_q.weight`) whose inputs are kept; `longest`:
    /// the most tokens one sample has (the context is sized to it, every position an output).
    pub fn new(base: &Path, weights: HashSet<String>, threads: Option<i32>, longest: usize) -> Result<Self> {
        crate::llama::backend()?;
        let n_ctx = longest.max(1).div_ceil(256) * 256;
        let threads = threads.unwrap_or_else(crate::llama::default_threads);
        let capture = InputCapture::new(base, n_ctx as u32, threads, weights)
            .map_err(|e| Error::Llama(format!("{}: activation capture: {e}", base.display())))?;
        Ok(ActivationProbe { capture, path: base.to_path_buf() })
    }

    /// The inputs at each sample's scored positions (the one before every scored token, and the
    /// last, whose prediction decides whether greedy decoding stops), at most `max_rows` per
    /// sample, by weight name; rows in sample order.
    pub fn inputs(&mut self, samples: &[SampleTokens], max_rows: usize) -> Result<BTreeMap<String, ProjectionInputs>> {
        self.inputs_at(samples, |s| (s.first_scored - 1..s.tokens.len()).take(max_rows.max(1)).collect())
    }

    /// The inputs at the positions `keep` picks in each sample (increasing, each below the
    /// sample's length), by weight name; rows in sample order.
    pub fn inputs_at(&mut self, samples: &[SampleTokens], keep: impl Fn(&SampleTokens) -> Vec<usize>) -> Result<BTreeMap<String, ProjectionInputs>> {
        for s in samples {
            let tokens: Vec<i32> = s.tokens.iter().map(|t| t.0).collect();
            let positions = keep(s);
            if positions.iter().any(|&p| p >= tokens.len()) {
                return Err(Error::Internal(format!("activation capture: a position past the sample's {} tokens", tokens.len())));
            }
            self.capture.run(&tokens, &positions).map_err(|e| Error::Llama(format!("{}: activation capture: {e}", self.path.display())))?;
        }
        Ok(self.capture.take())
    }
}
