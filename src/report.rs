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
    let _ = writeln!(
        s,
        "{:<width$}  {:<16} {:>6} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10}",
        "task", "adapter", "served", "nll own", "nll base", "nll merged", "exact o/m", "regret", "bytes/task"
    );
    for (task, sc) in &m.scores {
        let adapter = m.adapters.get(sc.adapter);
        let file = adapter.map(|a| a.file.as_str()).unwrap_or("?");
        // A shared adapter's bytes are split evenly between the tasks it serves.
        let bytes = adapter.map(|a| a.bytes / a.tasks.len().max(1) as u64).unwrap_or(0);
        let _ = writeln!(
            s,
            "{task:<width$}  {file:<16} {:>6} {:>9.4} {:>9.4} {:>10.4} {:>9} {:>7.3} {bytes:>10}",
            format!("x{:.2}", m.task_scale(task)),
            sc.nll_own,
            sc.nll_base,
            sc.nll_merged,
            format!("{:.2}/{:.2}", sc.exact_own, sc.exact_merged),
            sc.regret
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<16} {:>5} {:>5} {:>10} {:>8} {:>6}  tasks", "adapter", "rank", "dtype", "bytes", "method", "scale");
    for a in &m.adapters {
        let (method, scale) = match &a.merge {
            Some(c) => (c.method.clone(), format!("{:.2}", c.scale)),
            None => ("own".to_string(), "-".to_string()),
        };
        // Per-target ranks (some targets dropped, or ranks that differ) show as their range.
        let rank = match &a.target_ranks {
            Some(r) => {
                let kept: Vec<usize> = r.values().copied().filter(|&x| x > 0).collect();
                let lo = kept.iter().min().copied().unwrap_or(0);
                format!("{lo}-{}*", a.rank)
            }
            None => a.rank.to_string(),
        };
        let _ = writeln!(s, "{:<16} {:>5} {:>5} {:>10} {:>8} {:>6}  {}", a.file, rank, a.dtype, a.bytes, method, scale, a.tasks.join(", "));
    }
    let _ = writeln!(s);
    let rounds: Vec<String> = m.rounds.iter().map(|r| format!("{:.4}", r.objective)).collect();
    let _ = writeln!(
        s,
        "objective ({}, lower is better): initial {:.4}, final {:.4} (best clusters from round {}); per round: {}",
        m.settings["objective"].as_str().unwrap_or("nll"),
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
    if let Some(fit) = &m.interference {
        let rho = fit.spearman.map_or("undefined".to_string(), |r| format!("{r:.2}"));
        let _ = writeln!(s, "activation model against the scored regrets: Spearman {rho} over {} (task, cluster) pairs", fit.pairs);
    }
    let stages: Vec<String> = m
        .timings
        .iter()
        .filter(|(name, _)| *name != "total")
        .map(|(name, secs)| match m.peak_memory_mib.get(name) {
            Some(mib) => format!("{name} {secs:.1} s ({mib:.0} MiB peak)"),
            None => format!("{name} {secs:.1} s"),
        })
        .collect();
    if !stages.is_empty() {
        let _ = writeln!(s, "stages: {}", stages.join(", "));
    }
    if let Some(t) = m.timings.get("total") {
        let _ = writeln!(s, "total time {t:.1} s");
    }
    for c in &m.lineage {
        let files = if c.written.is_empty() { "no file written".to_string() } else { format!("wrote {}", c.written.join(", ")) };
        let removed = if c.removed.is_empty() { String::new() } else { format!(", removed {}", c.removed.join(", ")) };
        let _ = writeln!(
            s,
            "then {} {}: {} ({files}{removed}; {} sequences scored, {} cached, {:.1} s)",
            c.change, c.task, c.placement, c.scored_sequences, c.cached_sequences, c.seconds
        );
    }
    s
}
