//! Greedy generation through llama.cpp, and the synthetic task sets built with it.
//!
//! A synthetic task set has known structure: G "prototype" adapters, tasks that are noisy
//! copies of a prototype, and each task's examples produced by greedy decoding with its
//! prototype applied. Which tasks belong together is then a fact the data carries, so a
//! clustering method can be checked against it (and the demo has something to chew on
//! without trained adapters).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::llama::{Batch, Model, Session};
use d2c_format::adapter::{DType, KEY_TASK_NAME};
use d2c_format::base::BaseModel;
use d2c_format::error::{Error, Result};
use d2c_format::gguf::Value;
use d2c_format::synth;

/// Greedy continuation of `prompt` (at most `max_tokens`, stopping at end-of-generation), with
/// whatever adapter the session has active. Returns the generated text.
pub fn greedy(model: &Model, session: &mut Session<'_>, prompt: &str, max_tokens: usize) -> Result<String> {
    let tokens = model.tokenize_sequence(prompt);
    if tokens.len() + max_tokens > session.n_ctx() as usize || tokens.len() > session.n_batch as usize {
        return Err(Error::Usage(format!("prompt of {} tokens does not fit the context", tokens.len())));
    }
    session.clear_kv();
    let mut batch = Batch::new(tokens.len().max(1), 1);
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i + 1 == tokens.len()).map_err(|e| Error::Llama(e.to_string()))?;
    }
    session.decode(&mut batch)?;
    let mut last = batch.n_tokens() - 1;
    let mut out = Vec::new();
    for pos in (tokens.len() as i32..).take(max_tokens) {
        let token = crate::llama::greedy_token(session.logits_ith(last));
        if model.is_eog(token) {
            break;
        }
        out.extend(model.token_bytes(token));
        batch.clear();
        batch.add(token, pos, &[0], true).map_err(|e| Error::Llama(e.to_string()))?;
        session.decode(&mut batch)?;
        last = 0;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Prompts for synthetic examples: short, varied, in the model's plain-text register.
pub const SYNTH_PROMPTS: [&str; 24] = [
    "Question: What is the colour of the sky?\nAnswer:",
    "Translate to French: good morning\nFrench:",
    "List three fruits:",
    "The quick brown fox",
    "Write the number seven in words:",
    "Complete the sentence: The weather today is",
    "Name a famous scientist:",
    "What is 2 plus 2?\nAnswer:",
    "Give a synonym for happy:",
    "Once upon a time",
    "The capital of Italy is",
    "Summarise: The cat sat on the mat all day.\nSummary:",
    "Spell the word 'house' backwards:",
    "My favourite food is",
    "Question: How many legs does a spider have?\nAnswer:",
    "Describe the sea in one word:",
    "A good name for a dog is",
    "Convert 3 km to metres:",
    "The opposite of cold is",
    "Write a greeting:",
    "Today I learned that",
    "Name a planet:",
    "Question: Which animal barks?\nAnswer:",
    "The first month of the year is",
];

#[derive(Debug, Clone)]
pub struct SynthTaskOptions {
    pub groups: usize,
    pub tasks_per_group: usize,
    pub examples: usize,
    pub rank: usize,
    pub modules: Vec<String>,
    /// Entry std of a prototype's delta: large enough to change greedy outputs.
    pub prototype_std: f32,
    /// Relative size of each task's own perturbation of its prototype's factors.
    pub noise: f32,
    pub completion_tokens: usize,
    pub dtype: DType,
    pub seed: u64,
    pub threads: Option<i32>,
}

impl Default for SynthTaskOptions {
    fn default() -> Self {
        SynthTaskOptions {
            groups: 3,
            tasks_per_group: 2,
            examples: 10,
            rank: 8,
            modules: vec!["attn_q".into(), "attn_v".into(), "ffn_up".into()],
            prototype_std: 0.02,
            noise: 0.3,
            completion_tokens: 6,
            dtype: DType::F16,
            seed: 0,
            threads: None,
        }
    }
}

/// Task name of task `t` of group `g`: the group is visible in the name for humans and tests.
pub fn synth_task_name(g: usize, t: usize) -> String {
    format!("g{g}-t{t}")
}

/// Writes `out/adapters/<task>.gguf`, `out/samples/<task>.jsonl` and `out/prototypes/g<i>.gguf`.
pub fn synth_tasks(base_path: &Path, out: &Path, opts: &SynthTaskOptions) -> Result<Vec<String>> {
    let base = BaseModel::open(base_path)?;
    let modules: Vec<&str> = opts.modules.iter().map(String::as_str).collect();
    let dirs = [out.join("adapters"), out.join("samples"), out.join("prototypes")];
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut prototype_paths: Vec<PathBuf> = Vec::new();
    let mut names = Vec::new();
    for g in 0..opts.groups {
        let proto = synth::random_adapter(&base, &modules, opts.rank, opts.rank as f32, opts.prototype_std, opts.seed * 1000 + g as u64)?;
        let p = dirs[2].join(format!("g{g}.gguf"));
        proto.write(&p, opts.dtype, &[])?;
        prototype_paths.push(p);
        for t in 0..opts.tasks_per_group {
            let name = synth_task_name(g, t);
            let mut task = proto.clone();
            let mut rng = synth::rng(opts.seed * 1000 + 500 + (g * opts.tasks_per_group + t) as u64);
            for target in task.targets.values_mut() {
                for v in target.a.iter_mut().chain(target.b.iter_mut()) {
                    *v *= 1.0 + opts.noise * synth::normal(&mut rng);
                }
            }
            task.metadata.insert(KEY_TASK_NAME.into(), Value::String(name.clone()));
            task.write(&dirs[0].join(format!("{name}.gguf")), opts.dtype, &[])?;
            names.push(name);
        }
    }

    // Examples: greedy completions under each task's prototype, prompts drawn per task.
    let mut model = Model::load(base_path)?;
    let adapters = prototype_paths.iter().map(|p| model.load_adapter(p)).collect::<Result<Vec<_>>>()?;
    let mut session = model.session(512, 512, 1, opts.threads)?;
    for g in 0..opts.groups {
        session.set_adapter(Some((adapters[g], 1.0)))?;
        for t in 0..opts.tasks_per_group {
            let name = synth_task_name(g, t);
            let offset = (g * opts.tasks_per_group + t) * 5;
            let mut lines = String::new();
            for e in 0..opts.examples {
                let prompt = SYNTH_PROMPTS[(offset + e) % SYNTH_PROMPTS.len()];
                let completion = greedy(&model, &mut session, prompt, opts.completion_tokens)?;
                if completion.trim().is_empty() {
                    continue;
                }
                lines.push_str(&serde_json::json!({"prompt": prompt, "completion": completion}).to_string());
                lines.push('\n');
            }
            let p = dirs[1].join(format!("{name}.jsonl"));
            d2c_format::fsutil::write_atomic(&p, &[], |f| f.write_all(lines.as_bytes()))?;
        }
    }
    drop(session);
    Ok(names)
}
