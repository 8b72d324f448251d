//! A real client: the OpenAI Python SDK (PyPI `openai`, pinned in scripts/setup.sh) against
//! d2c-serve in front of a real llama-server. What the SDK receives (models list, completions,
//! chat, both streamed, and its error type for an unknown task) must equal what llama-server
//! answers directly for the same request with the task's adapter.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

const TASKS: [(&str, usize); 3] = [("summarize", 0), ("translate", 1), ("extract", 0)];
const PROMPT: &str = "The three most important things about rivers are";

#[test]
fn the_openai_sdk_gets_each_tasks_adapter() {
    let fixture = Fixture::new(&TASKS, 2);
    let plugin = start_plugin(&fixture, &[]);
    let agent = agent();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let names: Vec<&str> = TASKS.iter().map(|(t, _)| *t).collect();
    let out = Command::new(d2c_test_assets::python())
        .arg(&script)
        .arg(plugin.url("/v1"))
        .arg(serde_json::to_string(&names).unwrap())
        .output()
        .expect("run the OpenAI SDK client");
    assert!(out.status.success(), "SDK client failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let seen = json_of(&String::from_utf8_lossy(&out.stdout));

    let listed: Vec<&str> = seen["models"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    let mut expected_models = names.clone();
    expected_models.sort();
    assert_eq!(listed, expected_models);

    let mut answers_differ = std::collections::BTreeSet::new();
    for (task, adapter) in TASKS {
        let got = &seen["tasks"][task];
        assert_eq!(got["adapter_header"], format!("merged-{adapter}.gguf"), "task {task}");
        // llama-server says its model file there; the plugin puts the task back, as OpenAI does.
        assert_eq!(got["completion_model"], task, "task {task}: the completion's model");
        assert_eq!(got["chat_model"], task, "task {task}: the chat's model");
        assert_eq!(got["streamed_models"], json!([task]), "task {task}: every streamed chunk's model");
        let direct = |path: &str, mut body: Value| -> Value {
            body["lora"] = lora_list(2, Some(adapter));
            let (status, text) = post(&agent, &plugin.upstream(path), &greedy(body));
            assert_eq!(status, 200, "{text}");
            json_of(&text)
        };
        let completion = direct("/v1/completions", json!({"model": task, "prompt": PROMPT, "max_tokens": 8}));
        let expected = completion["choices"][0]["text"].as_str().unwrap();
        assert_eq!(got["completion"], expected, "task {task}: completion");
        assert_eq!(got["streamed_completion"], expected, "task {task}: streamed completion");
        let chat =
            direct("/v1/chat/completions", json!({"model": task, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]}));
        let expected_chat = chat["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got["chat"], expected_chat, "task {task}: chat");
        assert_eq!(got["streamed_chat"], expected_chat, "task {task}: streamed chat");
        answers_differ.insert(expected.to_owned());
    }
    // Otherwise the comparison above could not tell the two adapters apart.
    assert_eq!(answers_differ.len(), 2, "the two adapters must answer differently: {answers_differ:?}");

    let unknown = &seen["unknown_task"];
    assert_eq!(unknown["error"], "NotFoundError", "{unknown}");
    assert_eq!(unknown["is_not_found"], true);
    assert_eq!(unknown["status"], 404);
    assert_eq!(unknown["type"], "not_found_error", "{unknown}");
    assert!(unknown["message"].as_str().unwrap().contains("no-such-task"), "{unknown}");
}
