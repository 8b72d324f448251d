//! `report`: the human-readable table of a manifest.

use std::fmt::Write;

use crate::manifest::Manifest;

pub fn render(m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "base {} ({})", m.base.file.display(), m.base.architecture);
    let _ = writeln!(
        s,
        "{} tasks -> {} adapters: {:.1} % of the adapters, {} of {} bytes ({:.1} %)",
        m.storage.n_inputs,
        m.storage.n_outputs,
        100.0 * m.storage.count_fraction,
        m.storage.bytes,
        m.storage.input_bytes,
        100.0 * m.storage.byte_fraction
    );
    let _ = writeln!(s);
    let width = m.tasks.keys().map(String::len).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "{:<width$}  {:<16} {:>9} {:>9} {:>9} {:>7}", "task", "adapter", "nll own", "nll base", "nll merged", "regret");
    for (task, sc) in &m.scores {
        let file = m.adapters.get(sc.adapter).map(|a| a.file.as_str()).unwrap_or("?");
        let _ = writeln!(s, "{task:<width$}  {file:<16} {:>9.4} {:>9.4} {:>10.4} {:>7.3}", sc.nll_own, sc.nll_base, sc.nll_merged, sc.regret);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<16} {:>5} {:>5} {:>10} {:>8} {:>6}  tasks", "adapter", "rank", "dtype", "bytes", "method", "scale");
    for a in &m.adapters {
        let (method, scale) = match &a.merge {
            Some(c) => (c.method.clone(), format!("{:.2}", c.scale)),
            None => ("own".to_string(), "-".to_string()),
        };
        let _ = writeln!(s, "{:<16} {:>5} {:>5} {:>10} {:>8} {:>6}  {}", a.file, a.rank, a.dtype, a.bytes, method, scale, a.tasks.join(", "));
    }
    let _ = writeln!(s);
    let rounds: Vec<String> = m.rounds.iter().map(|r| format!("{:.4}", r.objective)).collect();
    let _ = writeln!(
        s,
        "objective (mean normalised regret, lower is better): initial {:.4}, final {:.4} (best clusters from round {}); per round: {}",
        m.objective.initial,
        m.objective.best,
        m.objective.best_round,
        rounds.join(" -> ")
    );
    let scored: usize = m.rounds.iter().map(|r| r.scored_sequences).sum();
    let cached: usize = m.rounds.iter().map(|r| r.cached_sequences).sum();
    let _ = writeln!(s, "clustering rounds scored {scored} sequences and reused {cached} from the cache");
    let _ = writeln!(
        s,
        "whole run: {} sequences scored by llama.cpp, {} answered from the cache",
        m.scoring.scored_sequences, m.scoring.cached_sequences
    );
    if let Some(t) = m.timings.get("total") {
        let _ = writeln!(s, "total time {t:.1} s");
    }
    s
}
