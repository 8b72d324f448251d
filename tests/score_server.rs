//! End to end against a real llama-server: for one-token completions our NLL must equal minus
//! the log-probability llama-server reports for that token, with and without an adapter.

mod common;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use d2c_gguf::adapter::DType;
use d2c_gguf::base::BaseModel;
use d2c_gguf::samples::Sample;
use d2c_gguf::score::{ScoreJob, ScoreOptions, Scorer};
use d2c_gguf::synth;

/// The server's ggml may be older than ours: small numeric differences are expected.
const TOLERANCE: f64 = 0.05;

/// A llama-server child process, killed when dropped (also when the test fails).
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(model: &Path, adapter: &Path, log: PathBuf) -> Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = File::create(&log).unwrap();
        let child = Command::new(common::llama_server())
            .args(["-m", common::path_str(model), "--lora", common::path_str(adapter), "--lora-init-without-apply"])
            .args(["-c", "2048", "-np", "1", "-t", "2", "--host", "127.0.0.1", "--port", &port.to_string()])
            // The scorer's attention kernel. With flash attention llama.cpp's CPU path
            // accumulates in F16 for short prompts, which moves this small model's
            // log-probabilities by up to 0.1 nats (" London" after "The capital of France is").
            .args(["-fa", "off"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start llama-server");
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).http_status_as_error(false).build().into();
        let mut server = Server { child, url: format!("http://127.0.0.1:{port}"), log, agent };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("llama-server exited with {status} before it was ready:\n{}", server.log_tail());
            }
            if let Ok(r) = server.agent.get(format!("{}/health", server.url)).call() {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "llama-server not ready after 120 s:\n{}", server.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let mut r = self.agent.post(format!("{}{path}", self.url)).send_json(body).expect("request llama-server");
        let status = r.status();
        let v: Value = r.body_mut().read_json().expect("JSON reply");
        assert_eq!(status, 200, "POST {path}: {v}");
        v
    }

    /// The server's top candidates for the token after `prompt`, as (token id, log-probability),
    /// with the adapter at `scale`. Pre-sampling probabilities: the softmax of the raw logits.
    fn top_logprobs(&self, prompt: &str, scale: f32) -> Vec<(i32, f64)> {
        let v = self.post(
            "/completion",
            &json!({
                "prompt": prompt, "n_predict": 1, "n_probs": 10, "temperature": 0.0,
                "cache_prompt": false, "lora": [{"id": 0, "scale": scale}],
            }),
        );
        // Newer servers: completion_probabilities[0].top_logprobs[{id, logprob}]; older ones:
        // completion_probabilities[0].probs[{tok_str, prob}] (no id) are not accepted here.
        let top = v["completion_probabilities"][0]["top_logprobs"].as_array().unwrap_or_else(|| panic!("no top_logprobs in the reply: {v}"));
        top.iter().map(|t| (t["id"].as_i64().expect("token id") as i32, t["logprob"].as_f64().expect("logprob"))).collect()
    }
}

fn write_adapter(dir: &Path) -> PathBuf {
    let base = BaseModel::open(common::base_model()).unwrap();
    let a = synth::random_adapter(&base, &["attn_q", "attn_v"], 8, 16.0, 0.03, 11).unwrap();
    let p = dir.join("server-adapter.gguf");
    a.write(&p, DType::F32, &[]).unwrap();
    p
}

#[test]
fn one_token_nll_matches_llama_server_logprobs() {
    let dir = common::tempdir();
    let model = common::base_model();
    let adapter = write_adapter(dir.path());
    let server = Server::start(&model, &adapter, dir.path().join("llama-server.log"));
    // The global scale stays 1.0 despite --lora-init-without-apply: clear it, and still send
    // the per-request field every time.
    server.post("/lora-adapters", &json!([]));

    // One thread for us: the server (two threads) is idle while we score, and the other way round.
    let mut scorer = Scorer::new(&model, ScoreOptions { threads: Some(1), ..ScoreOptions::default() }).unwrap();
    let a = scorer.add_adapter(&adapter).unwrap();

    let prompts = [
        "The capital of France is",
        "1, 2, 3, 4, 5,",
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n",
        "Water freezes at zero degrees",
    ];
    let mut compared = 0;
    let mut adapter_moved = 0.0f64;
    let mut max_diff = 0.0f64;
    for prompt in prompts {
        for (scale, job_adapter) in [(0.0f32, None), (1.0, Some(a))] {
            let top = server.top_logprobs(prompt, scale);
            assert!(!top.is_empty());
            // The three best candidates whose text tokenises back to exactly that one token,
            // scored in one call, with the base model too when the adapter is on.
            let mut candidates: Vec<(String, f64, Vec<Sample>)> = Vec::new();
            for &(id, logprob) in &top {
                if candidates.len() == 3 {
                    break;
                }
                let token = d2c_gguf::llama::Token(id);
                let Ok(text) = String::from_utf8(scorer.model().token_bytes(token)) else { continue };
                let sample = Sample { prompt: prompt.into(), completion: text.clone() };
                let Ok(st) = scorer.tokenize_sample(&sample) else { continue };
                if text.is_empty() || st.n_scored() != 1 || st.tokens[st.first_scored] != token {
                    continue;
                }
                candidates.push((text, logprob, vec![sample]));
            }
            let mut jobs: Vec<ScoreJob<'_>> =
                candidates.iter().map(|(_, _, one)| ScoreJob { adapter: job_adapter, scale: 1.0, samples: one }).collect();
            jobs.extend(candidates.iter().map(|(_, _, one)| ScoreJob::base(one)));
            let ours = scorer.score(&jobs).unwrap();
            for (k, (text, logprob, _)) in candidates.iter().enumerate() {
                let nll = ours[k].mean_nll;
                assert!(
                    (nll + logprob).abs() < TOLERANCE,
                    "prompt {prompt:?}, token {text:?}, adapter scale {scale}: ours {nll}, llama-server {}",
                    -logprob
                );
                max_diff = max_diff.max((nll + logprob).abs());
                if scale == 1.0 {
                    adapter_moved = adapter_moved.max((ours[candidates.len() + k].mean_nll - nll).abs());
                }
                compared += 1;
            }
        }
    }
    eprintln!("compared {compared} tokens; largest |ours - llama-server| = {max_diff:.2e} nats");
    assert!(compared >= 16, "only {compared} tokens could be compared");
    // The adapter comparison means something only if the adapter changes the numbers by more
    // than the tolerance somewhere.
    assert!(adapter_moved > 2.0 * TOLERANCE, "adapter moved NLLs by at most {adapter_moved}");
}
