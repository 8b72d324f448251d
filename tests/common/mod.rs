//! Shared test fixtures: the real assets cached by `scripts/setup.sh`, and temp dirs.
//! A missing asset fails the test loudly (run `scripts/setup.sh`): tests never skip silently.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(unused_imports)] // each test binary uses some of them
pub use d2c_test_assets::{base_model, cache_dir, llama_server, path_str, python};

/// The demo set: four tasks with trained adapters, whose own adapters reproduce most of
/// their examples.
pub fn demo_set() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo-set")
}

/// Copies of some of the demo set's tasks under `dir` (copies, so a test may change them):
/// (adapters dir, samples dir).
pub fn demo_subset(dir: &Path, tasks: &[&str]) -> (PathBuf, PathBuf) {
    let (adapters, samples) = (dir.join("adapters"), dir.join("samples"));
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::create_dir_all(&samples).unwrap();
    for task in tasks {
        std::fs::copy(demo_set().join(format!("adapters/{task}.gguf")), adapters.join(format!("{task}.gguf"))).unwrap();
        std::fs::copy(demo_set().join(format!("samples/{task}.jsonl")), samples.join(format!("{task}.jsonl"))).unwrap();
    }
    (adapters, samples)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_d2c-gguf"))
}

/// Runs the d2c-gguf binary; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run d2c-gguf");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

pub fn tempdir() -> tempfile::TempDir {
    d2c_test_assets::tempdir("d2c-test-")
}

/// Greatest |x - y| / max(|y|, floor).
pub fn max_rel_err(x: &[f32], y: &[f32], floor: f32) -> f32 {
    assert_eq!(x.len(), y.len());
    x.iter().zip(y).map(|(a, b)| (a - b).abs() / b.abs().max(floor)).fold(0.0, f32::max)
}

/// A real llama-server child on a free loopback port, killed when dropped (even on panic).
pub struct LlamaServer {
    child: std::process::Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    pub fn start(model: &Path, loras: &[&Path], extra: &[&str]) -> LlamaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempdir();
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(llama_server());
        cmd.arg("-m").arg(model).args(["--host", "127.0.0.1", "--port", &port.to_string(), "-c", "2048", "-np", "1", "-t", "2"]);
        if !loras.is_empty() {
            // Repeating --lora is deprecated (only the last one counts): one comma-separated list.
            let list: Vec<String> = loras.iter().map(|l| l.display().to_string()).collect();
            cmd.arg("--lora").arg(list.join(",")).arg("--lora-init-without-apply");
        }
        cmd.args(extra);
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdout(logf.try_clone().unwrap()).stderr(logf).stdin(std::process::Stdio::null());
        let child = cmd.spawn().expect("start llama-server");
        let mut s = LlamaServer { child, port, log, _dir: dir };
        s.wait_healthy();
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_healthy(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("llama-server exited with {status}:\n{}", self.log_text());
            }
            if let Ok(r) = ureq::get(&self.url("/health")).call() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("llama-server not healthy after 120 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        ureq::get(&self.url(path)).call().expect("GET").body_mut().read_json().expect("json")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        ureq::post(&self.url(path)).send_json(body).expect("POST").body_mut().read_json().expect("json")
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small synthetic task set (`DIR/adapters/*.gguf`, `DIR/samples/*.jsonl`) made once per
/// test binary and seed: `groups` x `per_group` tasks of 6 examples, rank-8 f16 adapters.
pub fn small_task_set(groups: usize, per_group: usize, seed: u64) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type BuiltSets = HashMap<(usize, usize, u64), PathBuf>;
    static SETS: Mutex<Option<BuiltSets>> = Mutex::new(None);
    let mut sets = SETS.lock().unwrap_or_else(|e| e.into_inner());
    let sets = sets.get_or_insert_with(HashMap::new);
    sets.entry((groups, per_group, seed))
        .or_insert_with(|| {
            let dir = tempdir().keep();
            let opts = d2c_gguf::generate::SynthTaskOptions {
                groups,
                tasks_per_group: per_group,
                examples: 6,
                completion_tokens: 5,
                prototype_std: 0.05,
                noise: 0.2,
                seed,
                ..Default::default()
            };
            d2c_gguf::generate::synth_tasks(&base_model(), &dir, &opts).expect("synthetic tasks");
            dir
        })
        .clone()
}
