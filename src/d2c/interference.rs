//! The activation model D2C screens its moves with and polishes its starts under: every task's
//! examples run once through the base model with the inputs of every adapted projection kept,
//! and each task's output Gram built from those inputs and every adapter's factors
//! (`crate::interference`). N forward passes, no scoring.

use std::collections::BTreeMap;
use std::path::Path;

use super::tasks::Task;
use crate::adapter::LoraAdapter;
use crate::error::Result;
use crate::interference::{FactorStack, InputRows, Interference};
use crate::score::Scorer;

/// Rows kept per example: the positions that predict its first completion tokens (and, for
/// short completions, the stop), where exact match is won or lost.
const MAX_ROWS_PER_EXAMPLE: usize = 32;

pub(crate) fn measure(scorer: &Scorer, base: &Path, tasks: &[Task], threads: Option<i32>, progress: bool) -> Result<Interference> {
    let adapters: Vec<&LoraAdapter> = tasks.iter().map(|t| &*t.adapter).collect();
    let stack = FactorStack::new(&adapters);
    let (mut probe, tokenized) = super::inputs::probe_for(scorer, base, tasks, threads)?;
    let pb = crate::progress::bar(progress, tasks.len() as u64, "activations");
    let mut grams = Vec::with_capacity(tasks.len());
    for samples in &tokenized {
        let inputs = probe.inputs(samples, MAX_ROWS_PER_EXAMPLE)?;
        let rows: BTreeMap<String, InputRows<'_>> =
            inputs.iter().map(|(name, x)| (name.clone(), InputRows { rows: x.rows, n_in: x.n_in, data: &x.data })).collect();
        grams.push(stack.output_gram(&rows));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(Interference::new(grams))
}
