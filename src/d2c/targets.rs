//! What a task's examples are judged against. By default, their written completions. Under
//! `--targets own`, what the task's own adapter answers where it answers otherwise: every
//! candidate is then held to reproducing the own adapter, on all of a task's examples rather
//! than only on those the own adapter gets right.
//!
//! Why one would: the objective counts examples relative to the own adapter's count, so a
//! task whose own adapter gets 3 of 10 right is judged on those 3 alone, each worth a third of
//! its regret, and a merge that gets 2 more of the other 7 right earns a bonus that can outweigh
//! a loss elsewhere. Why it is not the default: on the quality benchmark (K = 9 of 36,
//! docs/results.md) it kept fewer held-out tests than the written completions (1106 against
//! 1124 of 1142): some of those bonuses are real (merges that serve a task better than its own
//! adapter on the tests too), and holding every task to its own adapter's mistakes gave them up.

use std::path::Path;

use super::options::Targets;
use super::tasks::Task;
use crate::error::Result;
use crate::evaluate::{self, EvalOptions};

/// Longest answer generated per example: answers end at a newline long before this; an
/// adapter that runs on without one is held to what it wrote this far (and misses it, as
/// `eval` with a shorter limit would count it).
const MAX_ANSWER_TOKENS: usize = 64;

/// The tasks with their examples' completions replaced by their own adapters' answers where
/// `targets` asks for it, each such task under a new cache identity; and how many examples of
/// each task were replaced (empty under `Targets::Examples`).
pub(crate) fn apply(targets: Targets, base: &Path, mut tasks: Vec<Task>, threads: Option<i32>, progress: bool) -> Result<(Vec<Task>, Vec<usize>)> {
    if targets == Targets::Examples {
        return Ok((tasks, Vec::new()));
    }
    let jobs: Vec<_> =
        tasks.iter().map(|t| (t.adapter_path.clone(), t.samples_path.clone(), t.samples.iter().map(|s| s.prompt.clone()).collect())).collect();
    let opts = EvalOptions { max_tokens: MAX_ANSWER_TOKENS, threads, progress, ..EvalOptions::default() };
    let answers = evaluate::adapter_answers(base, &jobs, &opts)?;
    let mut replaced = Vec::with_capacity(tasks.len());
    for (task, answers) in tasks.iter_mut().zip(answers) {
        let mut count = 0;
        for (sample, answer) in task.samples.iter_mut().zip(&answers) {
            if let Some(completion) = own_target(&sample.completion, answer) {
                sample.completion = completion;
                count += 1;
            }
        }
        if count > 0 {
            let answers_hash = blake3::hash(answers.join("\n").as_bytes()).to_hex();
            task.samples_hash = format!("{}+own-{}", task.samples_hash, &answers_hash[..16]);
        }
        replaced.push(count);
    }
    Ok((tasks, replaced))
}

/// The completion an example is judged against given the own adapter's `answer` (first line,
/// trimmed): `None` (keep the written one) where they agree or the answer is empty (nothing
/// to reproduce); else the answer, after the written completion's leading whitespace (the
/// token boundary the prompt expects, as in " 42").
fn own_target(completion: &str, answer: &str) -> Option<String> {
    if answer.is_empty() || answer == completion.trim() {
        return None;
    }
    let lead = &completion[..completion.len() - completion.trim_start().len()];
    Some(format!("{lead}{answer}"))
}

#[cfg(test)]
mod tests {
    use super::own_target;

    #[test]
    fn an_answer_replaces_a_completion_only_where_it_differs() {
        assert_eq!(own_target(" 42", "42"), None);
        assert_eq!(own_target(" 42\n", "42"), None);
        assert_eq!(own_target(" 42", ""), None);
        assert_eq!(own_target(" 42", "43"), Some(" 43".to_string()));
        assert_eq!(own_target("cinq", "six"), Some("six".to_string()));
    }
}
