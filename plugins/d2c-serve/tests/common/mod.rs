//! Fixtures for the end-to-end tests: real adapters and a real manifest for the cached base
//! model, the real llama-server, and the d2c-serve binary run as a user would.
//! A missing asset fails loudly (run scripts/setup.sh): tests never skip silently.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use d2c_format::adapter::DType;
use d2c_format::base::BaseModel;
use d2c_format::manifest::{self, AdapterEntry, BaseEntry, Manifest, Objective, ScoringStats, Storage};
use d2c_format::synth;
use serde_json::{json, Value};

#[allow(unused_imports)] // each test binary uses some of them
pub use d2c_test_assets::{base_model, cache_dir, llama_server};

pub fn plugin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_d2c-serve"))
}

/// llama-server settings shared by the plugin's child and the reference servers: the same
/// context and slot count, so both run the same computation.
pub const SERVER_ARGS: [&str; 6] = ["-c", "2048", "-np", "1", "-t", "1"];

/// A manifest directory: `n_adapters` random adapters of distinct seeds (strong enough to
/// change greedy text), tasks mapped onto them, hashes computed after writing.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub manifest: PathBuf,
    pub adapters: Vec<PathBuf>,
    pub tasks: BTreeMap<String, usize>,
}

impl Fixture {
    pub fn new(tasks: &[(&str, usize)], n_adapters: usize) -> Fixture {
        Self::with_scales(tasks, n_adapters, &[])
    }

    /// As [`Fixture::new`], with serve scales for some tasks (the manifest's `task_scales`).
    pub fn with_scales(tasks: &[(&str, usize)], n_adapters: usize, scales: &[(&str, f32)]) -> Fixture {
        let dir = d2c_test_assets::tempdir("d2c-serve-test-");
        let adapters: Vec<PathBuf> = (0..n_adapters).map(|i| random_adapter_file(dir.path(), i)).collect();
        let manifest = dir.path().join(manifest::FILE_NAME);
        write_manifest(&manifest, &adapters, tasks, scales);
        let tasks = tasks.iter().map(|(t, i)| (t.to_string(), *i)).collect();
        Fixture { dir, manifest, adapters, tasks }
    }
}

/// `merged-{i}.gguf` in `dir`: a random adapter of seed 100 + i (strong enough to change greedy
/// text, and different from every other i).
pub fn random_adapter_file(dir: &Path, i: usize) -> PathBuf {
    let base = BaseModel::open(base_model()).expect("open base model");
    let path = dir.join(format!("merged-{i}.gguf"));
    let adapter = synth::random_adapter(&base, &["attn_q", "attn_v", "ffn_down"], 8, 16.0, 0.05, 100 + i as u64).expect("random adapter");
    adapter.write(&path, DType::F16, &[]).expect("write adapter");
    path
}

/// A manifest at `path` serving `adapters` (files beside it, hashed now), task -> index into
/// `adapters`, with optional serve scales.
pub fn write_manifest(path: &Path, adapters: &[PathBuf], tasks: &[(&str, usize)], scales: &[(&str, f32)]) {
    let base_path = base_model();
    let base = BaseModel::open(&base_path).expect("open base model");
    let tasks: BTreeMap<String, usize> = tasks.iter().map(|(t, i)| (t.to_string(), *i)).collect();
    let entries = adapters
        .iter()
        .enumerate()
        .map(|(i, adapter)| AdapterEntry {
            file: adapter.file_name().unwrap().to_str().unwrap().to_owned(),
            blake3: manifest::hash_file(adapter).unwrap(),
            bytes: std::fs::metadata(adapter).unwrap().len(),
            rank: 8,
            target_ranks: None,
            dtype: "f16".into(),
            tasks: tasks.iter().filter(|(_, &a)| a == i).map(|(t, _)| t.clone()).collect(),
            merge: None,
        })
        .collect();
    let m = Manifest {
        format: manifest::FORMAT.into(),
        tool: "d2c-serve tests".into(),
        base: BaseEntry {
            file: base_path.clone(),
            blake3: manifest::hash_file(&base_path).unwrap(),
            architecture: base.architecture.clone(),
            bytes: std::fs::metadata(&base_path).unwrap().len(),
        },
        adapters: entries,
        tasks,
        task_scales: scales.iter().map(|(t, s)| (t.to_string(), *s)).collect(),
        settings: json!({}),
        objective: Objective { initial: 0.0, best: 0.0, best_round: 0 },
        rounds: vec![],
        scores: BTreeMap::new(),
        storage: Storage {
            bytes: 0,
            input_bytes: 0,
            n_inputs: 0,
            n_outputs: adapters.len(),
            count_fraction: 0.0,
            byte_fraction: 0.0,
            budget_bytes: None,
        },
        scoring: ScoringStats { scored_sequences: 0, cached_sequences: 0 },
        interference: None,
        timings: BTreeMap::new(),
        peak_memory_mib: Default::default(),
        inputs: Default::default(),
        lineage: Vec::new(),
    };
    // Written beside and renamed: a reload reading the path sees the old or the new file whole.
    let staged = path.with_extension("json.part");
    std::fs::write(&staged, m.to_json()).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The d2c-serve binary, stderr (its JSON log) to a file; SIGTERM + wait on drop.
pub struct Plugin {
    pub child: Child,
    pub log: PathBuf,
    pub addr: String,
    /// `upstream_started` pid (child mode only).
    pub upstream_pid: Option<u32>,
    pub upstream_url: String,
}

/// Runs the plugin to its `listening` line, or returns its exit status and log if it exits first.
pub fn try_start_plugin(args: &[&str], log: &Path) -> Result<Plugin, (i32, String)> {
    let logf = std::fs::File::create(log).unwrap();
    let mut child =
        Command::new(plugin_bin()).args(args).stdin(Stdio::null()).stdout(logf.try_clone().unwrap()).stderr(logf).spawn().expect("start d2c-serve");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(listening) = events(&text).into_iter().find(|e| e["event"] == "listening") {
            let upstream_pid = events(&text).into_iter().find(|e| e["event"] == "upstream_started").map(|e| e["pid"].as_u64().unwrap() as u32);
            return Ok(Plugin {
                child,
                log: log.to_path_buf(),
                addr: listening["addr"].as_str().unwrap().to_owned(),
                upstream_pid,
                upstream_url: listening["upstream"].as_str().unwrap().to_owned(),
            });
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Let the log settle: the error line is the last thing written.
            return Err((status.code().unwrap_or(-1), std::fs::read_to_string(log).unwrap_or_default()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("d2c-serve did not start in 120 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn start_plugin(fixture: &Fixture, extra: &[&str]) -> Plugin {
    let server = llama_server();
    let manifest = fixture.manifest.to_str().unwrap();
    let mut args = vec!["--manifest", manifest, "--llama-server", server.to_str().unwrap(), "--port", "0"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(&SERVER_ARGS);
    let log = fixture.dir.path().join(format!("d2c-serve-{}.log", unique()));
    match try_start_plugin(&args, &log) {
        Ok(p) => p,
        Err((code, log)) => panic!("d2c-serve exited with {code} during start-up:\n{log}"),
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// The JSON lines of a log (non-JSON lines, e.g. llama-server's own output, skipped).
pub fn events(text: &str) -> Vec<Value> {
    text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("event").is_some()).collect()
}

impl Plugin {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn upstream(&self, path: &str) -> String {
        format!("{}{path}", self.upstream_url)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig} d2c-serve failed");
    }

    /// Waits up to `timeout` for the plugin to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
            if self.wait_exit(Duration::from_secs(15)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Whether a process is alive (a zombie counts as gone: it holds no memory and no port).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !process_alive(pid)
}

pub fn agent() -> ureq::Agent {
    // Errors are answers here: tests assert on 4xx/5xx bodies.
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// POST JSON; returns (status, body text).
pub fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, String) {
    let mut resp = agent.post(url).send_json(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

pub fn post_raw(agent: &ureq::Agent, url: &str, body: &[u8]) -> (u16, String) {
    let mut resp = agent.post(url).header("content-type", "application/json").send(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

pub fn get(agent: &ureq::Agent, url: &str) -> (u16, String) {
    let mut resp = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

pub fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Greedy, fixed seed, no prompt cache: the answer depends only on the prompt and adapters.
pub fn greedy(mut body: Value) -> Value {
    let o = body.as_object_mut().unwrap();
    o.insert("temperature".into(), json!(0.0));
    o.insert("top_k".into(), json!(1));
    o.insert("seed".into(), json!(42));
    o.insert("cache_prompt".into(), json!(false));
    body
}

/// The per-request `lora` list that selects adapter `chosen` (or none) among `n`.
pub fn lora_list(n: usize, chosen: Option<usize>) -> Value {
    scaled_lora_list(n, chosen, 1.0)
}

/// As [`lora_list`], the chosen adapter at `scale`.
pub fn scaled_lora_list(n: usize, chosen: Option<usize>, scale: f32) -> Value {
    Value::Array((0..n).map(|id| json!({"id": id, "scale": if Some(id) == chosen { scale } else { 0.0 }})).collect())
}

/// Reads a whole streamed response, returning the raw SSE text.
pub fn read_stream(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let mut text = String::new();
    resp.body_mut().as_reader().read_to_string(&mut text).unwrap();
    text
}

/// A reference llama-server, started directly (no plugin), killed on drop.
pub struct DirectServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl DirectServer {
    pub fn start(loras: &[&Path]) -> DirectServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = d2c_test_assets::tempdir("d2c-serve-direct-");
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(llama_server());
        cmd.arg("-m").arg(base_model()).args(["--host", "127.0.0.1", "--port", &port.to_string()]).args(SERVER_ARGS);
        if !loras.is_empty() {
            let list: Vec<String> = loras.iter().map(|l| l.display().to_string()).collect();
            cmd.arg("--lora").arg(list.join(",")).arg("--lora-init-without-apply");
        }
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdout(logf.try_clone().unwrap()).stderr(logf).stdin(Stdio::null());
        let child = cmd.spawn().expect("start llama-server");
        let mut s = DirectServer { child, port, _dir: dir, log };
        let agent = agent();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("llama-server exited with {status}:\n{}", std::fs::read_to_string(&s.log).unwrap_or_default());
            }
            if agent.get(&s.url("/health")).call().is_ok_and(|r| r.status() == 200) {
                return s;
            }
            assert!(Instant::now() < deadline, "llama-server not healthy in 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DirectServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay in front of a llama-server that can close one connection as a request arrives,
/// after reading it and before anything reaches the server: what a keep-alive socket closed by
/// the server at that moment looks like to the plugin.
pub struct DroppingRelay {
    pub port: u16,
    drop_next_post: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DroppingRelay {
    pub fn start(upstream_port: u16) -> DroppingRelay {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_next_post = Arc::new(AtomicUsize::new(0));
        let pending = drop_next_post.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let pending = pending.clone();
                std::thread::spawn(move || {
                    let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream_port)) else { return };
                    let (mut client_back, mut server_in) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut server_in, &mut client_back);
                        let _ = client_back.shutdown(std::net::Shutdown::Both);
                    });
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let drop_it =
                            buf[..n].starts_with(b"POST ") && pending.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1)).is_ok();
                        if drop_it || std::io::Write::write_all(&mut server, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        DroppingRelay { port, drop_next_post }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next `n` POST requests are read and their connection closed unanswered.
    pub fn drop_next_posts(&self, n: usize) {
        self.drop_next_post.store(n, std::sync::atomic::Ordering::SeqCst);
    }
}
