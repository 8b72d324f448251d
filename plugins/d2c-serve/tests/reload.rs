//! Live reload end to end: d2c-serve in front of a real llama-server swaps manifests (SIGHUP and
//! `POST /admin/reload`) while clients keep sending mixed-task requests, plain and streamed.
//! Every answer must come back 200 from an adapter the task had before or after the swap, with
//! exactly that adapter's text; every replaced llama-server must be gone once drained; a
//! manifest that fails verification or whose server cannot start must change nothing.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PROMPT: &str = "The three most important things about rivers are";
const TASKS_A: [(&str, usize); 4] = [("summarize", 0), ("translate", 1), ("classify", 2), ("extract", 0)];
/// Over manifest B's adapters [merged-3, merged-0, merged-1]: every task changes adapter, and
/// adapter ids mean other files than in A.
const TASKS_B: [(&str, usize); 4] = [("summarize", 0), ("translate", 1), ("classify", 2), ("extract", 0)];

fn completion(task: &str, stream: bool) -> Value {
    greedy(json!({"prompt": PROMPT, "n_predict": 8, "task": task, "stream": stream}))
}

/// The text of a `/completion` answer, plain or streamed (SSE `data:` events joined).
fn answer_text(body: &str, stream: bool) -> String {
    if !stream {
        return json_of(body)["content"].as_str().unwrap_or_else(|| panic!("no content in {body}")).to_owned();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| json_of(d)["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

struct Answer {
    task: &'static str,
    started: Instant,
    status: u16,
    adapter: String,
    text: String,
    stream: bool,
}

/// What each adapter file answers, from a llama-server started directly with all of them.
fn reference_answers(files: &[PathBuf]) -> BTreeMap<String, String> {
    let paths: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let server = DirectServer::start(&paths);
    let agent = agent();
    let mut answers = BTreeMap::new();
    for (i, file) in files.iter().enumerate() {
        let mut body = greedy(json!({"prompt": PROMPT, "n_predict": 8}));
        body["lora"] = lora_list(files.len(), Some(i));
        let (status, text) = post(&agent, &server.url("/completion"), &body);
        assert_eq!(status, 200, "{text}");
        answers.insert(file.file_name().unwrap().to_str().unwrap().to_owned(), answer_text(&text, false));
    }
    let distinct: std::collections::BTreeSet<&String> = answers.values().collect();
    assert_eq!(distinct.len(), files.len(), "adapters must answer differently to tell a wrong route: {answers:?}");
    answers
}

fn wait_for_event(plugin: &Plugin, name: &str, nth: usize, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let log = plugin.log_text();
        if let Some(e) = events(&log).into_iter().filter(|e| e["event"] == name).nth(nth) {
            return e;
        }
        assert!(Instant::now() < deadline, "no {name} event #{nth} within {timeout:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn upstream_pid(plugin: &Plugin, generation: u64) -> u32 {
    let log = plugin.log_text();
    events(&log)
        .into_iter()
        .find(|e| e["event"] == "upstream_started" && e["generation"] == generation)
        .unwrap_or_else(|| panic!("no llama-server started for generation {generation}:\n{log}"))["pid"]
        .as_u64()
        .unwrap() as u32
}

fn adapter_of(tasks: &[(&str, usize)], files: &[&str], task: &str) -> String {
    files[tasks.iter().find(|(t, _)| *t == task).unwrap().1].to_owned()
}

#[test]
fn a_live_reload_under_load_answers_every_request_from_a_right_adapter() {
    let fixture = Fixture::new(&TASKS_A, 3);
    let dir = fixture.dir.path();
    let extra = random_adapter_file(dir, 3);
    let files_a = fixture.adapters.clone();
    let files_b = vec![extra.clone(), files_a[0].clone(), files_a[1].clone()];
    let reference = reference_answers(&[files_a.clone(), vec![extra]].concat());
    let names = |files: &[PathBuf]| -> Vec<String> { files.iter().map(|f| f.file_name().unwrap().to_str().unwrap().to_owned()).collect() };
    let (names_a, names_b) = (names(&files_a), names(&files_b));
    let names_a: Vec<&str> = names_a.iter().map(String::as_str).collect();
    let names_b: Vec<&str> = names_b.iter().map(String::as_str).collect();

    let mut plugin = start_plugin(&fixture, &[]);
    let first_server = plugin.upstream_pid.unwrap();
    let agent = agent();
    let running = AtomicBool::new(true);
    // (when the swap to B was seen, when the admin reload back to A answered)
    let mut switched: Vec<Instant> = Vec::new();

    let answers: Vec<Answer> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (agent, plugin, running) = (agent.clone(), &plugin, &running);
                s.spawn(move || {
                    let mut seen = Vec::new();
                    let mut i = c;
                    while running.load(Ordering::SeqCst) {
                        let task = TASKS_A[i % TASKS_A.len()].0;
                        let stream = c == 3;
                        i += 1;
                        let started = Instant::now();
                        let resp = agent.post(&plugin.url("/completion")).send_json(completion(task, stream)).expect("request sent");
                        let status = resp.status().as_u16();
                        let adapter = resp.headers().get("x-d2c-adapter").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                        let body = resp.into_body().read_to_string().unwrap_or_else(|e| format!("body cut: {e}"));
                        let text = if status == 200 { answer_text(&body, stream) } else { body };
                        seen.push(Answer { task, started, status, adapter, text, stream });
                    }
                    seen
                })
            })
            .collect();

        std::thread::sleep(Duration::from_secs(2));
        // A -> B by SIGHUP, the manifest replaced in place (as a deploy script would).
        write_manifest(&fixture.manifest, &files_b, &TASKS_B, &[]);
        plugin.signal("HUP");
        let done = wait_for_event(&plugin, "reload_done", 0, Duration::from_secs(120));
        switched.push(Instant::now());
        assert_eq!(done["generation"], 1);
        std::thread::sleep(Duration::from_secs(2));

        // B -> A through the admin endpoint, which answers once the new set serves.
        write_manifest(&fixture.manifest, &files_a, &TASKS_A, &[]);
        let (status, reply) = post(&agent, &plugin.url("/admin/reload"), &json!({}));
        switched.push(Instant::now());
        assert_eq!(status, 200, "{reply}");
        let reply = json_of(&reply);
        assert_eq!(reply["status"], "reloaded");
        assert_eq!(reply["reload"]["generation"], 2);
        assert_eq!(reply["reload"]["adapters"], 3);
        std::thread::sleep(Duration::from_secs(2));
        running.store(false, Ordering::SeqCst);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });

    let mut per_generation = [0usize; 3];
    for a in &answers {
        assert_eq!(a.status, 200, "task {} (stream {}) failed during the swaps: {}\nplugin log:\n{}", a.task, a.stream, a.text, plugin.log_text());
        let under_a = adapter_of(&TASKS_A, &names_a, a.task);
        let under_b = adapter_of(&TASKS_B, &names_b, a.task);
        let generation = if a.started >= switched[1] {
            assert_eq!(a.adapter, under_a, "task {} sent after the reload back to A", a.task);
            2
        } else if a.started >= switched[0] {
            assert!(a.adapter == under_b || a.adapter == under_a, "task {} between the reloads went to {}", a.task, a.adapter);
            if a.adapter == under_b {
                1
            } else {
                2
            }
        } else {
            assert!(a.adapter == under_a || a.adapter == under_b, "task {} before the first reload went to {}", a.task, a.adapter);
            if a.adapter == under_a {
                0
            } else {
                1
            }
        };
        per_generation[generation] += 1;
        assert_eq!(a.text, reference[&a.adapter], "task {} (stream {}) answered by {} with another adapter's text", a.task, a.stream, a.adapter);
    }
    assert!(per_generation.iter().all(|&n| n > 0), "every generation must have served requests: {per_generation:?}");
    assert!(answers.iter().any(|a| a.stream), "streams ran through the swaps");

    // Each replaced server was stopped once its requests had ended, none cut.
    let second_server = upstream_pid(&plugin, 1);
    let third_server = upstream_pid(&plugin, 2);
    assert!(wait_gone(first_server, Duration::from_secs(30)), "generation 0's llama-server outlived its drain");
    assert!(wait_gone(second_server, Duration::from_secs(30)), "generation 1's llama-server outlived its drain");
    for n in 0..2 {
        let retired = wait_for_event(&plugin, "generation_retired", n, Duration::from_secs(30));
        assert_eq!(retired["requests_cut"], 0, "{retired}");
    }
    let (_, health) = get(&agent, &plugin.url("/health"));
    assert_eq!(json_of(&health)["plugin"]["generation"], 2);
    plugin.signal("TERM");
    assert_eq!(plugin.wait_exit(Duration::from_secs(20)), Some(0), "{}", plugin.log_text());
    assert!(wait_gone(third_server, Duration::from_secs(10)), "llama-server outlived d2c-serve");
}

#[test]
fn a_reload_that_cannot_verify_or_start_changes_nothing() {
    let fixture = Fixture::new(&TASKS_A, 3);
    let plugin = start_plugin(&fixture, &[]);
    let agent = agent();
    let ask = |task: &str| {
        let resp = agent.post(&plugin.url("/completion")).send_json(completion(task, false)).unwrap();
        assert_eq!(resp.status(), 200);
        resp.headers()["x-d2c-adapter"].to_str().unwrap().to_owned()
    };
    assert_eq!(ask("translate"), "merged-1.gguf");
    let good = std::fs::read(&fixture.manifest).unwrap();

    // A manifest whose adapter no longer matches its hash: refused before anything starts.
    let mut m: Value = json_of(&String::from_utf8_lossy(&good));
    m["adapters"][1]["blake3"] = json!("00".repeat(32));
    std::fs::write(&fixture.manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let (status, reply) = post(&agent, &plugin.url("/admin/reload"), &json!({}));
    assert_eq!(status, 409, "{reply}");
    let message = json_of(&reply)["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("merged-1.gguf") && message.contains("blake3"), "the error names the file: {message}");
    assert!(!events(&plugin.log_text()).iter().any(|e| e["event"] == "upstream_started" && e["generation"] == 1), "nothing may start");

    // A manifest that verifies but names a file llama-server cannot load: its server fails to
    // start, is reaped, and the old set keeps serving.
    let bogus = fixture.dir.path().join("merged-9.gguf");
    std::fs::write(&bogus, b"not a gguf file at all").unwrap();
    write_manifest(&fixture.manifest, &[fixture.adapters[0].clone(), bogus], &[("summarize", 0), ("translate", 1)], &[]);
    plugin.signal("HUP");
    let failed = wait_for_event(&plugin, "reload_failed", 1, Duration::from_secs(120));
    assert_eq!(failed["trigger"], "SIGHUP");
    assert_eq!(failed["serving"], 0);
    let refused_server = upstream_pid(&plugin, 1);
    assert!(wait_gone(refused_server, Duration::from_secs(10)), "the failed reload's llama-server was left behind");

    assert_eq!(ask("translate"), "merged-1.gguf", "the old set still routes");
    assert_eq!(ask("classify"), "merged-2.gguf");
    let (_, health) = get(&agent, &plugin.url("/health"));
    let health = json_of(&health);
    assert_eq!(health["plugin"]["generation"], 0);
    assert_eq!(health["upstream"]["status"], "ok");
    assert!(process_alive(plugin.upstream_pid.unwrap()));
}
