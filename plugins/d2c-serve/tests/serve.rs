//! End to end: the d2c-serve binary in front of a real llama-server, on loopback, with real
//! adapters and a real manifest. Every routed answer is compared with what llama-server gives
//! for the same request made directly with that adapter's per-request `lora` list.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TASKS: [(&str, usize); 4] = [("summarize", 0), ("translate", 1), ("classify", 2), ("extract", 0)];
const PROMPT: &str = "The three most important things about rivers are";

fn completion(prompt: &str, n_predict: usize) -> Value {
    greedy(json!({"prompt": prompt, "n_predict": n_predict}))
}

fn content(text: &str) -> String {
    json_of(text)["content"].as_str().unwrap_or_else(|| panic!("no content in {text}")).to_owned()
}

/// Direct answers from the plugin's own llama-server: index 0 = base (all scales 0),
/// index k + 1 = adapter k alone.
fn direct_answers(agent: &ureq::Agent, plugin: &Plugin, n_adapters: usize) -> Vec<String> {
    let mut answers = Vec::new();
    for chosen in std::iter::once(None).chain((0..n_adapters).map(Some)) {
        let mut body = completion(PROMPT, 8);
        body["lora"] = lora_list(n_adapters, chosen);
        let (status, text) = post(agent, &plugin.upstream("/completion"), &body);
        assert_eq!(status, 200, "{text}");
        answers.push(content(&text));
    }
    let distinct: BTreeSet<&String> = answers.iter().collect();
    // Otherwise a request routed to the wrong adapter could not be told apart.
    assert_eq!(distinct.len(), answers.len(), "base and adapters must answer differently: {answers:?}");
    answers
}

#[test]
fn routes_every_task_like_a_direct_lora_request() {
    let fixture = Fixture::new(&TASKS, 3);
    let plugin = start_plugin(&fixture, &[]);
    let agent = agent();

    // The child holds the manifest's adapters, in order, with global scales at 0.
    let (_, loaded) = get(&agent, &plugin.upstream("/lora-adapters"));
    let loaded = json_of(&loaded);
    let loaded = loaded.as_array().unwrap();
    assert_eq!(loaded.len(), 3);
    for (i, a) in loaded.iter().enumerate() {
        assert_eq!(a["id"], i);
        assert_eq!(std::path::Path::new(a["path"].as_str().unwrap()), fixture.adapters[i].canonicalize().unwrap());
        assert_eq!(a["scale"].as_f64(), Some(0.0), "global scale of adapter {i}");
    }

    let direct = direct_answers(&agent, &plugin, 3);
    for (task, adapter) in TASKS {
        // Native endpoint: task in `task`.
        let mut body = completion(PROMPT, 8);
        body["task"] = json!(task);
        let resp = agent.post(&plugin.url("/completion")).send_json(&body).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-d2c-adapter"], format!("merged-{adapter}.gguf"));
        let text = resp.into_body().read_to_string().unwrap();
        assert_eq!(content(&text), direct[adapter + 1], "task {task} via /completion");

        // OpenAI endpoints: task in `model`; compared with the same request sent directly.
        let v1 = greedy(json!({"model": task, "prompt": PROMPT, "max_tokens": 8}));
        let (status, routed) = post(&agent, &plugin.url("/v1/completions"), &v1);
        assert_eq!(status, 200, "{routed}");
        let mut v1_direct = v1.clone();
        v1_direct["lora"] = lora_list(3, Some(adapter));
        let (_, expected) = post(&agent, &plugin.upstream("/v1/completions"), &v1_direct);
        let routed_text = json_of(&routed)["choices"][0]["text"].as_str().unwrap().to_owned();
        assert_eq!(routed_text, json_of(&expected)["choices"][0]["text"].as_str().unwrap(), "task {task} via /v1/completions");
        assert_eq!(routed_text, direct[adapter + 1], "task {task}: /v1/completions and /completion agree");

        let chat = greedy(json!({"model": task, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]}));
        let (status, routed) = post(&agent, &plugin.url("/v1/chat/completions"), &chat);
        assert_eq!(status, 200, "{routed}");
        let mut chat_direct = chat.clone();
        chat_direct["lora"] = lora_list(3, Some(adapter));
        let (_, expected) = post(&agent, &plugin.upstream("/v1/chat/completions"), &chat_direct);
        assert_eq!(
            json_of(&routed)["choices"][0]["message"]["content"],
            json_of(&expected)["choices"][0]["message"]["content"],
            "task {task} via /v1/chat/completions"
        );
    }

    // No task: the base model, whatever llama-server's global state would say.
    let (status, routed) = post(&agent, &plugin.url("/completion"), &completion(PROMPT, 8));
    assert_eq!(status, 200);
    assert_eq!(content(&routed), direct[0]);
    let (_, no_lora_field) = post(&agent, &plugin.upstream("/completion"), &completion(PROMPT, 8));
    assert_eq!(content(&no_lora_field), direct[0], "global scales were zeroed at start-up");
    let plain = DirectServer::start(&[]);
    let (_, plain_answer) = post(&agent, &plain.url("/completion"), &completion(PROMPT, 8));
    assert_eq!(content(&plain_answer), direct[0], "a server without adapters answers like the routed base request");
    drop(plain);

    let (status, models) = get(&agent, &plugin.url("/v1/models"));
    assert_eq!(status, 200);
    let listed: BTreeSet<String> = json_of(&models)["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, TASKS.iter().map(|(t, _)| t.to_string()).collect());

    let (status, health) = get(&agent, &plugin.url("/health"));
    assert_eq!(status, 200, "{health}");
    let health = json_of(&health);
    assert_eq!(health["plugin"]["status"], "ok");
    assert_eq!(health["upstream"]["status"], "ok");
    assert_eq!(health["plugin"]["tasks"], 4);

    // One structured line per request, naming task, adapter, status and latency.
    let lines = events(&plugin.log_text());
    let routed_line = lines
        .iter()
        .find(|e| e["event"] == "request" && e["task"] == "translate" && e["path"] == "/completion")
        .unwrap_or_else(|| panic!("no request line for translate:\n{}", plugin.log_text()));
    assert_eq!(routed_line["adapter"], "merged-1.gguf");
    assert_eq!(routed_line["status"], 200);
    assert!(routed_line["latency_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_tasks_serve_scale_reaches_llama_server() {
    // Two tasks share adapter 0; the manifest serves `extract` at 2.5.
    let tasks = [("summarize", 0), ("extract", 0), ("classify", 1)];
    let fixture = Fixture::with_scales(&tasks, 2, &[("extract", 2.5)]);
    let plugin = start_plugin(&fixture, &[]);
    let agent = agent();
    let direct_at = |scale: f32| {
        let mut body = completion(PROMPT, 8);
        body["lora"] = scaled_lora_list(2, Some(0), scale);
        let (status, text) = post(&agent, &plugin.upstream("/completion"), &body);
        assert_eq!(status, 200, "{text}");
        content(&text)
    };
    let (at_one, at_scale) = (direct_at(1.0), direct_at(2.5));
    // Otherwise a scale dropped on the way could not be told apart.
    assert_ne!(at_one, at_scale, "adapter 0 must answer differently at 1 and 2.5");

    for (task, expected, scale) in [("summarize", &at_one, "1"), ("extract", &at_scale, "2.5")] {
        let mut body = completion(PROMPT, 8);
        body["task"] = json!(task);
        let resp = agent.post(&plugin.url("/completion")).send_json(&body).unwrap();
        assert_eq!(resp.headers()["x-d2c-adapter"], "merged-0.gguf");
        assert_eq!(resp.headers()["x-d2c-scale"], scale, "task {task}");
        assert_eq!(&content(&resp.into_body().read_to_string().unwrap()), expected, "task {task} via /completion");
        let chat = greedy(json!({"model": task, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]}));
        let (status, routed) = post(&agent, &plugin.url("/v1/chat/completions"), &chat);
        assert_eq!(status, 200, "{routed}");
        let mut chat_direct = chat.clone();
        chat_direct["lora"] = scaled_lora_list(2, Some(0), scale.parse().unwrap());
        let (_, direct) = post(&agent, &plugin.upstream("/v1/chat/completions"), &chat_direct);
        assert_eq!(
            json_of(&routed)["choices"][0]["message"]["content"],
            json_of(&direct)["choices"][0]["message"]["content"],
            "task {task} via chat"
        );
    }
    let (_, models) = get(&agent, &plugin.url("/v1/models"));
    let models = json_of(&models);
    let scale_of = |task: &str| models["data"].as_array().unwrap().iter().find(|m| m["id"] == task).unwrap()["scale"].as_f64();
    assert_eq!((scale_of("extract"), scale_of("summarize")), (Some(2.5), Some(1.0)));
}

#[test]
fn streams_sse_and_rejects_bad_requests() {
    let fixture = Fixture::new(&TASKS, 3);
    let plugin = start_plugin(&fixture, &["--max-body-bytes", "4096"]);
    let agent = agent();

    // Streaming: the same tokens as the buffered answer, as SSE events passed on while
    // llama-server is still generating (a buffering proxy would send the first event only
    // after the last token).
    let mut body = completion(PROMPT, 64);
    body["task"] = json!("classify");
    let (_, whole) = post(&agent, &plugin.url("/completion"), &body);
    let whole = content(&whole);
    body["stream"] = json!(true);
    let resp = agent.post(&plugin.url("/completion")).send_json(&body).unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    let mut data = Vec::new();
    for line in lines.by_ref() {
        if let Some(event) = line.unwrap().strip_prefix("data: ") {
            data.push(event.to_owned());
            break;
        }
    }
    let (status, slots) = get(&agent, &plugin.upstream("/slots"));
    assert_eq!(status, 200, "{slots}");
    assert!(
        json_of(&slots).as_array().unwrap().iter().any(|s| s["is_processing"] == true),
        "the first event arrived after llama-server had finished: the stream was buffered"
    );
    data.extend(lines.map(|l| l.unwrap()).filter_map(|l| l.strip_prefix("data: ").map(str::to_owned)));
    assert!(data.len() > 10, "expected one event per token, got {}", data.len());
    let streamed: String = data.iter().map(|d| json_of(d)["content"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(streamed, whole, "streamed tokens differ from the buffered answer");

    // Unknown task: 404 naming it, on both kinds of endpoint.
    let mut unknown = completion(PROMPT, 4);
    unknown["task"] = json!("no-such-task");
    let (status, text) = post(&agent, &plugin.url("/completion"), &unknown);
    assert_eq!(status, 404, "{text}");
    assert_eq!(json_of(&text)["error"]["task"], "no-such-task");
    assert!(text.contains("no-such-task"));
    let (status, text) =
        post(&agent, &plugin.url("/v1/chat/completions"), &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(status, 404, "{text}");
    assert!(json_of(&text)["error"]["message"].as_str().unwrap().contains("\"nope\""));

    // Malformed bodies: 400, never forwarded.
    let (status, text) = post_raw(&agent, &plugin.url("/v1/completions"), b"{\"model\": \"summarize\", \"prompt\": ");
    assert_eq!(status, 400, "{text}");
    assert!(json_of(&text)["error"]["message"].as_str().unwrap().contains("malformed JSON"));
    let (status, _) = post_raw(&agent, &plugin.url("/completion"), b"[1, 2]");
    assert_eq!(status, 400);
    let (status, _) = post(&agent, &plugin.url("/completion"), &json!({"task": 7, "prompt": "x"}));
    assert_eq!(status, 400);

    // Bounded bodies: 413 past --max-body-bytes.
    let big = json!({"task": "summarize", "prompt": "x".repeat(5000), "n_predict": 1});
    let (status, text) = post(&agent, &plugin.url("/completion"), &big);
    assert_eq!(status, 413, "{text}");

    // Endpoints that could change global state are not reachable through the plugin.
    let (status, _) = post(&agent, &plugin.url("/lora-adapters"), &json!([{"id": 0, "scale": 1.0}]));
    assert_eq!(status, 404);
    let (status, _) = get(&agent, &plugin.url("/completion"));
    assert_eq!(status, 405);
    // A client's own `lora` list is replaced by the task's.
    let mut sneaky = completion(PROMPT, 8);
    sneaky["lora"] = lora_list(3, Some(1));
    let (status, text) = post(&agent, &plugin.url("/completion"), &sneaky);
    assert_eq!(status, 200);
    let mut base = completion(PROMPT, 8);
    base["lora"] = lora_list(3, None);
    assert_eq!(content(&text), content(&post(&agent, &plugin.upstream("/completion"), &base).1));
}

#[test]
fn concurrent_requests_for_different_tasks_are_all_answered_right() {
    let fixture = Fixture::new(&TASKS, 3);
    let plugin = start_plugin(&fixture, &[]);
    let agent = agent();
    let direct = direct_answers(&agent, &plugin, 3);
    let mut expected: BTreeMap<&str, &String> = TASKS.iter().map(|(t, a)| (*t, &direct[a + 1])).collect();
    expected.insert("", &direct[0]);

    let routes: Vec<&str> = expected.keys().copied().collect();
    let answers: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let task = routes[i % routes.len()];
                let (agent, plugin) = (agent.clone(), &plugin);
                s.spawn(move || {
                    (0..3)
                        .map(|_| {
                            let mut body = completion(PROMPT, 8);
                            if !task.is_empty() {
                                body["task"] = json!(task);
                            }
                            let (status, text) = post(&agent, &plugin.url("/completion"), &body);
                            assert_eq!(status, 200, "{text}");
                            (task.to_owned(), content(&text))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers.len(), 30);
    for (task, answer) in &answers {
        assert_eq!(answer, expected[task.as_str()], "task {task:?} under concurrency");
    }
}

#[test]
fn tampered_or_missing_files_refuse_to_start() {
    let fixture = Fixture::new(&TASKS, 3);
    let server = llama_server();
    let args = ["--manifest", fixture.manifest.to_str().unwrap(), "--llama-server", server.to_str().unwrap(), "--port", "0"];
    let log = fixture.dir.path().join("refused.log");

    // One flipped byte in the middle of an adapter, after the manifest was written.
    let target = &fixture.adapters[1];
    let mut bytes = std::fs::read(target).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(target, &bytes).unwrap();
    let (code, text) = try_start_plugin(&args, &log).err().expect("a tampered adapter must refuse to start");
    assert_ne!(code, 0);
    assert!(text.contains(target.to_str().unwrap()) && text.contains("blake3"), "error must name the file:\n{text}");
    assert!(!events(&text).iter().any(|e| e["event"] == "upstream_started"), "nothing may start:\n{text}");

    bytes[mid] ^= 0x40;
    std::fs::write(target, &bytes).unwrap();
    let missing = &fixture.adapters[2];
    std::fs::remove_file(missing).unwrap();
    let (code, text) = try_start_plugin(&args, &log).err().expect("a missing adapter must refuse to start");
    assert_ne!(code, 0);
    assert!(text.contains(missing.to_str().unwrap()) && text.contains("missing"), "{text}");

    // A base model that is not the one the adapters were merged for.
    let mut m: Value = json_of(&std::fs::read_to_string(&fixture.manifest).unwrap());
    m["base"]["blake3"] = json!("00".repeat(32));
    let edited = fixture.dir.path().join("other-base.json");
    std::fs::write(&edited, serde_json::to_string(&m).unwrap()).unwrap();
    let args = ["--manifest", edited.to_str().unwrap(), "--llama-server", server.to_str().unwrap(), "--port", "0"];
    let (code, text) = try_start_plugin(&args, &log).err().expect("a wrong base model must refuse to start");
    assert_ne!(code, 0);
    assert!(text.contains("base model") && text.contains(base_model().to_str().unwrap()), "{text}");
}

#[test]
fn sigterm_stops_the_child_and_sigkill_takes_it_along() {
    let fixture = Fixture::new(&TASKS, 3);

    let mut plugin = start_plugin(&fixture, &[]);
    let child = plugin.upstream_pid.expect("child pid logged");
    assert!(process_alive(child));
    plugin.signal("TERM");
    assert_eq!(plugin.wait_exit(Duration::from_secs(20)), Some(0), "{}", plugin.log_text());
    assert!(wait_gone(child, Duration::from_secs(5)), "llama-server {child} outlived d2c-serve");

    // No chance to clean up: the kernel's parent-death signal still ends llama-server.
    let mut plugin = start_plugin(&fixture, &[]);
    let child = plugin.upstream_pid.unwrap();
    plugin.signal("KILL");
    plugin.wait_exit(Duration::from_secs(10)).expect("killed");
    assert!(wait_gone(child, Duration::from_secs(10)), "llama-server {child} orphaned after SIGKILL of d2c-serve");
}

#[test]
fn a_dead_child_stops_the_plugin_with_an_error() {
    let fixture = Fixture::new(&TASKS, 3);
    let mut plugin = start_plugin(&fixture, &[]);
    let child = plugin.upstream_pid.unwrap();
    assert!(std::process::Command::new("kill").arg("-KILL").arg(child.to_string()).status().unwrap().success());
    let code = plugin.wait_exit(Duration::from_secs(20)).expect("d2c-serve must exit when llama-server dies");
    assert_ne!(code, 0);
    let log = plugin.log_text();
    assert!(events(&log).iter().any(|e| e["event"] == "upstream_exited"), "{log}");
    assert!(log.contains("llama-server exited unexpectedly"), "{log}");
}

#[test]
fn attach_checks_the_adapters_and_reports_an_upstream_outage() {
    let fixture = Fixture::new(&TASKS, 3);
    let agent = agent();
    let loras: Vec<&std::path::Path> = fixture.adapters.iter().map(|p| p.as_path()).collect();
    let log = fixture.dir.path().join("attach.log");

    // Adapters loaded in another order: ids would point at the wrong files.
    let reversed: Vec<&std::path::Path> = loras.iter().rev().copied().collect();
    let wrong = DirectServer::start(&reversed);
    let args = ["--manifest", fixture.manifest.to_str().unwrap(), "--attach", &wrong.url(""), "--port", "0"];
    let (code, text) = try_start_plugin(&args, &log).err().expect("mismatched adapters must refuse to attach");
    assert_ne!(code, 0);
    assert!(text.contains("adapter id 0") && text.contains("merged-2.gguf"), "{text}");
    drop(wrong);

    let mut server = DirectServer::start(&loras);
    let url = server.url("");
    let args = ["--manifest", fixture.manifest.to_str().unwrap(), "--attach", &url, "--port", "0"];
    let plugin = try_start_plugin(&args, &log).unwrap_or_else(|(code, log)| panic!("attach failed ({code}):\n{log}"));
    assert_eq!(plugin.upstream_pid, None);
    let mut body = completion(PROMPT, 8);
    body["task"] = json!("translate");
    let (status, routed) = post(&agent, &plugin.url("/completion"), &body);
    assert_eq!(status, 200, "{routed}");
    let mut direct = completion(PROMPT, 8);
    direct["lora"] = lora_list(3, Some(1));
    let (_, expected) = post(&agent, &server.url("/completion"), &direct);
    assert_eq!(content(&routed), content(&expected));

    server.kill();
    let (status, text) = post(&agent, &plugin.url("/completion"), &body);
    assert_eq!(status, 502, "{text}");
    assert_eq!(json_of(&text)["error"]["type"], "upstream_error");
    let (status, health) = get(&agent, &plugin.url("/health"));
    assert_eq!(status, 503);
    let health = json_of(&health);
    assert_eq!(health["plugin"]["status"], "ok");
    assert_eq!(health["upstream"]["status"], "down");
}

#[test]
fn a_request_whose_upstream_socket_closes_unanswered_is_retried_once() {
    let fixture = Fixture::new(&TASKS, 3);
    let agent = agent();
    let loras: Vec<&std::path::Path> = fixture.adapters.iter().map(|p| p.as_path()).collect();
    let server = DirectServer::start(&loras);
    let relay = DroppingRelay::start(server.port);
    let log = fixture.dir.path().join("relay.log");
    let args = ["--manifest", fixture.manifest.to_str().unwrap(), "--attach", &relay.url(), "--port", "0"];
    let plugin = try_start_plugin(&args, &log).unwrap_or_else(|(code, log)| panic!("attach failed ({code}):\n{log}"));
    let mut body = completion(PROMPT, 8);
    body["task"] = json!("translate");
    let mut direct = completion(PROMPT, 8);
    direct["lora"] = lora_list(3, Some(1));
    let (_, expected) = post(&agent, &server.url("/completion"), &direct);

    // One socket closed as the request went out: answered from a second connection.
    relay.drop_next_posts(1);
    let (status, routed) = post(&agent, &plugin.url("/completion"), &body);
    assert_eq!(status, 200, "{routed}\n{}", plugin.log_text());
    assert_eq!(content(&routed), content(&expected));
    let retries: Vec<Value> = events(&plugin.log_text()).into_iter().filter(|e| e["event"] == "upstream_retry").collect();
    assert_eq!(retries.len(), 1, "{}", plugin.log_text());

    // Both tries closed: one retry only, and the 502 names the cause, not just the step.
    relay.drop_next_posts(2);
    let (status, text) = post(&agent, &plugin.url("/completion"), &body);
    assert_eq!(status, 502, "{text}");
    let message = json_of(&text)["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("closed"), "{message}");

    let (status, routed) = post(&agent, &plugin.url("/completion"), &body);
    assert_eq!(status, 200, "{routed}");
    assert_eq!(content(&routed), content(&expected));
}
